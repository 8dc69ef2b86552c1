"""Quantized weights (pcgpt/model/quantize.py): the kernels against the dequantized weights, the
char model's logits against fp32, quantized checkpoints round-tripping through `pcgpt quantize`,
PC settling on a quantized model, and a real server serving and streaming quantized models.

Tolerances: the quantized kernels against F.linear over the same weights dequantized (the parts a
checkpoint stores) agree to fp32 rounding (atol 1e-4); int8-dynamic quantizes the activations as
well (per tensor, 7 or 8 bits), within 0.08 of outputs up to ~2.5. Against the fp32 model, the shipped char
baseline's logits (values up to ~15) on 4 x 64 tokens of the validation split's text: int8 per channel within
0.5 with >= 97% of the argmaxes the same; int4 (group 32) within 4 with >= 85% the same (the
quality benchmark, bench/quantize.py, measures the loss these cost)."""

import json

import openai
import pytest
import torch
import torch.nn.functional as F

from pcgpt.cli import main
from pcgpt.model.checkpoint import load_for_inference, read_checkpoint_info
from pcgpt.model.quantize import Quantization, QuantizedLinear, dequantize_parts, weight_bytes
from serving import BASELINE, Server, make_pc_checkpoint

INT8, INT4 = Quantization("int8"), Quantization("int4", 32)
LOGIT_TOLERANCE = {"int8": (0.5, 0.97), "int4-g32": (4.0, 0.85)}  # max |Δlogit|, top-1 agreement


def text_tokens(tokenizer, n=4, length=64):
    text = (BASELINE.parent.parent.parent / "data" / "tinyshakespeare" / "input.txt").read_text()[-20000:]
    ids = tokenizer.encode(text)
    return torch.tensor([ids[k * length:(k + 1) * length] for k in range(n)])


@pytest.mark.parametrize("quantization", [INT8, Quantization("int8-dynamic"), INT4, Quantization("int4", 64)],
                         ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_computes_the_dequantized_weights(quantization, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 72).to(dtype)  # 72 rows: the int4 CPU packing pads to sixteens
    q = QuantizedLinear.wrap(linear, quantization)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    if quantization.scheme == "int8-dynamic":
        tol = 0.08  # the activations are quantized too (per tensor, 7 or 8 bits): outputs here reach ~2.5
    for rows in (1, 40):  # int8 on CPU: ATen's kernel for one row, torchao's path for more
        x = torch.randn(rows, 256, dtype=dtype)
        with torch.no_grad():
            got = q(x)
        want = F.linear(x.float(), dequantize_parts(q.parts, quantization), linear.bias.float())
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol if dtype == torch.bfloat16 else 1e-4)
    # the graph-building path (PC settling) differentiates through the same weights
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    torch.testing.assert_close(xg.grad.float(), dequantize_parts(q.parts, quantization).sum(0).expand(len(x), -1),
                               atol=tol, rtol=tol)


@torch.no_grad()
@pytest.mark.parametrize("quantization", [INT8, INT4], ids=lambda q: q.name)
def test_char_logits_within_tolerance_of_fp32(quantization):
    ref, tokenizer, _ = load_for_inference(BASELINE)
    model, _, _ = load_for_inference(BASELINE, quantization=quantization)
    assert all(type(m) is not torch.nn.Linear for m in model.modules())  # blocks and head quantized
    assert model.transformer.wte.weight.dtype == torch.float32  # the embedding keeps the float table
    idx = text_tokens(tokenizer)
    a, b = ref(idx), model(idx)
    max_diff, agreement = LOGIT_TOLERANCE[quantization.name]
    assert (a - b).abs().max() <= max_diff
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= agreement
    assert (a - b).abs().max() > 0  # the weights really are quantized
    assert weight_bytes(model) < weight_bytes(ref) / (3 if quantization.scheme == "int8" else 4)


