"""The baseline GPT: nanoGPT's model, parameter for parameter, with a slot-based KV cache.

Parameter names follow nanoGPT (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...), so
nanoGPT's `ckpt.pt` and (after the Conv1D transposes) HuggingFace GPT-2 weights load unchanged.

One forward path, gpt-fast style: the blocks take an optional attention context. Without one
(training, evaluation) attention is causal over the sequence; with a cache's (serving) each
layer writes its new keys and values into the cache rows of the batch and attends over a window
of them, masked per row by position on the device, so a decode step's shapes depend only on the
batch size and the window. CPU weight layouts are module swaps applied at load (formats.py).
"""

import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # each layer's view taken once: indexing self.k[layer] per access is one more op each time
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)
        # made once, sliced per forward (a small model's step is dominated by such small ops): the
        # key positions, and where each (slot, head)'s position 0 lies in a layer seen as rows of D
        H = config.n_head
        self.positions = torch.arange(self.max_len, device=self.k.device)
        slot_heads = torch.arange(n_slots, device=self.k.device)[:, None] * H + torch.arange(H, device=self.k.device)
        self.row_offsets = (slot_heads * self.max_len)[:, :, None]  # (n_slots, H, 1)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bytes_per_token(self) -> int:
        """K and V of one position in one slot, over all layers."""
        return self.nbytes // (self.n_slots * self.max_len)

    def attention(self, input_pos: torch.Tensor, kv_len: int, slots: torch.Tensor | None = None) -> "CachedAttention":
        """What one cached forward's layers share: new tokens at positions input_pos (B, S) of cache
        rows `slots` (B,) (None: rows 0..B-1, the decode batch), attending to positions [0, kv_len)."""
        return CachedAttention(self, input_pos, kv_len, slots)


class CachedAttention:
    """One cached forward's view of the KV cache: which rows, which positions are written, which
    window is read, and the mask over it, built once on the device for every layer. Shapes depend
    only on (B, S, kv_len), never on the positions' values: a decode step is capturable."""

    def __init__(self, cache: KVCache, input_pos: torch.Tensor, kv_len: int, slots: torch.Tensor | None):
        if kv_len > cache.max_len:
            raise ValueError(f"window of {kv_len} positions is beyond the cache's {cache.max_len}")
        self.cache, self.input_pos, self.kv_len, self.slots = cache, input_pos, kv_len, slots
        B, S = input_pos.shape
        self.mask = cache.positions[:kv_len] <= input_pos.view(B, 1, S, 1)  # (B, 1, S, kv_len): causal per row
        self._additive_masks = {}
        # where the new keys/values go, as rows of a layer's cache seen as (slots·H·max_len, D): one
        # index_copy_ a layer, whatever the rows' slots and positions
        offsets = cache.row_offsets[:B] if slots is None else cache.row_offsets[slots]
        self.write_index = (offsets + input_pos.view(B, 1, S)).view(-1)

    def additive_mask(self, dtype) -> torch.Tensor:
        """The mask as 0 / −inf in `dtype`, made once per forward: given a boolean mask, attention
        would convert it in every layer."""
        if dtype not in self._additive_masks:
            self._additive_masks[dtype] = torch.where(self.mask, 0.0, float("-inf")).to(dtype)
        return self._additive_masks[dtype]

    def layer(self, layer: int) -> "LayerCache":
        return LayerCache(self, self.cache.k_layers[layer], self.cache.v_layers[layer])

    def layers(self, n: int) -> list["LayerCache"]:
        return [self.layer(l) for l in range(n)]


class LayerCache:
    """The attention context of one layer in a cached forward: stores the new keys and values,
    then attends over the cached window."""
    __slots__ = ("ctx", "k_cache", "v_cache")

    def __init__(self, ctx: CachedAttention, k_cache: torch.Tensor, v_cache: torch.Tensor):
        self.ctx, self.k_cache, self.v_cache = ctx, k_cache, v_cache

    def write(self, k, v) -> None:
        """k, v (B, H, S, D) at positions ctx.input_pos of the forward's rows."""
        ctx = self.ctx
        if k.dtype != self.k_cache.dtype:
            k, v = k.to(self.k_cache.dtype), v.to(self.v_cache.dtype)
        D = k.shape[-1]
        self.k_cache.view(-1, D).index_copy_(0, ctx.write_index, k.reshape(-1, D))
        self.v_cache.view(-1, D).index_copy_(0, ctx.write_index, v.reshape(-1, D))

    def read(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, kv_len, D) of the window, for the forward's rows."""
        ctx = self.ctx
        if ctx.slots is None:
            B = ctx.input_pos.shape[0]
            k, v = self.k_cache[:B, :, :ctx.kv_len], self.v_cache[:B, :, :ctx.kv_len]
        else:
            k, v = self.k_cache[ctx.slots, :, :ctx.kv_len], self.v_cache[ctx.slots, :, :ctx.kv_len]
        if k.dtype != dtype:
            k, v = k.to(dtype), v.to(dtype)
        return k, v

    def attend(self, q, k, v):
        self.write(k, v)
        # bf16 on a CPU attends in fp32: ATen's CPU attention kernel is several times slower in
        # bf16 than in fp32 for a decode step's one query per row, more than the window's upcast costs
        dtype = torch.float32 if q.dtype == torch.bfloat16 and q.device.type == "cpu" else q.dtype
        k_all, v_all = self.read(dtype)
        y = F.scaled_dot_product_attention(q.to(dtype), k_all, v_all, attn_mask=self.ctx.additive_mask(dtype))
        return y.to(q.dtype)


