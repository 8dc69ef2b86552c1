"""Sampling: from a batch of next-token logits to a batch of next tokens, plus per-token statistics.

Everything here is a pure function over a (B, V) batch with PER-ROW parameters held as (B,) tensors,
in the style of gpt-fast / nanoGPT: one request's settings never leak into another row, and a batch
of mixed requests costs the same few kernels as a batch of identical ones. The one per-row Python
loop is the noise of seeded rows, which must come from that request's own generator so that a seed
reproduces its tokens whatever else shares the batch.

The pipeline a server runs per decode step (the same order as vLLM / HF):
    logits = apply_penalties(logits, prompt_mask, output_counts, bs)   # repetition/presence/frequency
    tokens = sample_from_logits(logits, bs, generators)                 # temperature, top-k, top-p, min-p
    stats  = token_stats(raw_logits, tokens)                            # uncertainty of the *model*

Filters mark removed tokens with -inf, so they compose: each sees only what the previous one kept.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LN2 = math.log(2.0)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # divides the logits; 0 means greedy (argmax), capped at 100
    top_k: int = 0  # keep only the k most likely tokens (ties at the k-th value all kept); 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest top set whose probability reaches p; 1 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # CTRL-style (HF/vLLM): seen tokens' positive logits /r, negative *r; 1 = off
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0), counts over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count, counts over generated tokens
    seed: int | None = None  # per-request RNG seed: same seed + same request -> same tokens; None = global RNG

    def validate(self) -> None:
        """Raises ValueError naming the first out-of-range field. Comparisons are written so NaN fails them."""
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or not (0.0 <= t <= 100.0):
            raise ValueError(f"temperature must be a finite number in [0, 100] (0 = greedy), got {t!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        r = self.repetition_penalty
        if not math.isfinite(r) or not r > 0.0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


@dataclass
class BatchSampling:
    """Per-row sampling parameters of one batch, as (B,) tensors on the logits' device."""

    temperature: torch.Tensor  # (B,) float32
    top_k: torch.Tensor  # (B,) long
    top_p: torch.Tensor  # (B,) float32
    min_p: torch.Tensor  # (B,) float32
    repetition_penalty: torch.Tensor  # (B,) float32
    presence_penalty: torch.Tensor  # (B,) float32
    frequency_penalty: torch.Tensor  # (B,) float32
    # Host-side hints that let sample_from_logits/apply_penalties skip work no row asks for, without a
    # device sync to find out. The defaults ("maybe needed") are always correct, only slower.
    use_top_k: bool = True
    use_top_p: bool = True
    use_min_p: bool = True
    use_penalties: bool = True
    all_greedy: bool = False

    @classmethod
    def from_params(cls, params: list[SamplingParams], device) -> "BatchSampling":
        for p in params:
            p.validate()  # a bad value here would turn into silent NaNs / empty distributions later

        def f32(name):
            return torch.tensor([float(getattr(p, name)) for p in params], dtype=torch.float32, device=device)

        return cls(
            temperature=f32("temperature"),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=f32("top_p"),
            min_p=f32("min_p"),
            repetition_penalty=f32("repetition_penalty"),
            presence_penalty=f32("presence_penalty"),
            frequency_penalty=f32("frequency_penalty"),
            use_top_k=any(p.top_k > 0 for p in params),
            use_top_p=any(p.top_p < 1.0 for p in params),
            use_min_p=any(p.min_p > 0.0 for p in params),
            use_penalties=any(
                p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params
            ),
            all_greedy=len(params) > 0 and all(p.temperature == 0.0 for p in params),
        )


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded for one request, on the device its noise is drawn on; None without a seed."""
    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    # manual_seed takes a 64-bit unsigned value; masking lets negative and huge user seeds through unchanged
    # in meaning (distinct seeds stay distinct modulo 2**64).
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


# ---------------------------------------------------------------------------------------------------
# logit transforms


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    output_counts: torch.Tensor,
    bs: BatchSampling,
) -> torch.Tensor:
    """Repetition, presence and frequency penalties, per row. Returns a new tensor.

    prompt_mask (B, V) bool marks tokens present in the prompt (None = no prompt tokens count);
    output_counts (B, V) counts each token among the tokens generated so far.
    Repetition penalty covers tokens seen in the prompt OR the output (as vLLM does); presence and
    frequency cover the output only (OpenAI semantics: they discourage the model repeating itself,
    not quoting its prompt).
    """
    counts = output_counts.to(logits.dtype)
    seen = output_counts > 0
    if prompt_mask is not None:
        seen = seen | prompt_mask
    r = bs.repetition_penalty.to(logits.dtype).unsqueeze(1)
    # CTRL-style: dividing a positive logit and multiplying a negative one both make the token less
    # likely; a plain division would *boost* tokens with negative logits.
    penalized = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalized, logits)
    presence = bs.presence_penalty.to(logits.dtype).unsqueeze(1)
    frequency = bs.frequency_penalty.to(logits.dtype).unsqueeze(1)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divides each row by its temperature; rows at temperature 0 stay unscaled (they are greedy later,
    and dividing by 0 would make inf/NaN that the filters would then have to step around)."""
    t = temperature.to(logits.dtype)
    t = torch.where(t > 0, t, torch.ones_like(t))
    return logits / t.unsqueeze(1)


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keeps each row's top_k largest logits, sets the rest to -inf; top_k 0 (or >= V) keeps everything.

    Implemented as a threshold at the k-th largest value, so every token TIED with the k-th is kept
    too: a row may keep more than k tokens, but the result never depends on how a sort orders equal
    values (which differs between devices and kernels).
    """
    V = logits.shape[-1]
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    k = top_k.to(logits.device).unsqueeze(1)
    kth = sorted_logits.gather(1, (k - 1).clamp(0, V - 1))
    kth = torch.where(k > 0, kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keeps the smallest set of most-likely tokens whose probability reaches top_p.

    A token is kept when the mass of the tokens strictly more likely than it is still below p, so the
    most likely token is always kept (p > 0). As in top_k_filter the cut is a probability threshold,
    so tokens tied with the last kept one are kept too. Rows with p >= 1 are left untouched (the
    float cumulative sum can exceed 1 a little and would otherwise drop the zero-mass tail).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    p = top_p.to(probs.device, torch.float32).unsqueeze(1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = sorted_probs.gather(1, n_keep - 1)
    keep = (probs >= threshold) | (p >= 1.0)
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keeps tokens with p >= min_p * p_max; min_p 0 keeps everything.

    Done in logit space (logit >= max_logit + log(min_p)): the softmax normaliser cancels, and the
    comparison avoids underflowing small probabilities to 0.
    """
    m = min_p.to(logits.device, torch.float32)
    log_min_p = torch.where(m > 0, torch.log(m.clamp(min=1e-38)), torch.full_like(m, float("-inf")))
    threshold = logits.float().amax(dim=-1, keepdim=True) + log_min_p.unsqueeze(1)
    return logits.masked_fill(logits.float() < threshold, float("-inf"))


