"""The baseline GPT: KV-cached decoding equals full recomputation (prefill into any slots, rows at
different lengths, right-padded batched prefill, padding rows), HF GPT-2 equivalence of logits and
greedy tokens, the CPU weight formats, the decode step's capturability, cache and parameter
sizes, and the context limit."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from pcgpt.model.checkpoint import load_checkpoint
from pcgpt.model.formats import (FORMATS, PREPACK_MIN_BYTES, PrepackedLinear, RowsLinear, default_formats,
                                 onednn_bf16_available, to_inference_format)
from pcgpt.model.generate import KV_LEN_BUCKET, decode_step, generate, kv_len_bucket, prefill, prefill_batch
from pcgpt.model.gpt import GPT, PRESETS, KVCache, preset_config
from pcgpt.model.hugepages import HUGE_PAGE, huge_pages_available
from pcgpt.model.sampling import SamplingParams

# fp32 tolerances for the same function computed through differently shaped calls (cached vs
# uncached, batched vs alone, a swapped weight format): kernels may sum in different orders
ATOL = 1e-5
RTOL = 1e-4


def random_gpt(seed=0, **overrides):
    """The tiny preset with every parameter (biases and LayerNorms too) pushed off its init, so a
    misplaced bias or a wrong LayerNorm would show in the logits; logits come out O(1)."""
    torch.manual_seed(seed)
    model = GPT(preset_config("tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def full_logits(model, seq):
    """Logits of every position of one sequence (list of ids), recomputed without a cache."""
    return model(torch.tensor([seq]))[0]


def decode_rows(model, cache, rows: dict, n_rows: int):
    """One decode_step over batch rows 0..n_rows-1 (row b = cache slot b): rows maps a slot to its
    (token, position); the other rows are padding (token 0 at position 0). Returns logits (n_rows, V)."""
    tokens = torch.zeros(n_rows, dtype=torch.long)
    pos = torch.zeros(n_rows, dtype=torch.long)
    for slot, (token, p) in rows.items():
        tokens[slot], pos[slot] = token, p
    kv_len = kv_len_bucket(int(pos.max()) + 1, cache.max_len)
    logits, _ = decode_step(model, tokens, pos, cache, kv_len=kv_len)
    assert logits.shape == (n_rows, model.config.vocab_size)
    return logits


# ---------------------------------------------------------------------------------------------
# cached decoding == full recomputation


@pytest.mark.parametrize("slots, n_slots, n_rows", [([2, 0, 3], 4, 4), ([0, 1, 2], 3, 3), ([1, 2, 0], 4, 3)],
                         ids=["padding-row-between", "all-rows", "free-slot-outside-batch"])
@torch.no_grad()
def test_cached_decode_matches_full_recompute(slots, n_slots, n_rows):
    model = random_gpt()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt_lens = [5, 11, 2]
    n_steps = 9
    seqs = [torch.randint(0, V, (n + n_steps,), generator=g).tolist() for n in prompt_lens]
    cache = model.new_cache(n_slots, max_len=32)
    # a slot no sequence uses holds another one: it must never leak into the rows (and where it is
    # inside the decode batch it is a padding row, decoding whatever it holds)
    for other in set(range(n_slots)) - set(slots):
        prefill(model, torch.randint(0, V, (20,), generator=g), cache, other)

    # prefill each row alone into its own slot; every prompt position must match
    for seq, n, slot in zip(seqs, prompt_lens, slots):
        logits, stats = prefill(model, torch.tensor(seq[:n]), cache, slot, all_logits=True)
        torch.testing.assert_close(logits, full_logits(model, seq[:n]), atol=ATOL, rtol=RTOL)
        last, _ = prefill(model, torch.tensor(seq[:n]), model.new_cache(1, 32), 0)
        torch.testing.assert_close(last, logits[-1], atol=ATOL, rtol=RTOL)

    # then decode all rows together, each at its own position
    for step in range(n_steps):
        rows = {slot: (seq[n + step], n + step) for seq, n, slot in zip(seqs, prompt_lens, slots)}
        logits = decode_rows(model, cache, rows, n_rows)
        for seq, n, slot in zip(seqs, prompt_lens, slots):
            expected = full_logits(model, seq[: n + step + 1])[-1]
            torch.testing.assert_close(logits[slot], expected, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_decode_rows_equal_each_row_alone_and_padding_rows_change_nothing():
    """A decode batch's row equals the same row decoded alone (batch of one), whatever the padding
    rows hold or at whatever position they sit."""
    model = random_gpt(seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (6, 3)]
    outputs = []
    for padding_pos in (0, 9):
        cache = model.new_cache(3, max_len=24)
        prefill(model, prompts[0], cache, 0)
        prefill(model, prompts[1], cache, 2)
        rows = {0: (7, 6), 1: (5, padding_pos), 2: (8, 3)}
        outputs.append(decode_rows(model, cache, rows, 3))
    torch.testing.assert_close(outputs[0][[0, 2]], outputs[1][[0, 2]], atol=ATOL, rtol=RTOL)
    for slot, prompt, (token, pos) in ((0, prompts[0], (7, 6)), (2, prompts[1], (8, 3))):
        alone = model.new_cache(1, max_len=24)
        prefill(model, prompt, alone, 0)
        logits = decode_rows(model, alone, {0: (token, pos)}, 1)
        torch.testing.assert_close(outputs[0][slot], logits[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("slots", [[2, 0, 3], [0, 1, 2]], ids=["non-contiguous", "contiguous"])
@torch.no_grad()
def test_batched_right_padded_prefill_then_decode(slots):
    model = random_gpt(seed=3)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    prompt_lens = [7, 3, 12]
    n_steps = 8
    seqs = [torch.randint(0, V, (n + n_steps,), generator=g).tolist() for n in prompt_lens]
    S = max(prompt_lens)
    pad = V - 1
    idx = torch.full((len(seqs), S), pad, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
        idx[row, :n] = torch.tensor(seq[:n])
    input_pos = torch.arange(S).expand(len(seqs), S)
    cache = model.new_cache(4, max_len=S + n_steps)
    slot_t = torch.tensor(slots)

    # one prefill call for all rows; each row's real positions equal its own full computation
    logits = model(idx, cache.attention(input_pos, S, slot_t))
    all_logits, _ = model.forward_cached(idx, model.new_cache(4, max_len=S).attention(input_pos, S, slot_t),
                                         last_only=False)
    torch.testing.assert_close(all_logits, logits, atol=ATOL, rtol=RTOL)
    for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
        torch.testing.assert_close(logits[row, :n], full_logits(model, seq[:n]), atol=ATOL, rtol=RTOL)

    # decode: each row continues from its own length, overwriting its padding's K/V
    for step in range(n_steps):
        rows = {slot: (seq[n + step], n + step) for seq, n, slot in zip(seqs, prompt_lens, slots)}
        out = decode_rows(model, cache, rows, 4)
        for seq, n, slot in zip(seqs, prompt_lens, slots):
            expected = full_logits(model, seq[: n + step + 1])[-1]
            torch.testing.assert_close(out[slot], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("slots", [[0, 1, 2], [3, 0, 2]], ids=["contiguous", "non-contiguous"])
@torch.no_grad()
def test_prefill_batch_equals_each_prompt_alone(slots):
    """prefill_batch (the engine's burst admission): right-padded prompts in one forward give
    each row the last-token logits and the cache its own prefill gives, so decoding continues
    exactly as it would alone."""
    model = random_gpt(seed=8)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (5, 11, 1)]
    cache = model.new_cache(4, max_len=24)
    logits, stats = prefill_batch(model, prompts, cache, torch.tensor(slots))
    assert logits.shape == (3, model.config.vocab_size) and stats == {}
    next_tokens = [3, 1, 4]
    after = decode_rows(model, cache, {s: (t, len(p)) for s, t, p in zip(slots, next_tokens, prompts)}, 4)
    for row, (slot, p) in enumerate(zip(slots, prompts)):
        own = model.new_cache(1, max_len=24)
        alone, _ = prefill(model, p, own, 0)
        torch.testing.assert_close(logits[row], alone, atol=ATOL, rtol=RTOL)
        alone_next = decode_rows(model, own, {0: (next_tokens[row], len(p))}, 1)
        torch.testing.assert_close(after[slot], alone_next[0], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_generate_greedy_equals_uncached_argmax():
    model = random_gpt(seed=5)
    prompt = [3, 14, 15, 92, 65]
    tokens = [t for t, _, _ in generate(model, prompt, 15, SamplingParams(temperature=0))]
    seq = list(prompt)
    for _ in range(15):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    assert tokens == seq[len(prompt):]


FP32_FORMATS = list(FORMATS)


def cached_logits(model, seq, extra):
    """Last-position logits of prefilling seq, then of decoding each token of extra (stacked)."""
    cache = model.new_cache(2, max_len=32)
    logits, _ = prefill(model, torch.tensor(seq), cache, 1)
    out = [logits]
    for i, t in enumerate(extra):
        row = decode_rows(model, cache, {1: (t, len(seq) + i)}, 2)
        out.append(row[1])
    return torch.stack(out)


@pytest.mark.parametrize("name", FP32_FORMATS)
@torch.no_grad()
def test_each_fp32_format_keeps_the_model_and_its_function(tmp_path, name):
    """A weight format (formats.py, what serving applies at load) swaps modules over the same
    Parameters: names, shapes and values, the wte/lm_head tie and a checkpoint saved from it are
    unchanged, and full and cached logits equal the plain model's."""
    from pcgpt.model.checkpoint import save_pcgpt
    from pcgpt.model.tokenizer import CharTokenizer
    model = random_gpt(seed=11)
    served = to_inference_format(random_gpt(seed=11), (name,))
    kind, _ = FORMATS[name]
    swapped = [m for m in served.modules() if isinstance(m, kind) and type(m) is not kind]
    assert swapped and not any(type(m) is kind for m in served.modules())
    before, after = model.state_dict(), served.state_dict()
    assert list(before) == list(after)
    for key in before:
        assert before[key].shape == after[key].shape and torch.equal(before[key], after[key]), key
    assert served.lm_head.weight is served.transformer.wte.weight

    seq = [5, 1, 7, 2, 9, 4, 4, 8]
    torch.testing.assert_close(served(torch.tensor([seq])), model(torch.tensor([seq])), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cached_logits(served, seq, [3, 6]), cached_logits(model, seq, [3, 6]),
                               atol=ATOL, rtol=RTOL)

    chars = {i: chr(33 + i) for i in range(model.config.vocab_size)}
    tokenizer = CharTokenizer({c: i for i, c in chars.items()}, chars)
    save_pcgpt(tmp_path / "ckpt", served, tokenizer)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(torch.tensor([seq])), model(torch.tensor([seq])), atol=0, rtol=0)


