"""The predictive-coding GPT (model_type "pc"), after hybrid / bidirectional predictive coding.

The baseline blocks f_1..f_L are the amortised bottom-up path, so every PC checkpoint holds a
valid baseline GPT. Each layer adds a low-rank top-down generator g_l that predicts the layer
below from the layer above, and a learned precision κ_l = exp(ρ_l).

Value nodes: z_0 = token + position embedding (clamped, the observation), z_1..z_L the residual
stream after each block (free). Logits come from z_L. The energy of one position is

    E = Σ_l ½‖z_l − f_l(z_{l−1})‖² + Σ_l ½·κ_l·‖z_{l−1} − g_l(z_l)‖²

At the feed-forward states the bottom-up errors are zero but the top-down ones are not, so
settling (Jacobi-preconditioned gradient descent on z, with backtracking) moves z_L.

Settle the readout, not the memory: attention keys and values of earlier positions are always the
amortised (feed-forward) ones, the ones a baseline would cache. A settling position reads them
and recomputes only its own q/k/v from its current z; so its energy depends on its own z alone,
and settling every position at once (training, evaluation) equals settling each newest position
in turn (cached decoding).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcgpt.model.gpt import GPT, CachedAttention, CausalSelfAttention, GPTConfig, LayerNorm, last_positions

ERROR_LAWS = ("gaussian", "laplace", "student_t")
# |e| is smoothed to √(e² + ε²) − ε: its gradient is then defined (and near zero) at the zero
# bottom-up errors of the feed-forward states, instead of jumping to ±1 on rounding noise.
LAPLACE_EPS = 1e-2
LN_EPS = 1e-5  # LayerNorm's own


@dataclass
class PCConfig(GPTConfig):
    generator_rank: int = 0  # rank r of each top-down generator g_l; 0 means n_embd // 4
    alpha: float = 0.1  # settling step size at inference (training passes its own)
    default_settle_steps: int = 1  # settle steps when a request names none
    max_settle_steps: int = 16  # the most settle steps a request may ask for
    rho_max: float = 1.0  # cap on the log-precision ρ_l: κ_l ≤ e^rho_max (left free, κ runs away)
    early_stop: float = 0.0  # stop a position once its energy falls by less than this fraction per step; 0 = off
    error_law: str = "gaussian"  # law of the prediction errors: "gaussian", "laplace" or "student_t"
    nu_init: float = 4.0  # Student-t: the degrees of freedom ν_l start here (learned per layer)
    ln_precision: bool = False  # errors in LayerNorm units: 1/σ̄² of the amortised state is its precision
    attention_precision: bool = False  # attention's heads predict weighted by learned per-head precisions
    auto_settle_steps: int = 4  # settle steps of an adaptive ("auto") request where the model is unsure
    auto_threshold: float = 1.0  # adaptive: settle where the unsettled entropy is at least this (bits)
    auto_early_stop: float = 0.01  # adaptive: stop once the energy falls by less than this fraction per step

    def __post_init__(self):
        if self.error_law not in ERROR_LAWS:
            raise ValueError(f"error_law must be one of {ERROR_LAWS}, not {self.error_law!r}")
        if not self.nu_init > 0:
            raise ValueError(f"nu_init must be > 0, not {self.nu_init}")
        if not 0 <= self.auto_settle_steps <= self.max_settle_steps:
            raise ValueError(f"auto_settle_steps must be in 0..max_settle_steps ({self.max_settle_steps})")
        if self.auto_threshold < 0 or self.auto_early_stop < 0:
            raise ValueError("auto_threshold and auto_early_stop must be >= 0")

    @property
    def rank(self) -> int:
        return self.generator_rank or self.n_embd // 4


class Generator(nn.Module):
    """g_l: predicts z_{l−1} from z_l as a residual correction of rank r.

    The output projection starts at zero, so an untrained generator predicts z_{l−1} = z_l.
    """

    def __init__(self, config: PCConfig):
        super().__init__()
        self.ln = LayerNorm(config.n_embd, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, config.rank, bias=config.bias)
        self.c_proj = nn.Linear(config.rank, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate
        nn.init.normal_(self.c_fc.weight, std=0.02)
        nn.init.zeros_(self.c_proj.weight)
        for lin in (self.c_fc, self.c_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, z):
        return z + self.c_proj(F.gelu(self.c_fc(self.ln(z)), approximate=self.approximate))


@dataclass
class OwnKeyMask:
    """A past mask extended by each query's own key, for one fused attention call over
    [past keys, the queries' own keys]: mask (B, 1, S, Lk + S), or None when every query sees every
    key. The fused kernel runs a settle step's attention (forward and backward) in one op instead of
    a dozen small ones, but has no second derivative: settling that differentiates through its
    gradients (unrolled training) keeps the plain past mask and the explicit path."""

    mask: torch.Tensor | None

    @classmethod
    def from_past(cls, past_mask: torch.Tensor, batch: int) -> "OwnKeyMask":
        _, _, S, Lk = past_mask.shape
        own = torch.eye(S, dtype=torch.bool, device=past_mask.device).expand(batch, 1, S, S)
        mask = torch.cat([past_mask.expand(batch, 1, S, Lk), own], dim=-1)
        return cls(None if bool(mask.all()) else mask)


def attention_with_past(q, k, v, k_past, v_past, past_mask):
    """Self-attention (B, H, S, D) of settling positions' queries, keys and values (B, H, S, D):
    each query attends to the amortised keys/values of earlier positions (k_past, v_past:
    (B, H, Lk, D), visible where past_mask (B, 1, S, Lk) is True) and to its own key/value.
    past_mask may be an OwnKeyMask: the same attention as one fused call."""
    if isinstance(past_mask, OwnKeyMask):
        return F.scaled_dot_product_attention(q, torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2),
                                              attn_mask=past_mask.mask)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_past = (q @ k_past.transpose(-2, -1) * scale).masked_fill(~past_mask, float("-inf"))
    s_self = (q * k).sum(-1, keepdim=True) * scale
    w = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1)
    return w[..., :-1] @ v_past + w[..., -1:] * v


def entropy_bits(logits):
    """Entropy (bits) of the softmax of logits (..., V), as the API reports it."""
    lp = F.log_softmax(logits.float(), dim=-1)
    return -(lp.exp() * lp).sum(-1) / math.log(2)


def sq_norms(errors):
    """Squared norms of per-layer errors [(B, S, C)] as (B, S, L): stacked first, so a settle step
    runs three ops here instead of two per layer (the char model's steps are dispatch-bound)."""
    return torch.stack(errors, dim=-2).square().sum(-1)


def smooth_abs(e):
    """|e| smoothed within LAPLACE_EPS of zero: √(e² + ε²) − ε."""
    return torch.sqrt(e.square() + LAPLACE_EPS ** 2) - LAPLACE_EPS


def error_nll(e, precision, law, nu=None):
    """The energy of errors e (..., C) under `law`, summed over C: Gaussian ½κ‖e‖², Laplace
    √κ·Σ smooth|e_i|, Student-t (ν+1)/2·Σ log(1 + κ e_i²/ν). precision κ and ν broadcast against
    e's leading dims (...,); the normalisers are in PCGPT.nll_normaliser."""
    if law == "gaussian":
        return 0.5 * precision * e.square().sum(-1)
    if law == "laplace":
        return precision ** 0.5 * smooth_abs(e).sum(-1)
    precision = torch.as_tensor(precision, dtype=e.dtype, device=e.device)
    return 0.5 * (nu + 1) * torch.log1p(precision[..., None] * e.square() / nu[..., None]).sum(-1)


def student_t_log_normaliser(nu):
    """−log of the Student-t density's constant per unit-scale component: log Γ(ν/2) − log Γ((ν+1)/2) + ½ log(νπ)."""
    return torch.lgamma(nu / 2) - torch.lgamma((nu + 1) / 2) + 0.5 * torch.log(nu * math.pi)


class PrecisionWeightedAttention(CausalSelfAttention):
    """Attention whose heads' predictions are combined by learned precisions π_h = exp(γ_h): the
    layer's attention prediction is H·Σ_h π_h·μ_h / Σ_h π_h, the precision-weighted mean of the
    heads' predictions μ_h (scaled by H to keep the baseline's sum over heads). Attention is linear
    in the values, so the weight goes on each head's values: the KV cache holds weighted values
    and every path (causal, cached, settling) computes the same function. γ = 0 is the baseline."""

    def __init__(self, config):
        super().__init__(config)
        self.head_log_precision = nn.Parameter(torch.zeros(config.n_head))

    def head_weights(self) -> torch.Tensor:
        return self.n_head * torch.softmax(self.head_log_precision, dim=0)

    def qkv(self, x):
        q, k, v = super().qkv(x)
        return q, k, v * self.head_weights().to(v.dtype)[:, None, None]


class PastAttention:
    """The attention context of a settling layer (Block.forward's `context`): the queries attend
    to the amortised keys/values of earlier positions and to their own (attention_with_past), so
    the energy's f_l is the baseline's Block module itself."""
    __slots__ = ("k_past", "v_past", "past_mask")

    def __init__(self, k_past, v_past, past_mask):
        self.k_past, self.v_past, self.past_mask = k_past, v_past, past_mask

    def attend(self, q, k, v):
        return attention_with_past(q, k, v, self.k_past, self.v_past, self.past_mask)


class PCGPT(GPT):
    model_type = "pc"

    def __init__(self, config: PCConfig):
        super().__init__(config)
        self.generators = nn.ModuleList([Generator(config) for _ in range(config.n_layer)])
        self.rho = nn.Parameter(torch.zeros(config.n_layer))  # κ_l = exp(ρ_l), starting at 1
        if config.error_law == "student_t":  # ν_l = exp(η_l), the degrees of freedom of layer l's errors
            self.log_nu = nn.Parameter(torch.full((config.n_layer,), math.log(config.nu_init)))
        if config.attention_precision:  # a module swap, initialised as GPT initialises attention
            for block in self.transformer.h:
                block.attn = PrecisionWeightedAttention(config)
                block.attn.apply(self._init_weights)
                nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_baseline(cls, base: GPT, **pc_options) -> "PCGPT":
        """A PC model whose bottom-up path is `base`, with fresh generators and κ = 1 (and the
        options' parameters at their baseline values: ν = nu_init, head precisions equal)."""
        config = PCConfig(**base.config.to_dict(), **pc_options)
        model = cls(config).to(base.lm_head.weight.device)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith(("generators.", "rho", "log_nu")) or k.endswith("head_log_precision") for k in missing), (missing, unexpected)
        return model

    def generator_parameters(self):
        """What PC adds to the baseline: generators, precisions and the options' parameters."""
        yield from self.generators.parameters()
        yield from self.slow_parameters()
        for block in self.transformer.h:
            if isinstance(block.attn, PrecisionWeightedAttention):
                yield block.attn.head_log_precision

    def slow_parameters(self):
        """The law's parameters (κ's ρ and Student-t's η), learned at a reduced rate (training)."""
        yield self.rho
        if self.config.error_law == "student_t":
            yield self.log_nu

    def nu(self) -> torch.Tensor:
        """Student-t degrees of freedom ν_1..ν_L (L,)."""
        return torch.exp(self.log_nu)

    def kappa(self) -> torch.Tensor:
        """Precisions κ_1..κ_L (L,)."""
        return torch.exp(self.rho.clamp(max=self.config.rho_max))

    # --- energy and settling ------------------------------------------------------------------

    def energy(self, z0, zs, pasts, past_mask, kappa, targets=None, scales=None):
        """Energy per position (B, S) and the errors: z0 clamped, zs = [z_1..z_L] (B, S, C);
        pasts[l] = (k, v) that layer l's attention reads for earlier positions. With targets (B, S)
        the output is clamped too: the CE of the readout joins the energy (local learning).
        scales (B, S, L+1): 1/σ̄ of z_0..z_L when config.ln_precision (state_scales)."""
        up, down = [], []
        below = z0
        for l, (block, gen) in enumerate(zip(self.transformer.h, self.generators)):
            up.append(zs[l] - block(below, PastAttention(*pasts[l], past_mask)))
            down.append(below - gen(zs[l]))
            below = zs[l]
        E, e_up, e_down = self.error_energy(up, down, kappa, scales)
        if targets is not None:
            logits = self.head(zs[-1])
            E = E + F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(E)
        return E, e_up, e_down

    def error_energy(self, up, down, kappa, scales=None):
        """Energy (B, S) of the bottom-up errors `up` (None: all zero) and top-down errors `down`
        ([(B, S, C)] per layer) under the config's law and precisions, and their squared norms
        (B, S, L) (in LayerNorm units when scales are given)."""
        law = self.config.error_law
        if scales is None and law == "gaussian":  # the default, in the fewest ops
            e_down = sq_norms(down)
            E = 0.5 * (kappa * e_down).sum(-1)
            if up is None:
                return E, torch.zeros_like(e_down), e_down
            e_up = sq_norms(up)
            return 0.5 * e_up.sum(-1) + E, e_up, e_down
        down = torch.stack(down, dim=-2)  # (B, S, L, C)
        if scales is not None:
            down = down * scales[..., :-1, None]  # the top-down error of layer l is an error on z_{l−1}
        nu = self.nu() if law == "student_t" else None
        E = error_nll(down, kappa, law, nu).sum(-1)
        e_down = down.square().sum(-1)
        if up is None:
            return E, torch.zeros_like(e_down), e_down
        up = torch.stack(up, dim=-2)
        if scales is not None:
            up = up * scales[..., 1:, None]
        return E + error_nll(up, 1.0, law, nu).sum(-1), up.square().sum(-1), e_down

    def state_scales(self, z0, zs) -> torch.Tensor:
        """1/σ̄ of each state z_0..z_L (B, S, L+1): the standard deviation over channels that a
        LayerNorm divides it by, from the given (amortised) states and held fixed while settling."""
        states = torch.stack([z0.detach(), *[z.detach() for z in zs]], dim=-2)
        return torch.rsqrt(states.var(-1, unbiased=False) + LN_EPS)

    def nll_normaliser(self, kappa):
        """The part of the negative log-likelihood's normaliser that depends on learned parameters,
        per position, summed over the error terms: −(d/2)·Σ_l log κ_l for every law (κ is a
        precision, 1/scale²), plus d·c(ν_l) for each of layer l's two Student-t terms."""
        d = self.config.n_embd
        total = -0.5 * d * torch.log(kappa).sum()
        if self.config.error_law == "student_t":
            total = total + 2 * d * student_t_log_normaliser(self.nu()).sum()
        return total

    def feedforward_energy(self, z0, zs, kappa, scales=None):
        """Energy and its gradient at the feed-forward states, where every bottom-up error is zero
        by construction (z_l = f_l(z_{l−1})): only the generators enter, so the first settling
        step needs no pass through the blocks. Returns (E, e_up, e_down, grads)."""
        with torch.enable_grad():
            leaves = [z.detach().requires_grad_(True) for z in zs]
            below = z0
            down = []
            for gen, z in zip(self.generators, leaves):
                down.append(below - gen(z))
                below = z
            E, e_up, e_down = self.error_energy(None, down, kappa, scales)
            grads = torch.autograd.grad(E.sum(), leaves)
        return E.detach(), e_up, e_down.detach(), list(grads)

    def preconditioner(self, kappa, scales=None) -> torch.Tensor:
        """Jacobi diagonal D_l = π_l + κ_l + [l<L]·(κ_{l+1} + π_{l+1}), π = 1: (L,); each term is
        the curvature at zero error of one error term on z_l (generator and block Jacobians taken
        as the identity). Student-t's curvature at zero error is (ν+1)/ν times the Gaussian's;
        Laplace has none (zero almost everywhere), so it keeps the Gaussian's. With scales
        (LayerNorm units) each term is multiplied by the 1/σ̄² of the state its error is on:
        D_l = π s_l² + κ_l s_{l−1}² + [l<L]·(κ_{l+1} s_l² + π s_{l+1}²), (B, S, L)."""
        pi = torch.ones_like(kappa)
        if self.config.error_law == "student_t":
            nu = self.nu().detach()
            pi, kappa = pi * (nu + 1) / nu, kappa * (nu + 1) / nu
        if scales is None:
            upper = torch.cat([kappa[1:] + pi[1:], kappa.new_zeros(1)])
            return pi + kappa + upper
        s2 = scales.square()
        own = pi * s2[..., 1:] + kappa * s2[..., :-1]
        upper = kappa[1:] * s2[..., 1:-1] + pi[1:] * s2[..., 2:]
        return own + F.pad(upper, (0, 1))

    def settle(self, z0, zs, pasts, past_mask, steps, alpha, kappa=None, create_graph=False, targets=None,
               from_feedforward=None, max_steps=None, early_stop=None, scales=None):
        """Settles zs = [z_1..z_L] (B, S, C) for steps[b] steps per row (B,), or steps[b, s] per
        position (B, S).

        Gradient descent on E w.r.t. z only, divided by D_l, all layers in parallel. Backtracking:
        a position whose energy would rise keeps its old z and halves its step size. With
        config.early_stop > 0 a position stops once its energy falls by less than that fraction.
        from_feedforward (default: when not unrolling for training and no targets are clamped):
        zs are the feed-forward states, so the start's energy and gradient come from the
        generators alone (feedforward_energy): the first step needs no backward pass through the blocks.
        Returns (zs, info) with per-position energy0, energy, steps used, rejections and the
        final squared error norms per layer. max_steps: steps.max() when the caller knows it.
        early_stop: a fraction per row (B,) instead of config.early_stop. scales: state_scales
        (default: of z0, zs when config.ln_precision).
        """
        if from_feedforward is None:
            from_feedforward = not create_graph and targets is None
        if not create_graph:  # attention as one fused call (see OwnKeyMask)
            past_mask = OwnKeyMask.from_past(past_mask, z0.shape[0])
        kappa = self.kappa() if kappa is None else kappa
        if scales is None and self.config.ln_precision:
            scales = self.state_scales(z0, zs)
        # κ (and ν, σ̄) only scale z's step: no gradient through the preconditioner
        inv_D = 1.0 / self.preconditioner(kappa.detach(), scales)
        inv_D = inv_D.tolist() if scales is None else inv_D.unbind(-1)  # floats, or (B, S) per layer
        B, S, _ = z0.shape
        steps = steps.view(B, -1)  # (B, 1) or (B, S)
        step_size = torch.full((B, S), float(alpha), device=z0.device, dtype=z0.dtype)
        active = (steps > 0).expand(B, S).clone()
        if early_stop is None and self.config.early_stop > 0:
            early_stop = torch.full((B,), self.config.early_stop, device=z0.device, dtype=z0.dtype)
        used = torch.zeros(B, S, dtype=torch.long, device=z0.device)
        rejected = torch.zeros_like(used)

        def evaluate(states, need_grad=True):
            # ∂E/∂z_l must be the partial derivative, each z_l a free variable. Without a graph the
            # states are fresh leaves. With one (unrolled training) they still depend on each other
            # and on the keys/values through the weights, so the gradient is taken w.r.t. zero
            # handles added to each state, which keeps the graph to the weights but no path
            # through the other states or the amortised K/V.
            if create_graph:
                handles = [torch.zeros_like(z, requires_grad=True) for z in states]
                E, up, down = self.energy(z0, [z + h for z, h in zip(states, handles)], pasts, past_mask, kappa, targets,
                                          scales)
                return states, handles, E, up, down
            if not need_grad:  # the last step only needs the energy, to accept or reject
                with torch.no_grad():
                    states = [z.detach() for z in states]
                    return (states, None, *self.energy(z0, states, pasts, past_mask, kappa, targets, scales))
            states = [z.detach().requires_grad_(True) for z in states]
            E, up, down = self.energy(z0, states, pasts, past_mask, kappa, targets, scales)
            return states, states, E, up, down

        if max_steps is None:
            max_steps = int(steps.max()) if steps.numel() else 0
        with torch.enable_grad():
            if from_feedforward:
                E, e_up, e_down, grads = self.feedforward_energy(z0, zs, kappa, scales)
                zs = [z.detach() for z in zs]
            else:
                zs, handles, E, e_up, e_down = evaluate(zs)
                grads = None
            E0 = E.detach()
            for t in range(max_steps):
                active &= steps > t
                if not active.any():
                    break
                if grads is None:
                    grads = torch.autograd.grad(E.sum(), handles, create_graph=create_graph)
                move = (step_size * active)[..., None]
                if scales is None:
                    z_new = [torch.addcmul(z, move, g, value=-inv_D[l]) for l, (z, g) in enumerate(zip(zs, grads))]
                else:
                    z_new = [torch.addcmul(z, move * inv_D[l][..., None], g, value=-1.0) for l, (z, g) in enumerate(zip(zs, grads))]
                last = t + 1 == max_steps
                z_new, handles_new, E_new, up_new, down_new = evaluate(z_new, need_grad=not last or create_graph)
                accept = active & (E_new <= E)
                reject = active & ~accept
                grads_new = None if last else torch.autograd.grad(E_new.sum(), handles_new, create_graph=create_graph)
                stalled = None
                if early_stop is not None:
                    stalled = accept & ((E - E_new) < early_stop[:, None] * E.abs())
                used += active.long()
                if bool(accept.all()):
                    # every position moved (the usual case): take the new states as they are,
                    # without the dozen selects below (each a dispatch on small tensors)
                    zs, E, e_up, e_down = z_new, E_new, up_new, down_new
                    if grads_new is not None:
                        grads = grads_new
                else:
                    keep = accept[..., None]
                    zs = [torch.where(keep, zn, zo) for zn, zo in zip(z_new, zs)]
                    if grads_new is not None:
                        grads = [torch.where(keep, gn, go) for gn, go in zip(grads_new, grads)]
                    E = torch.where(accept, E_new, E)
                    e_up = torch.where(keep, up_new, e_up)
                    e_down = torch.where(keep, down_new, e_down)
                    step_size = torch.where(reject, step_size / 2, step_size)
                    rejected += reject.long()
                if stalled is not None:
                    active &= ~stalled
        if not create_graph:
            zs = [z.detach() for z in zs]
        info = {"energy0": E0, "energy": E.detach(), "steps": used, "rejected": rejected,
                "err_up": e_up.detach(), "err_down": e_down.detach()}
        return zs, info

    # --- forward paths --------------------------------------------------------------------------

    def feedforward(self, idx, cache: CachedAttention | None = None):
        """Amortised states [z_0..z_L] (the baseline's residual stream), writing the cache if given."""
        return self.states(idx, cache)

    def parallel_context(self, zs):
        """For every position at once: each layer's amortised keys/values and a strictly-causal
        mask (a position sees the amortised K/V of earlier positions only)."""
        pasts = []
        for l, block in enumerate(self.transformer.h):
            _, k, v = block.attn.qkv(block.ln_1(zs[l]))
            pasts.append((k, v))
        S = zs[0].shape[1]
        pos = torch.arange(S, device=zs[0].device)
        mask = (pos[None, :] < pos[:, None])[None, None]
        return pasts, mask

    def cached_context(self, cache: CachedAttention, query_pos):
        """Each layer's keys/values of the cache's window, and the mask (B, 1, S, kv_len) of the
        positions strictly before each query at query_pos (B, S)."""
        dtype = self.lm_head.weight.dtype
        pasts = [layer.read(dtype) for layer in cache.layers(self.config.n_layer)]
        return pasts, cache.cache.positions[:cache.kv_len] < query_pos[:, None, :, None]

    def _steps(self, settle_steps, batch, device):
        if settle_steps is None:
            settle_steps = self.config.default_settle_steps
        if not isinstance(settle_steps, torch.Tensor):
            settle_steps = torch.full((batch,), int(settle_steps), dtype=torch.long, device=device)
        return settle_steps.to(device=device, dtype=torch.long).view(batch)

    def settled_forward(self, idx, settle_steps=None, alpha=None, create_graph=False, settle_threshold=None):
        """Parallel path (training, evaluation): every position settles at once (adaptively with
        settle_threshold, bits: only where the unsettled entropy reaches it, as forward_cached).
        Returns (settled logits, unsettled logits, info) with per-position info (B, S)."""
        zs = self.feedforward(idx)
        steps = self._steps(settle_steps, idx.shape[0], idx.device)
        if settle_threshold is not None:
            unsure = entropy_bits(self.head(zs[-1])) >= torch.as_tensor(settle_threshold).view(-1, 1)
            steps = torch.where(unsure, steps.view(-1, 1), 0)
        pasts, mask = self.parallel_context(zs)
        kappa = self.kappa()
        settled, info = self.settle(zs[0], zs[1:], pasts, mask, steps, alpha or self.config.alpha,
                                    kappa=kappa.detach() if create_graph else kappa, create_graph=create_graph)
        return self.head(settled[-1]), self.head(zs[-1]), info

    def forward(self, idx, cache: CachedAttention | None = None, settle_steps=None):
        """Logits like GPT.forward; uncached calls settle every position (default steps)."""
        if cache is not None:
            logits, _ = self.forward_cached(idx, cache, settle_steps, last_only=False)
            return logits
        return self.settled_forward(idx, settle_steps)[0]

    def forward_cached(self, idx, cache: CachedAttention, settle_steps=None, max_settle_steps=None,
                       last_only=True, lengths=None, settle_threshold=None, early_stop=None):
        """Serving: the amortised pass writes the cache, then the newest position of each row
        settles (every given position when not last_only; the one at lengths − 1 for right-padded
        rows). settle_steps (B,) or an int (None: the checkpoint's default); max_settle_steps their
        max when the caller knows it on the host (0: nothing settles, and nothing is read back from
        the device). Adaptive settling: with settle_threshold (B,) (bits) a position settles only
        where the entropy of its unsettled prediction is at least its row's threshold (0: always),
        else it takes 0 steps, by the per-position step mask (static shapes); early_stop (B,): the
        fraction per row at which settling stops once the energy stops falling (0: never).
        Returns (logits, stats) with per-row stats (per position when not last_only)."""
        zs = self.feedforward(idx, cache)
        query_pos = cache.input_pos
        if last_only:
            zs = [last_positions(z, lengths)[:, None] for z in zs]
            query_pos = last_positions(query_pos, lengths)[:, None]
        steps = self._steps(settle_steps, idx.shape[0], idx.device)
        if max_settle_steps is None:  # not known on the host: read it back
            max_settle_steps = int(steps.max())
        if max_settle_steps == 0:
            # nothing settles: the baseline's logits, and the feed-forward energy from the
            # generators alone (no cache reads, no gradient, the head once)
            logits = self.head(zs[-1])
            stats = self.uncertainty(logits, logits, self.unsettled_info(zs))
        else:
            logits0 = self.head(zs[-1])
            if settle_threshold is not None:
                steps = torch.where(entropy_bits(logits0) >= settle_threshold.view(-1, 1), steps.view(-1, 1), 0)
            pasts, mask = self.cached_context(cache, query_pos)
            settled, info = self.settle(zs[0], zs[1:], pasts, mask, steps, self.config.alpha,
                                        max_steps=max_settle_steps, early_stop=early_stop)
            logits = self.head(settled[-1])
            stats = self.uncertainty(logits, logits0, info)
        if last_only:
            return logits[:, 0], {k: v[:, 0] for k, v in stats.items()}
        return logits, stats

    def unsettled_info(self, zs) -> dict:
        """settle()'s info for zero steps at the feed-forward states, where the bottom-up errors
        are zero by construction and the energy is the generators' top-down part."""
        scales = self.state_scales(zs[0], zs[1:]) if self.config.ln_precision else None
        down = [below - gen(z) for gen, below, z in zip(self.generators, zs[:-1], zs[1:])]
        E, e_up, e_down = self.error_energy(None, down, self.kappa(), scales)
        zeros = torch.zeros(E.shape, dtype=torch.long, device=E.device)
        return {"energy0": E, "energy": E, "steps": zeros, "rejected": zeros, "err_up": e_up, "err_down": e_down}

    def uncertainty(self, logits, logits0, info) -> dict:
        """Per-position diagnostics of the settling, in the units the API reports."""
        units = self.config.n_layer * self.config.n_embd
        d = self.config.n_embd
        if logits is logits0:  # nothing settled
            kl = logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
        else:
            logp, logp0 = F.log_softmax(logits.float(), -1), F.log_softmax(logits0.float(), -1)
            kl = (logp.exp() * (logp - logp0)).sum(-1).clamp_min(0) / math.log(2)
        return {
            "energy0": info["energy0"] / units,  # energy per free unit before settling
            "energy": info["energy"] / units,  # ... and after
            "kl_settle": kl,  # bits
            "steps": info["steps"],
            "rejected": info["rejected"],
            "err_up": (info["err_up"] / d).sqrt(),  # RMS bottom-up error per layer (L,)
            "err_down": (info["err_down"] / d).sqrt(),  # RMS top-down error per layer (L,)
        }

    # --- training -------------------------------------------------------------------------------

    def loss_options(self, cfg) -> dict:
        return {"k_max": cfg.pc_k_max, "lambda0": cfg.pc_lambda0, "lambda_energy": cfg.pc_lambda_energy,
                "alpha": cfg.pc_alpha, "learning": cfg.pc_learning}

    def loss(self, idx, targets, k_max=2, lambda0=0.5, lambda_energy=0.01, alpha=0.25, learning="backprop"):
        """CE of the settled prediction (through K ~ U{0..k_max} unrolled steps) + λ0·CE of the
        unsettled one + λE·free energy at the detached settled states. κ stays out of the CE
        path (detached there) so the task loss cannot switch settling off; it learns only from
        the free energy, whose minimum is κ* = d / E‖δ‖²."""
        if learning == "local":
            return self.local_loss(idx, targets, k_max=k_max, alpha=alpha)
        K = int(torch.randint(0, k_max + 1, ()).item()) if k_max > 0 else 0
        V = self.config.vocab_size
        zs = self.feedforward(idx)
        pasts, mask = self.parallel_context(zs)
        steps = torch.full((idx.shape[0],), K, dtype=torch.long, device=idx.device)
        scales = self.state_scales(zs[0], zs[1:]) if self.config.ln_precision else None
        settled, info = self.settle(zs[0], zs[1:], pasts, mask, steps, alpha,
                                    kappa=self.kappa().detach(), create_graph=True, scales=scales)
        ce_settled = F.cross_entropy(self.head(settled[-1]).view(-1, V), targets.view(-1))
        ce0 = F.cross_entropy(self.head(zs[-1]).view(-1, V), targets.view(-1)) if K > 0 else ce_settled
        free = self.free_energy(zs[0].detach(), [z.detach() for z in settled], pasts, mask, scales)
        loss = ce_settled + lambda0 * ce0 + lambda_energy * free
        return loss, {"K": K, "ce": ce_settled.item(), "F": free.item(), "kappa": self.kappa().mean().item()}

    def free_energy(self, z0, zs, pasts, past_mask, scales=None):
        """Mean per position of E plus the law's normaliser (nll_normaliser: −(d/2)·log κ_l, and
        Student-t's ν terms), per unit: its gradient trains f_l to predict z_l, g_l to predict
        z_{l−1}, and κ_l (ν_l) their likelihood."""
        kappa = self.kappa()
        E, _, _ = self.energy(z0, zs, [(k.detach(), v.detach()) for k, v in pasts], past_mask, kappa, scales=scales)
        return (E + self.nll_normaliser(kappa)).mean() / self.config.n_embd

    def local_loss(self, idx, targets, k_max=2, alpha=0.25):
        """Local learning (iPC-style): settle the states with the target clamped at the output
        (the readout's CE joins the energy, so the task reaches the hidden states), then update
        each block, generator and precision from its own error only (states detached), and the
        readout from its CE at the detached top state."""
        with torch.no_grad():
            zs = self.feedforward(idx)
            pasts, mask = self.parallel_context(zs)
        zs = [z.detach() for z in zs]
        pasts = [(k.detach(), v.detach()) for k, v in pasts]
        steps = torch.full((idx.shape[0],), k_max, dtype=torch.long, device=idx.device)
        scales = self.state_scales(zs[0], zs[1:]) if self.config.ln_precision else None
        settled, _ = self.settle(zs[0], zs[1:], pasts, mask, steps, alpha, kappa=self.kappa().detach(), targets=targets,
                                 scales=scales)
        states = [zs[0]] + settled
        loss = self.local_terms(states, pasts, mask, targets, scales)
        return loss, {"K": k_max}

    def local_terms(self, states, pasts, mask, targets, scales=None):
        """Σ_l own-error terms of each part at detached states: block l's bottom-up error,
        generator l's top-down error with its precision's likelihood (the law's NLL), and the
        readout CE."""
        kappa = self.kappa()
        law = self.config.error_law
        nu = self.nu() if law == "student_t" else None
        d = self.config.n_embd
        total = 0.0
        for l, (block, gen) in enumerate(zip(self.transformer.h, self.generators)):
            below, here = states[l].detach(), states[l + 1].detach()
            k_past, v_past = pasts[l]
            e_up = here - block(below, PastAttention(k_past.detach(), v_past.detach(), mask))
            e_down = below - gen(here)
            if scales is not None:
                e_up, e_down = e_up * scales[..., l + 1, None], e_down * scales[..., l, None]
            nu_l = None if nu is None else nu[l]
            total = total + error_nll(e_up, 1.0, law, nu_l).mean() / d
            total = total + (error_nll(e_down, kappa[l], law, nu_l).mean() - 0.5 * d * torch.log(kappa[l])) / d
            if nu is not None:  # the normaliser of layer l's two Student-t terms
                total = total + 2 * student_t_log_normaliser(nu_l)
        logits = self.head(states[-1].detach())
        return total + F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def eval_loss(self, idx, targets):
        logits, _, _ = self.settled_forward(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