# ---------------------------------------------------------------------------------------------------
# sampling


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, first index on ties: max(dim)'s indices, which the CPU computes
    faster than argmax over a GPT-2-sized vocabulary."""
    return x.max(dim=-1).indices


def sample_from_logits(
    logits: torch.Tensor,
    bs: BatchSampling,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row, (B,) long: temperature, top-k, top-p, min-p, then greedy or a random draw.

    Penalties are the caller's step before this (apply_penalties). Rows at temperature 0 take the
    argmax of `logits`. Other rows sample with the exponential race (Gumbel-max in another form):
    argmax(probs / E) with E ~ Exp(1) i.i.d. is a draw from probs, and needs no cumulative sum or
    multinomial kernel, so each row's randomness is exactly V numbers. A row with a generator draws
    its V numbers from that generator alone, so its tokens depend only on its seed and its own
    logits, never on which other rows share the batch; rows without one share one global-RNG draw.
    """
    B, V = logits.shape
    logits = logits.float()
    greedy_tokens = argmax_rows(logits)
    if bs.all_greedy:
        return greedy_tokens
    x = apply_temperature(logits, bs.temperature)
    if bs.use_top_k:
        x = top_k_filter(x, bs.top_k)
    if bs.use_top_p:
        x = top_p_filter(x, bs.top_p)
    if bs.use_min_p:
        x = min_p_filter(x, bs.min_p)
    probs = torch.softmax(x, dim=-1)

    assert len(generators) == B, f"need one generator slot per row: {len(generators)} for {B} rows"
    if any(g is None for g in generators):
        noise = torch.empty_like(probs).exponential_()
    else:
        noise = torch.empty_like(probs)
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)  # the unavoidable loop: one generator per seeded row
    # Exp(1) can round to 0 in float32; 0/0 would be NaN and argmax picks NaN, so clamp. Filtered
    # tokens have probs exactly 0 and then always lose (0 / tiny = 0).
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    sampled = argmax_rows(probs / noise)
    return torch.where(bs.temperature.to(logits.device) == 0, greedy_tokens, sampled)