@torch.no_grad()
def test_rows_format_stores_fp32_matrices_in_out():
    served = to_inference_format(random_gpt(seed=11), ("rows",))
    w = served.transformer.h[0].mlp.c_fc.weight
    assert w.shape == (128, 32) and not w.is_contiguous() and w.t().is_contiguous()
    assert served.lm_head.weight.t().is_contiguous()
    assert default_formats(random_gpt()) == default_formats(served) == ("fp32_by_size",)  # by device and dtype only


@torch.no_grad()
def test_fp32_format_prepacks_large_weights_and_stores_small_ones_in_out():
    """fp32 serving picks each Linear's kernel by its weight's size: oneDNN-prepacked from
    PREPACK_MIN_BYTES up (streamed on every thread), [in, out] below (oneDNN's per-call set-up
    would cost more); the logits stay the plain model's, full and cached."""
    torch.manual_seed(4)
    config = preset_config("tiny", n_layer=1, n_head=4, n_embd=256, vocab_size=1100, block_size=64)
    model = GPT(config).eval()
    served = to_inference_format(copy.deepcopy(model))
    block = served.transformer.h[0]
    assert block.mlp.c_fc.weight.nbytes == PREPACK_MIN_BYTES and served.lm_head.weight.nbytes > PREPACK_MIN_BYTES
    assert isinstance(block.mlp.c_fc, PrepackedLinear) and isinstance(block.mlp.c_proj, PrepackedLinear)
    assert isinstance(served.lm_head, PrepackedLinear)
    assert isinstance(block.attn.c_attn, RowsLinear) and isinstance(block.attn.c_proj, RowsLinear)
    assert served.lm_head.weight is served.transformer.wte.weight
    assert served.weight_bytes() == model.weight_bytes() + sum(
        m.weight.nbytes for m in served.modules() if isinstance(m, PrepackedLinear))
    seq = [5, 1, 7, 2, 9, 4, 4, 8]
    torch.testing.assert_close(served(torch.tensor([seq])), model(torch.tensor([seq])), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cached_logits(served, seq, [3, 6]), cached_logits(model, seq, [3, 6]),
                               atol=ATOL, rtol=RTOL)


