"""The baseline GPT: KV-cached decoding equals full recomputation (any slots, rows at different
lengths, right-padded batched prefill), HF GPT-2 equivalence of logits and greedy tokens, cache
and parameter sizes, and the context limit."""

import copy

import pytest
import torch
import torch.nn as nn

from pcgpt.model.checkpoint import load_checkpoint
from pcgpt.model.generate import decode, generate, prefill, prefill_batch
from pcgpt.model.gpt import GPT, PRESETS, KVCache, PrepackedLinear, onednn_bf16_available, preset_config
from pcgpt.model.hugepages import HUGE_PAGE, huge_pages_available
from pcgpt.model.sampling import SamplingParams

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


# ---------------------------------------------------------------------------------------------
# cached decoding == full recomputation


@pytest.mark.parametrize("slots, n_slots", [([2, 0, 3], 4), ([0, 1, 2], 3), ([1, 2, 3], 4)],
                         ids=["non-contiguous", "contiguous-from-0", "contiguous-offset"])
@torch.no_grad()
def test_cached_decode_matches_full_recompute(slots, n_slots):
    model = random_gpt()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt_lens = [5, 11, 2]
    n_steps = 9
    seqs = [torch.randint(0, V, (n + n_steps,), generator=g).tolist() for n in prompt_lens]
    cache = model.new_cache(n_slots, max_len=32)
    # a slot no row of the batch uses holds another sequence: it must never leak into the rows
    for other in set(range(n_slots)) - set(slots):
        prefill(model, torch.randint(0, V, (20,), generator=g), cache, other)

    # prefill each row alone into its own slot; every prompt position must match
    for seq, n, slot in zip(seqs, prompt_lens, slots):
        logits, stats = prefill(model, torch.tensor(seq[:n]), cache, slot, all_logits=True)
        torch.testing.assert_close(logits, full_logits(model, seq[:n]), atol=ATOL, rtol=RTOL)
        last, _ = model.forward_cached(torch.tensor([seq[:n]]), torch.arange(n)[None], model.new_cache(1, 32),
                                       torch.tensor([0]))
        torch.testing.assert_close(last[0], logits[-1], atol=ATOL, rtol=RTOL)

    # then decode all rows together, each at its own position
    slot_t = torch.tensor(slots)
    for step in range(n_steps):
        pos = torch.tensor([n + step for n in prompt_lens])
        tokens = torch.tensor([seq[n + step] for seq, n in zip(seqs, prompt_lens)])
        logits, _ = decode(model, tokens, pos, cache, slot_t)
        assert logits.shape == (len(slots), V)
        for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
            expected = full_logits(model, seq[: n + step + 1])[-1]
            torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=RTOL)


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
    logits = model(idx, input_pos, cache, slot_t)
    all_logits, _ = model.forward_cached(idx, input_pos, model.new_cache(4, max_len=S), slot_t, last_only=False)
    torch.testing.assert_close(all_logits, logits, atol=ATOL, rtol=RTOL)
    for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
        torch.testing.assert_close(logits[row, :n], full_logits(model, seq[:n]), atol=ATOL, rtol=RTOL)

    # decode: each row continues from its own length, overwriting its padding's K/V
    for step in range(n_steps):
        pos = torch.tensor([n + step for n in prompt_lens])
        tokens = torch.tensor([seq[n + step] for seq, n in zip(seqs, prompt_lens)])
        out, _ = decode(model, tokens, pos, cache, slot_t)
        for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
            expected = full_logits(model, seq[: n + step + 1])[-1]
            torch.testing.assert_close(out[row], expected, atol=ATOL, rtol=RTOL)


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
    next_tokens = torch.tensor([3, 1, 4])
    after, _ = decode(model, next_tokens, torch.tensor([len(p) for p in prompts]), cache, torch.tensor(slots))
    for row, p in enumerate(prompts):
        own = model.new_cache(1, max_len=24)
        alone, _ = prefill(model, p, own, 0)
        torch.testing.assert_close(logits[row], alone, atol=ATOL, rtol=RTOL)
        alone_next, _ = decode(model, next_tokens[row:row + 1], torch.tensor([len(p)]), own, torch.tensor([0]))
        torch.testing.assert_close(after[row], alone_next[0], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_generate_greedy_equals_uncached_argmax():
    model = random_gpt(seed=5)
    prompt = [3, 14, 15, 92, 65]
    tokens = [t for t, _, _ in generate(model, prompt, 15, SamplingParams(temperature=0))]
    seq = list(prompt)
    for _ in range(15):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    assert tokens == seq[len(prompt):]


@torch.no_grad()
def test_inference_layout_changes_memory_order_only(tmp_path):
    """to_inference_layout (what serving applies on CPU) stores the matrices as [in, out] and
    nothing else changes: names, shapes and values, the wte/lm_head tie, full and cached logits,
    and a checkpoint saved from it."""
    from pcgpt.model.checkpoint import save_pcgpt
    from pcgpt.model.tokenizer import CharTokenizer
    model = random_gpt(seed=11)
    served = random_gpt(seed=11).to_inference_layout()
    before, after = model.state_dict(), served.state_dict()
    assert list(before) == list(after)
    for name in before:
        assert before[name].shape == after[name].shape and torch.equal(before[name], after[name]), name
    w = served.transformer.h[0].mlp.c_fc.weight
    assert not w.is_contiguous() and w.t().is_contiguous()  # really re-laid out
    assert served.lm_head.weight is served.transformer.wte.weight and served.lm_head.weight.t().is_contiguous()

    seq = [5, 1, 7, 2, 9, 4, 4, 8]
    torch.testing.assert_close(served(torch.tensor([seq])), model(torch.tensor([seq])), atol=ATOL, rtol=RTOL)
    for m in (model, served):
        cache = m.new_cache(2)
        logits, _ = prefill(m, torch.tensor(seq), cache, 1)
        out = [logits]
        for t in (3, 6):
            logits, _ = decode(m, torch.tensor([t]), torch.tensor([len(seq) + len(out) - 1]), cache, torch.tensor([1]))
            out.append(logits[0])
        m.cached = torch.stack(out)
    torch.testing.assert_close(served.cached, model.cached, atol=ATOL, rtol=RTOL)

    chars = {i: chr(33 + i) for i in range(model.config.vocab_size)}
    tokenizer = CharTokenizer({c: i for i, c in chars.items()}, chars)
    save_pcgpt(tmp_path / "ckpt", served, tokenizer)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded(torch.tensor([seq])), model(torch.tensor([seq])))


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
def test_served_weights_and_kv_cache_sit_on_memory_advised_for_huge_pages():
    """A decode step streams every weight and each row's cached keys and values: serving keeps
    them in memory advised for transparent huge pages (MADV_HUGEPAGE, "hg" in smaps), starting on
    a 2 MiB boundary, with every value unchanged. Matrices of at least 2 MiB take it (this model's
    c_attn, c_fc and lm_head); smaller ones stay where torch puts them."""
    torch.manual_seed(3)
    config = preset_config("tiny", n_layer=1, n_head=4, n_embd=512, vocab_size=1100, block_size=64)
    model = GPT(config).eval()
    served = copy.deepcopy(model).to_inference_layout()
    for name, tensor in model.state_dict().items():
        assert torch.equal(served.state_dict()[name], tensor), name
    block = served.transformer.h[0]
    for weight in (block.attn.c_attn.weight, block.mlp.c_fc.weight, served.lm_head.weight):
        assert weight.nbytes >= HUGE_PAGE and weight.data_ptr() % HUGE_PAGE == 0
        assert "hg" in mapping_flags(weight)
    assert served.lm_head.weight is served.transformer.wte.weight
    small = block.attn.c_proj.weight  # 1 MiB
    assert "hg" not in mapping_flags(small)

    cache = served.new_cache(32, 64)  # 128 KiB of keys a slot, 4 MiB in all
    assert "hg" in mapping_flags(cache.k) and "hg" in mapping_flags(cache.v) and not cache.k.any()
    seq = [5, 1, 7, 2, 9, 4]
    logits, _ = served.forward_cached(torch.tensor([seq]), torch.arange(6)[None], cache, torch.tensor([2]))
    torch.testing.assert_close(logits[0], full_logits(model, seq)[-1], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_cached_forward_follows_the_parameters_wherever_they_move():
    """The cached forward looks each block's tensors up once; whatever replaces or moves the
    parameters afterwards (load_state_dict in place or with assign, .to(dtype), the inference
    layout, a deepcopy) must show in its logits, as it does in the uncached forward."""
    seq = [5, 1, 7, 2, 9, 4]

    def last_cached(m):
        logits, _ = m.forward_cached(torch.tensor([seq]), torch.arange(len(seq))[None], m.new_cache(1, 16), torch.tensor([0]))
        return logits[0]

    model, other = random_gpt(seed=1), random_gpt(seed=2)
    before = last_cached(model)  # the tensors are looked up here
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(last_cached(model), full_logits(other, seq)[-1], atol=ATOL, rtol=RTOL)
    model.load_state_dict(random_gpt(seed=1).state_dict(), assign=True)
    torch.testing.assert_close(last_cached(model), before, atol=0, rtol=0)
    model.to(torch.float64)
    assert last_cached(model).dtype == torch.float64
    torch.testing.assert_close(last_cached(model), full_logits(model, seq)[-1], atol=1e-10, rtol=1e-10)
    model.to(torch.float32).to_inference_layout()
    torch.testing.assert_close(last_cached(model), before, atol=ATOL, rtol=RTOL)
    copied = copy.deepcopy(model)  # a copy has Parameters of its own: the looked-up tensors must be its
    for p in copied.parameters():
        p.mul_(0.9)
    torch.testing.assert_close(last_cached(copied), full_logits(copied, seq)[-1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(last_cached(model), before, atol=ATOL, rtol=RTOL)


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
    """bf16 on a CPU with native bf16: to_inference_layout swaps every nn.Linear for a
    PrepackedLinear over the same Parameters (names, shapes, values, the tie, parameter count), and
    its full and cached logits are as close to fp32's as bf16 through F.linear is."""
    reference = random_gpt(seed=12)
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    served = copy.deepcopy(plain).to_inference_layout()
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

    cache = served.new_cache(2)  # cached decoding through the prepacked kernels: the same logits
    logits, _ = prefill(served, torch.tensor(seq[:8]), cache, 1)
    rows = [logits]
    for i, t in enumerate(seq[8:]):
        logits, _ = decode(served, torch.tensor([t]), torch.tensor([8 + i]), cache, torch.tensor([1]))
        rows.append(logits[0])
    assert (torch.stack(rows).float() - packed_full[7:]).abs().max() <= 2 * bf16_error


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
        decode(model, torch.tensor([1]), torch.tensor([block]), cache, torch.tensor([0]))
    with pytest.raises(ValueError, match="context"):
        next(generate(model, [1] * (block - 3), 4, SamplingParams(temperature=0)))
