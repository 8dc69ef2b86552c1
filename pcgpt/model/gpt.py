"""The baseline GPT: nanoGPT's model, parameter for parameter, with a slot-based KV cache.

Parameter names follow nanoGPT (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...), so
nanoGPT's `ckpt.pt` and (after the Conv1D transposes) HuggingFace GPT-2 weights load unchanged.

Two paths, one computation:
  - training / evaluation: `model(idx)` over whole sequences through the modules, causal
    attention, no cache;
  - serving: `model.forward_cached(idx, input_pos, kv_cache, slots)` runs `cached_block` over each
    block's tensors (looked up once, not through module calls per step): prefill writes the
    prompt's K/V into cache slots, decode is the same call with one new token per row, each row at
    its own position.
Tests hold them together: cached logits equal the uncached ones.
"""

import math
from dataclasses import dataclass, asdict, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcgpt.model.hugepages import empty_on_huge_pages


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (context length) the position table covers
    vocab_size: int = 50257  # number of token ids the embedding and the head cover
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must divide by it
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout probability during training; inference always runs without
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
    gelu_approximate: str = "none"  # "none" = exact erf GELU (nanoGPT); "tanh" = GPT-2's gelu_new (HF weights)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Builds a config from a dict, ignoring keys this config does not know (nanoGPT adds none today)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# GPT-2 sizes as OpenAI released them, plus small shapes that train and run on a CPU.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257, bias=True),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257, bias=True),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257, bias=True),
    # the shipped Shakespeare char models (vocab_size comes from the data: 65 characters)
    "char-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=65, bias=False),
    # nanoGPT's train_shakespeare_char.py shape, for those with more time
    "char-baby": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False),
    # for tests: a model that builds and runs in milliseconds
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97, bias=True),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


def apply_dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """module(x) when it drops anything: at inference even a no-op dropout is a dispatched op, and a
    small model's decode step is dispatch-bound."""
    return module(x) if module.training and module.p > 0 else x


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Preallocated keys and values for `n_slots` independent sequences.

    Shape per tensor: (n_layer, n_slots, n_head, max_len, head_dim). A request owns one slot
    for its whole life; rows of a batch name their slots and positions explicitly, so rows at
    different lengths decode together and nothing is reallocated while decoding.
    """

    def __init__(self, config: GPTConfig, n_slots: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        self.n_slots = n_slots
        self.max_len = max_len or config.block_size
        shape = (config.n_layer, n_slots, config.n_head, self.max_len, config.head_dim)
        if torch.device(device or "cpu").type == "cpu":
            # every decode step reads each row's keys and values: on huge pages, as the weights are
            self.k = empty_on_huge_pages(shape, dtype).zero_()
            self.v = empty_on_huge_pages(shape, dtype).zero_()
        else:
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        # each layer's view taken once: indexing self.k[layer] per access is one more op each time
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bytes_per_token(self) -> int:
        """K and V of one position in one slot, over all layers."""
        return self.nbytes // (self.n_slots * self.max_len)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, ctx: "CacheContext") -> None:
        """Stores k/v (B, H, S, D) of a forward's rows ctx.slots at positions ctx.input_pos (B, S)."""
        if isinstance(ctx.rows, slice) and ctx.positions is not None:
            # contiguous slots all writing the same positions: a copy into a view, no scatter
            # (a batch-1 step, or a batch whose rows are level; cheaper between large GEMVs)
            self.k_layers[layer][ctx.rows, :, ctx.positions] = k
            self.v_layers[layer][ctx.rows, :, ctx.positions] = v
            return
        rows = ctx.slots[:, None]
        # advanced indices on dims 0 and 2 with a slice between: the indexed view is (B, S, H, D)
        self.k_layers[layer][rows, :, ctx.input_pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v_layers[layer][rows, :, ctx.input_pos] = v.transpose(1, 2).to(self.v.dtype)

    def read(self, layer: int, rows, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, length, D) of positions [0, length) for cache rows `rows`
        (slot_rows(slots): one forward works out its rows once for every layer)."""
        return self.k_layers[layer][rows, :, :length], self.v_layers[layer][rows, :, :length]


def slot_rows(slots: torch.Tensor):
    """The index that reads rows `slots` of the cache: a slice (a view, no gather) when the batch
    is slots a, a+1, ..., a+B-1 (the common case), else the slots tensor itself."""
    if _is_contiguous_range(slots):
        start = int(slots[0])
        return slice(start, start + slots.shape[0])
    return slots


def _is_contiguous_range(slots: torch.Tensor) -> bool:
    if slots.device.type != "cpu":
        return False
    n = slots.shape[0]
    return n > 0 and bool((slots == torch.arange(int(slots[0]), int(slots[0]) + n)).all())


def last_positions(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, ...) of x (B, S, ...) at each row's last token: S − 1, or lengths − 1 for right-padded rows."""
    if lengths is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]