def mapping_flags(tensor) -> set[str]:
    """The VmFlags /proc/self/smaps gives the mapping that holds tensor's first byte."""
    address, inside = tensor.data_ptr(), False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not huge_pages_available(), reason="needs Linux with transparent huge pages on request")
@torch.no_grad()
def test_rows_format_keeps_large_matrices_on_memory_advised_for_huge_pages():
    """A decode step streams every weight: the rows format keeps the [in, out] copies in memory
    advised for transparent huge pages (MADV_HUGEPAGE, "hg" in smaps), starting on a 2 MiB
    boundary, with every value unchanged. Matrices of at least 2 MiB take it (this model's c_attn,
    c_fc and lm_head); smaller ones stay where torch puts them."""
    torch.manual_seed(3)
    config = preset_config("tiny", n_layer=1, n_head=4, n_embd=512, vocab_size=1100, block_size=64)
    model = GPT(config).eval()
    served = to_inference_format(copy.deepcopy(model), ("rows",))
    for name, tensor in model.state_dict().items():
        assert torch.equal(served.state_dict()[name], tensor), name
    block = served.transformer.h[0]
    for weight in (block.attn.c_attn.weight, block.mlp.c_fc.weight, served.lm_head.weight):
        assert weight.nbytes >= HUGE_PAGE and weight.data_ptr() % HUGE_PAGE == 0
        assert "hg" in mapping_flags(weight)
    assert served.lm_head.weight is served.transformer.wte.weight
    assert "hg" not in mapping_flags(block.attn.c_proj.weight)  # 1 MiB
    seq = [5, 1, 7, 2, 9, 4]
    torch.testing.assert_close(cached_logits(served, seq, [3]), cached_logits(model, seq, [3]), atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_cached_forward_follows_the_parameters_wherever_they_move():
    """Whatever replaces or moves the parameters (load_state_dict in place or with assign,
    .to(dtype), a weight format, a deepcopy) shows in the cached logits as in the uncached ones."""
    seq = [5, 1, 7, 2, 9, 4]

    def last_cached(m):
        return prefill(m, torch.tensor(seq), m.new_cache(1, 16), 0)[0]

    model, other = random_gpt(seed=1), random_gpt(seed=2)
    before = last_cached(model)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(last_cached(model), full_logits(other, seq)[-1], atol=ATOL, rtol=RTOL)
    model.load_state_dict(random_gpt(seed=1).state_dict(), assign=True)
    torch.testing.assert_close(last_cached(model), before, atol=0, rtol=0)
    model.to(torch.float64)
    assert last_cached(model).dtype == torch.float64
    torch.testing.assert_close(last_cached(model), full_logits(model, seq)[-1], atol=1e-10, rtol=1e-10)
    to_inference_format(model.to(torch.float32))
    torch.testing.assert_close(last_cached(model), before, atol=ATOL, rtol=RTOL)
    copied = copy.deepcopy(model)  # a copy has Parameters of its own
    for p in copied.parameters():
        p.mul_(0.9)
    torch.testing.assert_close(last_cached(copied), full_logits(copied, seq)[-1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(last_cached(model), before, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# the decode step: no host reads, capturable


@pytest.mark.parametrize("max_len", [64, 1024, 1000])
def test_kv_len_buckets_cover_each_length_with_few_windows(max_len):
    """A decode step's window: at least the length, within the cache, a multiple of KV_LEN_BUCKET
    (or the cache's end), fewer masked positions than a quarter of the length beyond the finest
    buckets, and few distinct windows."""
    windows = set()
    for length in range(1, max_len + 1):
        w = kv_len_bucket(length, max_len)
        assert length <= w <= max_len
        assert w % KV_LEN_BUCKET == 0 or w == max_len
        assert w - length < max(KV_LEN_BUCKET, length / 4)
        windows.add(w)
    assert len(windows) <= 20


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (.item(), int(), .tolist(),
    bool() dispatch aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def decode_inputs(model, B=3, max_len=32):
    cache = model.new_cache(B + 1, max_len=max_len)
    g = torch.Generator().manual_seed(5)
    for slot, n in enumerate((4, 9, 2)[:B]):
        prefill(model, torch.randint(0, model.config.vocab_size, (n,), generator=g), cache, slot)
    tokens = torch.tensor([3, 1, 4][:B])
    pos = torch.tensor([4, 9, 2][:B])
    return tokens, pos, cache


def pc_model():
    from pcgpt.model.pc import PCConfig, PCGPT
    torch.manual_seed(0)
    return PCGPT(PCConfig(**preset_config("tiny").to_dict())).eval()


@pytest.mark.parametrize("kind", ["gpt", "pc-T0"])
@torch.no_grad()
def test_decode_step_reads_nothing_back_from_the_device(kind):
    model = random_gpt() if kind == "gpt" else pc_model()
    tokens, pos, cache = decode_inputs(model)
    steps = None if kind == "gpt" else torch.zeros(3, dtype=torch.long)
    with HostReads() as mode:
        logits, stats = decode_step(model, tokens, pos, cache, steps, kv_len=kv_len_bucket(10, 32),
                                    max_settle_steps=None if kind == "gpt" else 0)
    assert mode.reads == 0
    assert logits.shape == (3, model.config.vocab_size) and (kind == "gpt") == (stats == {})


@pytest.mark.parametrize("kind", ["gpt", "pc-T0"])
def test_batched_decode_step_compiles_without_graph_breaks(kind):
    """torch.compile(fullgraph=True) traces the whole decode step (one graph, else it raises);
    the eager backend keeps inductor's C++ compile out of the test: capturability is the point."""
    model = random_gpt() if kind == "gpt" else pc_model()
    tokens, pos, cache = decode_inputs(model)
    steps = None if kind == "gpt" else torch.zeros(3, dtype=torch.long)
    max_steps = None if kind == "gpt" else 0
    with torch.no_grad():
        expected, expected_stats = decode_step(model, tokens, pos, copy.deepcopy(cache), steps, kv_len=32,
                                               max_settle_steps=max_steps)
    torch._dynamo.reset()
    try:
        step = torch.compile(decode_step, fullgraph=True, backend="eager")
        logits, stats = step(model, tokens, pos, cache, steps, kv_len=32, max_settle_steps=max_steps)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    assert stats.keys() == expected_stats.keys()


# ---------------------------------------------------------------------------------------------
# HuggingFace GPT-2 equivalence


def _hf_model(vocab_size):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=vocab_size)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # biases and LayerNorms off their init too; wte/lm_head stay tied
            p.add_(0.1 * torch.randn_like(p))
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


def _save_hf(hf, directory, how):
    if how == "safetensors":
        hf.save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()
        return
    # pytorch_model.bin as older transformers wrote it (save_pretrained(safe_serialization=False),
    # gone in transformers 5): a torch.save'd state dict incl. the causal-mask buffers
    hf.config.save_pretrained(directory)
    state = dict(hf.state_dict())
    n_pos = hf.config.n_positions
    for i in range(hf.config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if how == "bin-gpt2model":
        # the hub's original gpt2 pytorch_model.bin: saved from GPT2Model, no prefix, no lm_head
        state = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith("lm_head.")}
    assert not (directory / "model.safetensors").exists()
    torch.save(state, directory / "pytorch_model.bin")


needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16_available(),
                                       reason="this CPU has no native bf16 (AVX512-BF16 / AMX) for oneDNN")


@needs_onednn_bf16
@torch.no_grad()
def test_prepacked_bf16_keeps_the_model_and_adds_no_error_beyond_bf16():
    """bf16 on a CPU with native bf16: the default format swaps every nn.Linear for a
    PrepackedLinear over the same Parameters (names, shapes, values, the tie, parameter count), and
    its full and cached logits are as close to fp32's as bf16 through F.linear is."""
    reference = random_gpt(seed=12)
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    assert "prepacked" in default_formats(plain)
    served = to_inference_format(copy.deepcopy(plain))
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    packed = [m for m in served.modules() if isinstance(m, PrepackedLinear)]
    assert len(packed) == len(linears) > 0
    before, after = plain.state_dict(), served.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert served.lm_head.weight is served.transformer.wte.weight
    assert served.num_params() == plain.num_params()
    assert served.weight_bytes() > plain.weight_bytes()  # the prepacked copies are counted

    seq = [5, 1, 7, 2, 9, 4, 4, 8, 3, 3, 0, 6]
    exact = full_logits(reference, seq)
    bf16_error = (full_logits(plain, seq).float() - exact).abs().max()
    packed_full = full_logits(served, seq).float()
    assert (packed_full - exact).abs().max() <= 2 * bf16_error
    assert (packed_full - full_logits(plain, seq).float()).abs().max() <= 2 * bf16_error

    # cached decoding through the prepacked kernels: the same logits
    rows = cached_logits(served, seq[:8], seq[8:])
    assert (rows.float() - packed_full[7:]).abs().max() <= 2 * bf16_error


@needs_onednn_bf16
def test_prepacked_linear_takes_f_linear_when_a_graph_is_built():
    """PC settling differentiates through the blocks: with a graph through the input the
    prepacked module gives F.linear's value and gradient (its oneDNN kernel has no backward)."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 24).to(torch.bfloat16).requires_grad_(False)
    packed = PrepackedLinear.wrap(linear)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    (g_packed,) = torch.autograd.grad(packed(x).float().square().sum(), x)
    (g_plain,) = torch.autograd.grad(linear(x).float().square().sum(), x)
    assert torch.equal(g_packed, g_plain)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("how", ["safetensors", "bin", "bin-gpt2model"])
@torch.no_grad()
def test_hf_gpt2_logits_and_greedy_tokens_match(tmp_path, how):
    hf = _hf_model(50257)
    _save_hf(hf, tmp_path, how)
    model, tokenizer, metadata = load_checkpoint(tmp_path)
    assert metadata["format"] == "hf-gpt2"
    assert tokenizer.name == "gpt2"
    assert model.config.gelu_approximate == "tanh"

    ids = tokenizer.encode("Hello, world! The quick brown fox jumps over the lazy dog.\n  Ünïcödé 😀")
    x = torch.tensor([ids])
    ours, theirs = model(x), hf(x).logits
    assert theirs.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)

    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20,
                      pad_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
                      output_logits=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, len(ids):].tolist()
    steps = list(generate(model, ids, 20, SamplingParams(temperature=0), eos_id=tokenizer.eos_id))
    assert [t for t, _, _ in steps] == hf_tokens
    assert len(steps) == len(out.logits)
    for (_, logits, _), hf_logits in zip(steps, out.logits):
        torch.testing.assert_close(logits, hf_logits[0], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_bytes_per_token(dtype):
    model = GPT(preset_config("tiny"))
    c = model.config
    itemsize = torch.tensor([], dtype=dtype).element_size()
    cache = KVCache(c, n_slots=3, max_len=17, dtype=dtype)
    assert cache.bytes_per_token() == 2 * c.n_layer * c.n_embd * itemsize
    assert model.kv_bytes_per_token(dtype) == cache.bytes_per_token()
    assert cache.nbytes == cache.bytes_per_token() * 3 * 17
    if dtype == torch.float32:
        assert cache.bytes_per_token() == 2 * c.n_layer * c.n_embd * 4
        assert model.new_cache(2).bytes_per_token() == model.kv_bytes_per_token()


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_gpt2_preset_parameter_counts_match_hf(name):
    transformers = pytest.importorskip("transformers")
    p = PRESETS[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = GPT(preset_config(name))
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], n_positions=p["block_size"],
            vocab_size=p["vocab_size"]))
    assert ours.num_params(non_embedding=False) == hf.num_parameters()
    assert ours.num_params() == hf.num_parameters() - p["block_size"] * p["n_embd"]
    if name == "gpt2":
        assert ours.num_params(non_embedding=False) == 124_439_808  # GPT-2 "124M"
        assert ours.num_params() == 123_653_376  # what nanoGPT prints: 123.65M


# ---------------------------------------------------------------------------------------------
# context limit


@torch.no_grad()
def test_positions_beyond_block_size_raise():
    model = random_gpt()
    block = model.config.block_size
    model(torch.zeros(1, block, dtype=torch.long))  # exactly the context: fine
    with pytest.raises(ValueError, match="beyond the context"):
        model(torch.zeros(1, block + 1, dtype=torch.long))
    cache = model.new_cache(1, max_len=block + 4)
    with pytest.raises(ValueError, match="beyond the context"):
        prefill(model, torch.zeros(block + 1, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match="beyond the context"):
        prefill_batch(model, [torch.zeros(3, dtype=torch.long), torch.zeros(block + 1, dtype=torch.long)],
                      model.new_cache(2, max_len=block + 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="context"):
        next(generate(model, [1] * (block - 3), 4, SamplingParams(temperature=0)))