def last_positions(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, ...) of x (B, S, ...) at each row's last token: S − 1, or lengths − 1 for right-padded rows."""
    if lengths is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]


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

    def forward(self, x, context=None):
        """Attention output (B, S, C) projected back to the residual stream. Without a context:
        causal attention over x's own positions. With one (anything with attend(q, k, v): a
        LayerCache when serving, the amortised past when PC settles) the context supplies the keys."""
        B, S, C = x.shape
        q, k, v = self.qkv(x)
        if context is None:
            dropout = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = context.attend(q, k, v)
        y = y.transpose(1, 2).reshape(B, S, C)
        return apply_dropout(self.resid_dropout, self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return apply_dropout(self.dropout, self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, context=None):
        x = x + self.attn(self.ln_1(x), context)
        return x + self.mlp(self.ln_2(x))


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
        """z_0: token plus position embedding of idx (B, S); positions 0..S-1 unless input_pos
        (B, S) names them (a cached forward: its caller keeps positions within the context)."""
        if input_pos is None:
            if idx.shape[1] > self.config.block_size:
                raise ValueError(f"position {idx.shape[1] - 1} is beyond the context of {self.config.block_size}")
            input_pos = torch.arange(idx.shape[1], device=idx.device)
        return apply_dropout(self.transformer.drop, self.transformer.wte(idx) + self.transformer.wpe(input_pos))

    def head(self, x):
        """Logits of the final residual states x (..., C)."""
        return self.lm_head(self.transformer.ln_f(x))

    def states(self, idx, cache: CachedAttention | None = None) -> list[torch.Tensor]:
        """The residual stream [z_0 (the embeddings), z_1..z_L (after each block)], each (B, S, C).
        Without a cache: causal attention over idx's own positions (training, evaluation). With
        one (KVCache.attention): tokens at cache.input_pos, whose keys and values go into the cache
        while attention reads each row's cached window (prefill, decode)."""
        x = self.embed(idx, None if cache is None else cache.input_pos)
        zs = [x]
        contexts = [None] * self.config.n_layer if cache is None else cache.layers(self.config.n_layer)
        for block, context in zip(self.transformer.h, contexts):
            x = block(x, context)
            zs.append(x)
        return zs

    def forward(self, idx, cache: CachedAttention | None = None):
        """Logits (B, S, V) for tokens idx (B, S) (see states for the cache)."""
        return self.head(self.states(idx, cache)[-1])

    def forward_cached(self, idx, cache: CachedAttention, settle_steps=None, max_settle_steps=None,
                       last_only=True, lengths=None):
        """Serving's forward: (logits, stats). Logits are (B, V) of each row's last token when
        last_only, else (B, S, V); `lengths` (B,) marks right-padded rows, whose last token is then
        at lengths − 1. The baseline has no per-token stats and no settling; the settle arguments
        are accepted so both model types share one call."""
        x = self.states(idx, cache)[-1]
        # the output head is the largest matmul for a small model: run it only where needed
        return self.head(last_positions(x, lengths) if last_only else x), {}

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

    def weight_bytes(self) -> int:
        """Bytes the weights hold in memory: parameters, buffers and any copies a weight format
        keeps beside them (pcgpt.model.formats)."""
        tensors = [*self.parameters(), *self.buffers()]
        extra = sum(getattr(m, "extra_weight_bytes", 0) for m in self.modules())
        return sum(t.numel() * t.element_size() for t in tensors) + extra

    def new_cache(self, n_slots: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, n_slots, max_len, device=device or p.device, dtype=dtype or p.dtype)