def attention_mask(input_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean mask (B, 1, S, length): a query at position p sees keys at positions <= p."""
    key_pos = torch.arange(length, device=input_pos.device)
    return (key_pos[None, None, None, :] <= input_pos[:, None, :, None])


@dataclass
class CacheContext:
    """What every layer's cached attention shares within one forward, computed once per forward
    rather than once per layer (on a small model these small ops are much of a decode step)."""

    slots: torch.Tensor  # (B,) the cache row of each batch row
    input_pos: torch.Tensor  # (B, S) the position of each new token
    length: int  # keys read: positions [0, length), the furthest row's
    mask: torch.Tensor | None  # (B, 1, S, length) or None when every query sees every key read
    rows: object  # slot_rows(slots)
    positions: slice | None = None  # the positions every row writes, when they are the same range

    @property
    def batch(self) -> int:
        return self.input_pos.shape[0]

    @property
    def seq(self) -> int:
        return self.input_pos.shape[1]

    @classmethod
    def build(cls, slots: torch.Tensor, input_pos: torch.Tensor) -> "CacheContext":
        length = int(input_pos.max()) + 1
        positions = None
        if input_pos.shape[1] == 1 and bool((input_pos == length - 1).all()):
            mask = None  # one query per row, all rows at the last position: nothing to mask
            positions = slice(length - 1, length)
        else:
            mask = attention_mask(input_pos, length)
            S = input_pos.shape[1]
            if length == S and bool((input_pos == torch.arange(S, device=input_pos.device)).all()):
                positions = slice(0, S)  # prompts from position 0 (prefill)
        return cls(slots, input_pos, length, mask, slot_rows(slots), positions)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def qkv(self, x):
        """Queries, keys and values (B, H, S, D) of the states x (B, S, C)."""
        B, S, C = x.shape
        # one view, one permute, one unbind: the same strided views as split + 3 × (view, transpose)
        q, k, v = self.c_attn(x).view(B, S, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def attend(self, q, k, v):
        """Causal attention output projected back to the residual stream."""
        B, H, S, D = q.shape
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, S, H * D)
        return apply_dropout(self.resid_dropout, self.c_proj(y))

    def forward(self, x):
        return self.attend(*self.qkv(x))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return apply_dropout(self.dropout, self.c_proj(gelu(self.c_fc(x), self.approximate)))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def tensors(self) -> "BlockTensors":
        return BlockTensors((self.ln_1.weight, self.ln_1.bias), LinearTensors.of(self.attn.c_attn),
                            LinearTensors.of(self.attn.c_proj), (self.ln_2.weight, self.ln_2.bias),
                            LinearTensors.of(self.mlp.c_fc), LinearTensors.of(self.mlp.c_proj))


# --- the cached forward (prefill and decode) on plain tensors ------------------------------------
# Serving runs the blocks below rather than the modules above: the same computation, with each
# block's tensors looked up once (GPT.block_tensors) instead of through nn.Module calls and
# attribute lookups every step. Between the weight streams of a CPU decode step those cost more
# than the arithmetic: a GPT-2 batch-1 step 20.2 -> 18.1 ms (BENCHMARKS.md). The equivalence
# tests (cached == uncached) hold the two paths together.


def packed_linear(x, packed, bias):
    """x @ weight.T + bias with oneDNN's prepacked bf16 weight (no backward)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class LinearTensors(NamedTuple):
    """One nn.Linear as the cached forward applies it."""
    weight_t: torch.Tensor  # weight.t(): [in, out], what addmm reads (contiguous after to_inference_layout)
    bias: torch.Tensor | None
    packed: torch.Tensor | None  # PrepackedLinear's oneDNN copy, else None

    @classmethod
    def of(cls, module: nn.Linear) -> "LinearTensors":
        return cls(module.weight.t(), module.bias, getattr(module, "packed", None))

    def __call__(self, x):
        """x (N, in) @ weight.T + bias."""
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)


class BlockTensors(NamedTuple):
    """One block's tensors for the cached forward."""
    ln_1: tuple  # (weight, bias) of the layer norm before attention
    c_attn: LinearTensors  # queries, keys and values
    attn_proj: LinearTensors  # attention output back to the residual stream
    ln_2: tuple  # (weight, bias) of the layer norm before the MLP
    c_fc: LinearTensors
    mlp_proj: LinearTensors


