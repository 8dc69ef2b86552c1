"""`pcgpt serve --compile`: the batch-1 decode step compiled with torch.compile (inductor,
max-autotune) at engine start. Requests served one at a time through it give what the eager
engine gives; one graph serves every attention window; models it does not apply to run eagerly."""

import pytest
import torch
from torch._dynamo.utils import counters

from pcgpt.model.formats import PrepackedLinear, plain_view, to_inference_format
from pcgpt.serve.compiled_step import compile_supported
from tests.test_engine import PROMPTS, _engine, _request, _run, models  # noqa: F401  (the fixture)


def test_plain_view_shares_every_parameter_and_leaves_the_model_as_it_is():
    from tests.test_gpt import random_gpt
    model = to_inference_format(random_gpt(seed=5, n_embd=256, vocab_size=1100))
    view = plain_view(model)
    assert any(isinstance(m, PrepackedLinear) for m in model.modules())
    assert all(type(m) is torch.nn.Linear for m in view.modules() if isinstance(m, torch.nn.Linear))
    assert dict(view.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))
    assert view.lm_head.weight is view.transformer.wte.weight
    x = torch.tensor([[5, 1, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_compiled_engine_serves_one_at_a_time_as_the_eager_engine(models):
    base, tokenizer = models["base"], models["tokenizer"]
    eager = _engine(base, tokenizer)
    compiled = _engine(base, tokenizer, compile_decode=True)
    assert eager.runner.compiled is None and compiled.runner.compiled is not None
    graphs_before = counters["stats"]["unique_graphs"]
    # the last prompt's steps attend over the whole cache (the char model's 256 positions)
    prompts = PROMPTS + [((PROMPTS[2] + "\n") * 6)[:240]]
    for i, prompt in enumerate(prompts):  # alone: every decode step has one row
        (text_e, unc_e, finish_e), = _run(eager, [_request(tokenizer, prompt, i)])
        (text_c, unc_c, finish_c), = _run(compiled, [_request(tokenizer, prompt, i)])
        assert finish_c == finish_e == "length"
        assert text_c == text_e, prompt
        for a, b in zip(unc_c, unc_e):
            for key in ("entropy", "surprise"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5)
    # the prompts' windows span several kv_len buckets up to the whole cache: all served by the
    # graphs compiled at start-up
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert compiled.runner.compiled.calls == len(prompts) * 11  # 12 tokens: the first from the prefill


def test_compile_does_not_apply_to_pc_or_quantized_models(models):
    from pcgpt.model.quantize import Quantization, quantize
    from tests.test_gpt import random_gpt
    assert compile_supported(models["base"]) is None
    assert "PC" in compile_supported(models["pc"])
    quantized = random_gpt()
    quantize(quantized, Quantization("int8"))
    assert "quantized" in compile_supported(quantized)
    engine = _engine(models["pc"], models["tokenizer"], compile_decode=True)
    assert engine.runner.compiled is None and "PC" in engine.runner.compile_skipped
