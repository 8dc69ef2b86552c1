"""The `pcgpt` console script: inspect reports what the model computes, generate prints exactly
the prompt and the generated text, and bad devices fail cleanly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcgpt.model.checkpoint import load_checkpoint, save_pcgpt
from pcgpt.model.generate import generate
from pcgpt.model.gpt import GPT, preset_config
from pcgpt.model.sampling import SamplingParams
from pcgpt.model.tokenizer import CharTokenizer

PCGPT = Path(sys.executable).parent / "pcgpt"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"




@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return save_pcgpt(tmp_path_factory.mktemp("cli") / "tiny", model.eval(), tokenizer,
                      metadata={"training": {"iter_num": 7}})


def run_cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(PCGPT), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def expected_numbers(path):
    """What inspect must report, derived from the loaded model's shapes independently of describe()."""
    model, tokenizer, _ = load_checkpoint(path)
    c = model.config
    L, C, V, T = c.n_layer, c.n_embd, c.vocab_size, c.block_size
    assert c.bias
    per_block = 12 * C * C + 13 * C  # ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj (with biases)
    params = V * C + T * C + L * per_block + 2 * C  # tied wte/lm_head counted once; ln_f
    assert params == sum(p.numel() for p in model.parameters())
    return {
        "parameters": params,
        "parameters_non_embedding": params - T * C,
        "context_length": T,
        "kv_cache_bytes_per_token": 2 * L * C * 4,  # K and V, every layer, fp32
        # forward FLOPs per token as nanoGPT's estimate_mfu counts them (its 6N + 12LCT is fwd + bwd)
        "flops_per_token": 2 * (params - T * C) + 4 * L * C * T,
        "vocab_size": tokenizer.vocab_size,
    }, model, tokenizer


def test_inspect(saved, tmp_path):
    want, model, _ = expected_numbers(saved)
    assert model.kv_bytes_per_token() == want["kv_cache_bytes_per_token"]
    assert model.flops_per_token() == want["flops_per_token"]

    r = run_cli("inspect", saved, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model_type"] == "gpt" and info["format"] == "pcgpt"
    assert info["tokenizer"] == "char"
    assert info["training"] == {"iter_num": 7}
    assert info["config"] == model.config.to_dict()
    for key, value in want.items():
        assert info[key] == value, key

    r = run_cli("inspect", saved, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "gpt" in lines["model type"] and "pcgpt" in lines["model type"]
    assert f"{want['parameters']:,}" in lines["parameters"]
    assert f"{want['parameters_non_embedding']:,}" in lines["parameters"]
    assert "char" in lines["tokenizer"] and f"({want['vocab_size']} tokens)" in lines["tokenizer"]
    assert lines["context length"].split()[-1] == str(want["context_length"])
    assert f"{want['kv_cache_bytes_per_token']:,} bytes per token" in lines["KV cache"]
    assert f"{want['flops_per_token']:,}" in lines["FLOPs per token"]


def test_generate_prints_prompt_then_generated_text(saved, tmp_path):
    model, tokenizer, _ = load_checkpoint(saved)
    prompt = "To be, or "
    tokens = [t for t, _, _ in generate(model, tokenizer.encode(prompt), 12, SamplingParams(temperature=0))]
    text = tokenizer.decode(tokens)
    assert len(text) == 12

    r = run_cli("generate", "--model", saved, "--prompt", prompt, "--max-tokens", 12, "--temperature", 0,
                "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + text + "\n"  # nothing else on stdout; the newline ends the output
    assert "Traceback" not in r.stderr


def run_main(capsys, *args):
    """The CLI in-process (cheaper than a subprocess): (exit code, stdout, stderr). An exception
    escaping main() fails the test, as a traceback would."""
    from pcgpt.cli import main
    with torch.enable_grad():  # the CLI turns gradients off globally; keep this process as it was
        rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_device_cuda_without_gpu_fails_cleanly(saved, tmp_path):
    r = run_cli("generate", "--model", saved, "--prompt", "To be", "--max-tokens", 5, "--device", "cuda",
                cwd=tmp_path)
    if torch.cuda.is_available():
        assert r.returncode == 0, r.stderr  # a machine with a GPU: it just works
        return
    assert r.returncode != 0
    assert "cuda" in r.stderr and "error" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("extra, expect", [
    (["--prompt", "Zebra \u00e9"], "not in the char vocabulary"),  # characters outside the vocabulary
    (["--prompt", "to be " * 11], "context"),  # 66 characters: over the 64-token context
    (["--prompt", "t" * 64], "context"),  # exactly the context: no room for a new token
], ids=["unknown-chars", "prompt-over-context", "prompt-fills-context"])
def test_generate_errors_are_clean(saved, capsys, extra, expect):
    args = {"--prompt": "To be", "--max-tokens": "5"}
    args.update(zip(extra[::2], extra[1::2]))
    rc, out, err = run_main(capsys, "generate", "--model", saved, *[x for kv in args.items() for x in kv],
                            "--temperature", 0, "--device", "cpu")
    assert rc != 0
    assert expect in err and "error" in err, err
    assert out == ""  # nothing half-printed before the error


def test_generate_default_max_tokens_fits_the_context(saved, capsys):
    """Without --max-tokens, generate stops where the context ends; a --max-tokens past it is an
    error (tests/test_cli_errors.py), as the server's 400."""
    model, tokenizer, _ = load_checkpoint(saved)
    prompt = "t" * 60
    tokens = [t for t, _, _ in generate(model, tokenizer.encode(prompt), 4, SamplingParams(temperature=0))]
    rc, out, err = run_main(capsys, "generate", "--model", saved, "--prompt", prompt,
                            "--temperature", 0, "--device", "cpu")
    assert rc == 0, err
    assert out == prompt + tokenizer.decode(tokens) + "\n"