class without_onednn:
    """oneDNN off while the block runs (process-wide: another thread's op in that moment takes
    ATen's kernel too, which computes the same function). On CPU PyTorch hands exact-erf GELU and
    its backward to oneDNN, whose per-call set-up dominates at decode sizes: GELU of 3,072 fp32
    elements 8.9 us against ATen's 2.6 us hot, ~40 us a layer inside a GPT-2 decode step; the
    backward 26 us a call in a PC settle step (BENCHMARKS.md)."""

    def __enter__(self):
        self.enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)

    def __exit__(self, *exc):
        torch._C._set_mkldnn_enabled(self.enabled)


def gelu(x, approximate: str):
    """F.gelu on ATen's kernel (see without_onednn)."""
    with without_onednn():
        return F.gelu(x, approximate=approximate)


def block_qkv(x, w: BlockTensors, batch: int, seq: int, n_head: int):
    """Queries, keys and values (B, H, S, D) of a block's rows x (B·S, C): ln_1, then c_attn."""
    C = x.shape[1]
    h = F.layer_norm(x, (C,), *w.ln_1, 1e-5)
    return w.c_attn(h).view(batch, seq, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4).unbind(0)


def block_after_attention(x, y, w: BlockTensors, approximate: str):
    """The rest of a block for rows x (B·S, C) once attention gave y (B, H, S, D): the output
    projection and the MLP, each added to the residual stream."""
    B, H, S, D = y.shape
    x = w.attn_proj(y.transpose(1, 2).reshape(B * S, H * D)) + x
    h = F.layer_norm(x, (x.shape[1],), *w.ln_2, 1e-5)
    return w.mlp_proj(gelu(w.c_fc(h), approximate)) + x


def cached_block(x, w: BlockTensors, layer: int, kv_cache: "KVCache", ctx: CacheContext, config: GPTConfig):
    """Block.forward for rows x (B·S, C) of a cached forward: the new keys and values go into the
    cache, attention reads each row's history from it."""
    q, k, v = block_qkv(x, w, ctx.batch, ctx.seq, config.n_head)
    kv_cache.write(layer, k, v, ctx)
    # only the window up to the furthest position in the batch takes part
    k_all, v_all = kv_cache.read(layer, ctx.rows, ctx.length)
    if k_all.dtype != q.dtype:
        k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=ctx.mask)
    return block_after_attention(x, y, w, config.gelu_approximate)


def onednn_bf16_available() -> bool:
    """oneDNN with native bf16 on this CPU (AVX512-BF16 or AMX): where prepacked bf16 pays."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PrepackedLinear(nn.Linear):
    """An nn.Linear for bf16 inference on CPU: the same weight and bias Parameters (so names,
    shapes, state_dict and the wte / lm_head tie are unchanged) plus a copy of the weight
    prepacked in oneDNN's blocked layout, which its AMX / AVX512-BF16 kernels read at close to
    memory speed (the copy costs the weight's bytes again). Calls that build a graph through the
    input (PC settling differentiates through the blocks) take F.linear: the prepacked kernel has
    no backward."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "PrepackedLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), 1)
        return module

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.bias)


