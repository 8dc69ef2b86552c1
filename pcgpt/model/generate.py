"""Prefill and decode, as separate functions, and the one-request generation loop.

Both model types serve through `model.forward_cached(idx, cache, settle_steps, max_settle_steps,
last_only, lengths) -> (logits, stats)` over a KVCache.attention view; the baseline returns no
stats, the PC model its settling diagnostics per row. Generation runs under no_grad rather than
inference_mode: the PC model takes gradients with respect to its states while settling, which
inference_mode forbids.
"""

from typing import Iterator

import torch

from pcgpt.model.formats import inference_kernels
from pcgpt.model.sampling import BatchSampling, SamplingParams, apply_penalties, make_generator, sample_from_logits


def _check_context(model, length: int) -> None:
    if length > model.config.block_size:
        raise ValueError(f"position {length - 1} is beyond the context of {model.config.block_size}")


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, kv_cache, slot: int, settle_steps: int | None = None,
            all_logits: bool = False, adaptive: dict | None = None):
    """Runs the prompt (S,) through the model into cache slot `slot`.

    Returns (logits, stats): logits (V,) of the last position, or (S, V) for every position
    when all_logits (echo with prompt logprobs); stats hold the last position's diagnostics.
    adaptive: PC models' adaptive settling, {"settle_threshold": (1,), "early_stop": (1,)}
    (PCGPT.forward_cached), or None.
    """
    idx = prompt.view(1, -1)
    S = idx.shape[1]
    _check_context(model, S)
    input_pos = torch.arange(S, device=idx.device).view(1, -1)
    slots = torch.tensor([slot], device=idx.device)
    logits, stats = model.forward_cached(idx, kv_cache.attention(input_pos, S, slots),
                                         settle_steps=_as_row_tensor(settle_steps, 1, idx.device),
                                         last_only=not all_logits, **(adaptive or {}))
    return logits[0], {k: v[0] for k, v in stats.items()}


@torch.no_grad()
def prefill_batch(model, prompts: list[torch.Tensor], kv_cache, slots: torch.Tensor,
                  settle_steps: torch.Tensor | None = None, adaptive: dict | None = None):
    """Several prompts (each (S_b,)) in one forward, right-padded to the longest, into cache rows
    `slots` (B,). Returns (logits (B, V) at each row's last prompt token, stats per row).

    A padded row's queries see only its own earlier positions (causal), and the K/V its padding
    writes lie past its prompt, where its first decode steps overwrite them before reading."""
    device = prompts[0].device
    lengths_host = [p.shape[0] for p in prompts]
    S = max(lengths_host)
    _check_context(model, S)
    lengths = torch.tensor(lengths_host, device=device)
    idx = torch.zeros(len(prompts), S, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        idx[row, :p.shape[0]] = p
    input_pos = torch.arange(S, device=device).expand(len(prompts), S)
    slots = torch.as_tensor(slots, device=device)
    return model.forward_cached(idx, kv_cache.attention(input_pos, S, slots), settle_steps=settle_steps,
                                last_only=True, lengths=lengths, **(adaptive or {}))


# The attended window of a decode step is rounded up to a bucket: the step's shapes then change only
# at bucket boundaries (torch.compile and CUDA graphs capture one graph per (batch bucket, window)
# pair), at the cost of attending over masked positions up to the boundary. On CPU attention over
# the window is a visible part of a batched step, so buckets grow with the length: multiples of
# KV_LEN_BUCKET up to 8·KV_LEN_BUCKET, then 4 buckets per doubling (fewer masked positions than a
# quarter of the length): 20 windows cover a 1,024-position context.
KV_LEN_BUCKET = 16


def kv_len_bucket(length: int, max_len: int) -> int:
    """The window a decode step attends over when its furthest row holds `length` positions
    (the new token included): `length` rounded up to its bucket, at most the cache's max_len."""
    step = max(KV_LEN_BUCKET, 1 << max(0, (length - 1).bit_length() - 3))
    return min(max_len, -(-length // step) * step)


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache, settle_steps=None,
                kv_len: int | None = None, max_settle_steps: int | None = None, adaptive: dict | None = None):
    """One new token per row of a decode batch whose row b is cache slot b (B <= kv_cache.n_slots;
    rows of free slots are padding: whatever they compute is ignored, and a slot is rewritten by
    its next prefill). tokens and input_pos are (B,) on the model's device, every position below
    the context length (the caller's guarantee: nothing is read back to check it); kv_len (host
    int, from kv_len_bucket; None: the whole cache) is the attended window, so the step's shapes
    depend on (B, kv_len) only. settle_steps (B,) (PC models; None = the checkpoint's default) with
    max_settle_steps, the host's own max over the rows: 0 takes the unsettled path without a device
    read. adaptive (PC models): {"settle_threshold": (B,), "early_stop": (B,)}, adaptive settling
    per row (PCGPT.forward_cached), or None. Returns (logits (B, V), stats)."""
    cache = kv_cache.attention(input_pos.view(-1, 1), kv_cache.max_len if kv_len is None else kv_len)
    return model.forward_cached(tokens.view(-1, 1), cache, settle_steps=settle_steps,
                                max_settle_steps=max_settle_steps, last_only=True, **(adaptive or {}))


def _as_row_tensor(value, rows: int, device):
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.full((rows,), int(value), device=device, dtype=torch.long)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams | None = None,
             settle_steps: int | None = None, eos_id: int | None = None,
             vocab_size: int | None = None) -> Iterator[tuple[int, torch.Tensor, dict]]:
    """Yields (token, logits, stats) for each new token of one request, KV-cached.

    The same prefill, decode and sampling functions the server's engine batches, one row here.
    vocab_size: the tokenizer's; logits past it are dropped (nanoGPT pads GPT-2's 50257 to 50304,
    and a padding id has no text).
    """
    params = params or SamplingParams()
    device = model.lm_head.weight.device
    block = model.config.block_size
    if not prompt_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    if len(prompt_ids) + max_new_tokens > block:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context length {block}")
    cache = model.new_cache(1, max_len=len(prompt_ids) + max_new_tokens)
    prompt = torch.tensor(prompt_ids, device=device, dtype=torch.long)
    batch = BatchSampling.from_params([params], device)
    generator = [make_generator(params.seed, device)]
    vocab = vocab_size or model.config.vocab_size
    prompt_mask = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    prompt_mask[0, prompt] = True
    counts = torch.zeros(1, vocab, dtype=torch.long, device=device)

    with inference_kernels(model.lm_head.weight):
        logits, stats = prefill(model, prompt, cache, 0, settle_steps)
    logits = logits.view(1, -1)
    pos = len(prompt_ids)
    steps = None if settle_steps is None else torch.tensor([settle_steps], device=device)
    for i in range(max_new_tokens):
        raw = logits[:, :vocab].float()
        penalized = apply_penalties(raw, prompt_mask, counts, batch) if batch.use_penalties else raw
        token = sample_from_logits(penalized, batch, generator)
        yield int(token), raw[0], stats
        if eos_id is not None and int(token) == eos_id:
            return
        counts[0, token] += 1
        if i + 1 == max_new_tokens:
            return
        with inference_kernels(model.lm_head.weight):
            logits, stats = decode_step(model, token, torch.tensor([pos], device=device), cache, steps,
                                        kv_len=kv_len_bucket(pos + 1, cache.max_len),
                                        max_settle_steps=settle_steps)
        stats = {k: v[0] for k, v in stats.items()}
        pos += 1