def test_quantized_checkpoint_round_trips(tmp_path, capsys):
    dst = tmp_path / "q4"
    assert main(["quantize", str(BASELINE), str(dst), "--quantize", "int4", "--group-size", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantized"] == 17 and report["kept_float"] == 0
    info = read_checkpoint_info(dst)
    assert info.metadata["quantization"] == {"scheme": "int4", "group_size": 32}
    assert main(["inspect", str(dst), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    from safetensors import safe_open
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert card["quantization"] == "int4-g32" and card["weight_bytes"] == stored
    assert card["weight_bytes"] < report["float_weight_bytes"] / 4
    loaded, tokenizer, _ = load_for_inference(dst)  # packed from the stored parts, not quantized again
    fresh, _, _ = load_for_inference(BASELINE, quantization=INT4)
    idx = text_tokens(tokenizer, n=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), fresh(idx), atol=1e-5, rtol=1e-5)
    # the stored parts are what the kernel computes with
    for (name, a), (_, b) in zip(loaded.named_modules(), fresh.named_modules()):
        if isinstance(a, QuantizedLinear):
            for part in ("qdata", "scale", "zero"):
                assert torch.equal(a.parts[part], b.parts[part]), (name, part)
    # a quantized checkpoint is not quantized twice; a bad group size is one line, exit 2
    assert main(["generate", "--model", str(dst), "--prompt", "x", "--quantize", "int8"]) == 2
    assert "holds int4-g32 weights" in capsys.readouterr().err
    assert main(["generate", "--model", str(BASELINE), "--prompt", "x", "--quantize", "int4", "--group-size", "20"]) == 2
    assert "--group-size" in capsys.readouterr().err


@torch.no_grad()
def test_pc_settling_on_a_quantized_model(tmp_path):
    pc_dir = make_pc_checkpoint(tmp_path / "pc")
    base, tokenizer, _ = load_for_inference(BASELINE, quantization=INT8)
    pc, _, _ = load_for_inference(pc_dir, quantization=INT8)
    idx = text_tokens(tokenizer, n=2, length=24)
    settled, unsettled, info = pc.settled_forward(idx, settle_steps=0)
    # T = 0 is the quantized baseline (the same quantized blocks and head)
    torch.testing.assert_close(settled, base(idx), atol=1e-5, rtol=1e-5)
    settled, unsettled, info = pc.settled_forward(idx, settle_steps=2)
    torch.testing.assert_close(unsettled, base(idx), atol=1e-5, rtol=1e-5)
    assert (settled - unsettled).abs().max() > 1e-3  # settling moved through the quantized blocks
    assert bool((info["energy"] <= info["energy0"] + 1e-6).all())


# --- a real server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantized")
    assert main(["quantize", str(BASELINE), str(d / "q8"), "--quantize", "int8"]) == 0
    # --quantize int8: the PC model is quantized at load, the int8 checkpoint is served as stored
    with Server({"q8": d / "q8", "pc": make_pc_checkpoint(d / "pc")}, "--quantize", "int8") as s:
        yield s


@pytest.mark.server
def test_server_serves_and_streams_quantized_models(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    reference, _, _ = load_for_inference(BASELINE, quantization=INT8)
    for model in ("q8", "pc"):
        body = dict(model=model, prompt="ROMEO:\n", max_tokens=24, temperature=0)
        full = client.completions.create(**body)
        streamed = "".join(c.choices[0].text for c in client.completions.create(**body, stream=True) if c.choices)
        assert streamed == full.choices[0].text and len(full.choices[0].text) > 0
        assert full.usage.completion_tokens == 24
    # PC at 0 settle steps over the served int8 weights is the served int8 baseline
    pc0 = client.completions.create(model="pc", prompt="ROMEO:\n", max_tokens=24, temperature=0,
                                    extra_body={"settle_steps": 0})
    q8 = client.completions.create(model="q8", prompt="ROMEO:\n", max_tokens=24, temperature=0)
    assert pc0.choices[0].text == q8.choices[0].text
    settled = client.completions.create(model="pc", prompt="ROMEO:\n", max_tokens=8, temperature=0,
                                        extra_body={"settle_steps": 2, "uncertainty": True})
    assert len(settled.choices[0].text) > 0
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(cards) == {"q8", "pc"}
    assert cards["q8"]["quantization"] == cards["pc"]["quantization"] == "int8"