class GPT(nn.Module):
    model_type = "gpt"

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying, as GPT-2 and nanoGPT do
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.register_load_state_dict_post_hook(self.forget_tensors)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by nanoGPT's convention the position table is left out by default
        (the token table counts, because it doubles as the output head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward FLOPs for one token attending to `context` positions (default the full block)."""
        c = self.config
        T = context or c.block_size
        return 2 * self.num_params() + 4 * c.n_layer * c.n_embd * T

    def kv_bytes_per_token(self, dtype=torch.float32) -> int:
        c = self.config
        return 2 * c.n_layer * c.n_embd * torch.tensor([], dtype=dtype).element_size()

    def embed(self, idx, input_pos=None):
        """z_0: token plus position embedding of idx (B, S)."""
        if input_pos is None:
            input_pos = torch.arange(idx.shape[1], device=idx.device)[None, :]
        if int(input_pos.max()) >= self.config.block_size:
            raise ValueError(f"position {int(input_pos.max())} is beyond the context of {self.config.block_size}")
        return apply_dropout(self.transformer.drop, self.transformer.wte(idx) + self.transformer.wpe(input_pos))

    def head(self, x):
        """Logits of the final residual states x (..., C)."""
        return self.lm_head(self.transformer.ln_f(x))

    def forward(self, idx, input_pos=None, kv_cache=None, slots=None):
        """Logits (B, S, V) for tokens idx (B, S).

        Without a cache: causal attention over the whole sequence (training, evaluation).
        With a cache: `input_pos` (B, S) gives each token's position and `slots` (B,) the cache
        row of each sequence; the new K/V are stored and attention reads the slot's history.
        """
        if kv_cache is not None:
            assert input_pos is not None and slots is not None, "cached forward needs input_pos and slots"
            return self.forward_cached(idx, input_pos, kv_cache, slots, last_only=False)[0]
        x = self.embed(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.head(x)

    def cached_states(self, x, input_pos, kv_cache, slots) -> list[torch.Tensor]:
        """The residual stream after each block of a cached forward from the embeddings x
        (B, S, C), as rows (B·S, C)."""
        ctx = CacheContext.build(slots, input_pos)
        x = x.reshape(-1, x.shape[-1])
        states = []
        for layer, tensors in enumerate(self.block_tensors()):
            x = cached_block(x, tensors, layer, kv_cache, ctx, self.config)
            states.append(x)
        return states

    def forward_cached(self, idx, input_pos, kv_cache, slots, settle_steps=None, last_only=True, lengths=None):
        """Cached forward for serving: (logits, stats). Logits are (B, V) of each row's last
        token when last_only, else (B, S, V); `lengths` (B,) marks right-padded rows, whose last
        token is then at lengths − 1. The baseline has no per-token stats and no settling;
        `settle_steps` is accepted so both model types share one call."""
        x = self.cached_states(self.embed(idx, input_pos), input_pos, kv_cache, slots)[-1].view(*idx.shape, -1)
        # the output head is the largest matmul for a small model: run it only where needed
        return self.head(last_positions(x, lengths) if last_only else x), {}

    # the tensors the cached forward (inference only: it writes the cache in place) uses, looked up
    # once and dropped whenever the parameters may have moved (.to(), load_state_dict,
    # to_inference_layout)
    _block_tensors: list | None = None

    def block_tensors(self) -> list["BlockTensors"]:
        if self._block_tensors is None:
            self._block_tensors = [block.tensors() for block in self.transformer.h]
        return self._block_tensors

    def forget_tensors(self, *_):
        self._block_tensors = None

    def __getstate__(self):
        # a copy (deepcopy, pickle) gets Parameters of its own: views of these would be stale there
        return {**super().__getstate__(), "_block_tensors": None}

    def _apply(self, fn, *args, **kwargs):
        self.forget_tensors()
        return super()._apply(fn, *args, **kwargs)

    def loss(self, idx, targets):
        """Training loss: mean next-token cross-entropy (nats); returns (loss, extra info)."""
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)), {}

    def eval_loss(self, idx, targets):
        return self.loss(idx, targets)[0]

    def set_dropout(self, p: float) -> None:
        """Dropout for a training run (a checkpoint is saved and served without)."""
        self.config.dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            if isinstance(module, CausalSelfAttention):
                module.attn_dropout = p

    @torch.no_grad()
    def to_inference_layout(self) -> "GPT":
        """The weight layout the CPU kernels stream fastest, with every name, shape, value and the
        wte / lm_head tie unchanged. For serving: training keeps the usual layout.

        fp32: each matrix stored [in, out] (a transposed view of a transposed copy), the layout BLAS
        reads fastest for a few rows: a batch-1 GPT-2 decode step ~6% faster, the lm_head ~15%
        (HF's Conv1D keeps GPT-2 this way); the copies on huge pages where Linux offers them
        (model/hugepages.py), ~4% more. bf16 on a CPU with native bf16 (AVX512-BF16 / AMX):
        each nn.Linear becomes a PrepackedLinear: a GPT-2 decode step 1.4× (batch 1) to 2.3×
        (batch 16-64) fp32's, where bf16 through F.linear is no faster than fp32 (BENCHMARKS.md).
        Other devices keep their layout."""
        self.forget_tensors()
        if self.lm_head.weight.device.type != "cpu":
            return self
        if self.lm_head.weight.dtype == torch.float32:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    weight = module.weight.data
                    stored = empty_on_huge_pages((weight.shape[1], weight.shape[0]))
                    module.weight.data = stored.copy_(weight.t()).t()
        elif self.lm_head.weight.dtype == torch.bfloat16 and onednn_bf16_available():
            for parent in list(self.modules()):
                for name, child in parent.named_children():
                    if type(child) is nn.Linear:
                        setattr(parent, name, PrepackedLinear.wrap(child))
        return self

    def weight_bytes(self) -> int:
        """Bytes the weights hold in memory: parameters, buffers and any prepacked copies."""
        tensors = [*self.parameters(), *self.buffers()]
        packed = sum(m.weight.numel() * m.weight.element_size() for m in self.modules() if isinstance(m, PrepackedLinear))
        return sum(t.numel() * t.element_size() for t in tensors) + packed

    def new_cache(self, n_slots: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, n_slots, max_len, device=device or p.device, dtype=dtype or p.dtype)