# ---------------------------------------------------------------------------------------------------
# statistics of the model's raw distribution (before any sampling transform)


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 (bf16/fp16 logits lose the small probabilities otherwise)."""
    return F.log_softmax(logits.float(), dim=-1)


def token_stats(logits: torch.Tensor, chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row uncertainty of the raw distribution and of the chosen token, each a (B,) float32 tensor.

    logprob: ln p(chosen), nats. surprise: -log2 p(chosen), bits. entropy: H = E[-log2 p], bits.
    varentropy: Var[-log2 p] under p, bits^2 (high when the model splits between a few confident
    options and a long tail). Tokens with -inf logits have p = 0 and contribute 0 (0 * log 0 = 0),
    so entropy and varentropy stay finite; surprise is inf only if the chosen token itself had p = 0.
    """
    lp = logprobs(logits)
    p = lp.exp()
    nz = p > 0
    # -log2 p where p > 0; elsewhere 0 so that p * (...) is 0 * finite, not 0 * inf = NaN.
    info_bits = torch.where(nz, -lp / _LN2, torch.zeros_like(lp))
    entropy = (p * info_bits).sum(dim=-1)
    dev = torch.where(nz, info_bits - entropy.unsqueeze(1), torch.zeros_like(lp))
    varentropy = (p * dev * dev).sum(dim=-1)
    chosen_lp = lp.gather(1, chosen.long().view(-1, 1).to(lp.device)).squeeze(1)
    return {
        "logprob": chosen_lp,
        "surprise": -chosen_lp / _LN2,
        "entropy": entropy,
        "varentropy": varentropy,
    }


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of the raw distribution: (logprobs (B, k) float32, ids (B, k) long)."""
    lp = logprobs(logits)
    values, ids = torch.topk(lp, min(int(k), lp.shape[-1]), dim=-1)
    return values, ids


# ---------------------------------------------------------------------------------------------------
# error-driven sampling: surprise feedback after mirostat v2, temperature from the model's precision


@dataclass
class ErrorDrivenParams:
    """Per-request settings of the error-driven sampler (docs/pc.md)."""

    tau: float = 5.0  # target surprise per token, bits (char models: the checkpoint's val CE in bits)
    eta: float = 0.1  # learning rate of the surprise threshold μ
    lam: float = 0.5  # how strongly the error signal sets the precision (0 = fixed temperature)
    base_temperature: float = 1.0  # T0: the temperature at precision 1
    mu0: float | None = None  # initial threshold; None = 2τ (mirostat v2); inf keeps every token
    m0: float | None = None  # initial running log-mean of the error signal; None = the first one seen

    def validate(self) -> None:
        if not (math.isfinite(self.tau) and 0 < self.tau <= 64):
            raise ValueError(f"mirostat_tau must be in (0, 64] bits, got {self.tau}")
        if not (math.isfinite(self.eta) and 0 <= self.eta <= 10):
            raise ValueError(f"mirostat_eta must be in [0, 10], got {self.eta}")
        if not (math.isfinite(self.lam) and 0 <= self.lam <= 10):
            raise ValueError(f"the precision gain must be in [0, 10], got {self.lam}")
        if not (math.isfinite(self.base_temperature) and 0 < self.base_temperature <= 100):
            raise ValueError(f"temperature for the error-driven sampler must be in (0, 100], got {self.base_temperature}")


def error_driven_precision(error: torch.Tensor, log_mean: torch.Tensor, lam: torch.Tensor):
    """γ_t = clip(exp(−λ·(log ε_t − m)), 0.5, 2) and the updated m ← 0.95·m + 0.05·log ε_t.

    A prediction more uncertain than usual (ε above its running mean) gets a lower precision and
    so a higher temperature; all arguments are per-row (B,) tensors."""
    log_error = torch.log(error.clamp_min(1e-6))
    precision = torch.exp(-lam * (log_error - log_mean)).clamp(0.5, 2.0)
    return precision, 0.95 * log_mean + 0.05 * log_error


def surprise_filter(logits: torch.Tensor, temperature: torch.Tensor, mu: torch.Tensor):
    """Mirostat v2's truncation: keeps the tokens whose surprise −log2 p under the tempered
    distribution is at most μ (always the most likely one). Returns (filtered logits, n_kept)."""
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    surprise = -torch.log_softmax(scaled, dim=-1) / _LN2
    keep = surprise <= mu[:, None]
    keep.scatter_(1, argmax_rows(logits)[:, None], True)
    return logits.float().masked_fill(~keep, float("-inf")), keep.sum(dim=-1)


def update_mu(mu: torch.Tensor, filtered: torch.Tensor, temperature: torch.Tensor, chosen: torch.Tensor,
              tau: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """μ ← μ − η·(s_t − τ), with s_t the surprise of the chosen token under the truncated,
    renormalised distribution it was drawn from (as llama.cpp's mirostat v2 measures it)."""
    scaled = filtered / temperature.clamp_min(1e-6)[:, None]
    s = -torch.log_softmax(scaled, dim=-1).gather(1, chosen.view(-1, 1)).squeeze(1) / _LN2
    return mu - eta * (s - tau)


def write_rows(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    """dst[rows] = src for rows given as a slice (a view: written in place) or a (n,) index tensor."""
    if isinstance(rows, slice):
        dst[rows].copy_(src)
    else:
        dst.index_copy_(0, rows, src.to(dst.dtype))


class ErrorDrivenState:
    """The error-driven sampler's state per cache slot, kept on the device across steps.

    One (n_slots, len(FIELDS)) float32 tensor: whether the slot's request uses the sampler, its
    settings, and the running state (μ, the running log-mean m of the error signal and whether m
    is set yet). A request's row is written when it is admitted (initial_row, copied in with the
    rest of its admission) and advanced on the device each step; nothing is read back."""

    FIELDS = ("on", "tau", "eta", "lam", "base_temperature", "mu", "log_mean", "has_log_mean")

    def __init__(self, n_slots: int, device):
        self.values = torch.zeros(n_slots, len(self.FIELDS), dtype=torch.float32, device=device)

    @staticmethod
    def initial_row(params: ErrorDrivenParams | None) -> list[float]:
        if params is None:
            return [0.0, 1.0, 0.0, 0.0, 1.0, math.inf, 0.0, 0.0]
        mu = 2 * params.tau if params.mu0 is None else params.mu0
        return [1.0, params.tau, params.eta, params.lam, params.base_temperature, mu,
                0.0 if params.m0 is None else params.m0, float(params.m0 is not None)]

    def admit(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """rows (n, len(FIELDS)) from initial_row, for cache slots `slots` (n,)."""
        self.values.index_copy_(0, slots, rows.to(self.values.dtype))

    def apply(self, raw: torch.Tensor, logits: torch.Tensor, temperature: torch.Tensor, rows):
        """Per-row temperature from the prediction's precision, then mirostat v2's truncation, for
        the rows whose request uses the sampler (others pass through). raw: the model's (B, V)
        logits; logits: after penalties; rows: the slots of the batch's rows (slice or tensor).
        Returns (logits, temperature, step): step is what update() and the uncertainty stats need."""
        v = self.values[rows].clone()  # this step's state, as update() overwrites the slots' rows
        on = v[:, 0] > 0
        lp = torch.log_softmax(raw.float(), dim=-1)
        entropy = -(lp.exp() * lp).nan_to_num().sum(-1) / _LN2
        # no m0 given: the first prediction sets the reference
        log_mean = torch.where(v[:, 7] > 0, v[:, 6], torch.log(entropy.clamp_min(1e-6)))
        precision, new_mean = error_driven_precision(entropy, log_mean, v[:, 3])
        ed_temperature = v[:, 4] / precision
        filtered, n_kept = surprise_filter(logits, ed_temperature, v[:, 5])
        logits = torch.where(on[:, None], filtered, logits.float())
        temperature = torch.where(on, ed_temperature, temperature)
        step = {"on": on, "values": v, "new_mean": new_mean, "temperature": ed_temperature,
                "precision": precision, "mu": v[:, 5], "n_kept": n_kept.float()}
        return logits, temperature, step

    def update(self, step: dict, filtered: torch.Tensor, temperature: torch.Tensor, chosen: torch.Tensor,
               rows) -> None:
        """After sampling: μ and m move for the rows that use the sampler."""
        v, on = step["values"], step["on"]
        new_mu = update_mu(v[:, 5], filtered, temperature, chosen, v[:, 1], v[:, 2])
        state = torch.stack([torch.where(on, new_mu, v[:, 5]), torch.where(on, step["new_mean"], v[:, 6]),
                             torch.where(on, torch.ones_like(v[:, 7]), v[:, 7])], dim=1)
        if isinstance(rows, slice):
            self.values[rows, 5:8].copy_(state)
        else:
            self.values[:, 5:8].index_copy_(0, rows, state)
