"""model/evaluate.py: the loss is the plain CE on each token once, T = 0 of a PC model is the
baseline, and `pcgpt eval` prints one JSON object and writes a plot."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcgpt.model.evaluate import evaluate, format_table, make_windows
from pcgpt.model.gpt import GPT, preset_config
from pcgpt.model.pc import PCGPT
from pcgpt.model.tokenizer import CharTokenizer

PCGPT_BIN = Path(sys.executable).parent / "pcgpt"
TEXT = "".join("To be, or not to be: that is the question. Whether 'tis nobler in the mind\n"
               for _ in range(12))


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    base = GPT(preset_config("tiny", vocab_size=tok.vocab_size)).eval()
    return base, tok, str(path)


def test_loss_equals_direct_cross_entropy_on_the_same_windows(setup):
    base, tok, path = setup
    report = evaluate(base, tok, path, settle_steps=[0, 2], split="all", max_tokens=300,
                      block_size=64, batch_size=3, name="tiny")
    assert report["tokens"] == 300 and report["model_type"] == "gpt"
    assert [r["settle_steps"] for r in report["results"]] == [0] and "note" in report  # baseline: T = 0 only
    # the independent computation: every target once, via model(idx) window by window
    ids = torch.tensor(tok.encode(TEXT))[:301]
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, 300, 64):
            x, y = ids[i:i + 64], ids[i + 1:i + 65]
            x = x[:len(y)]
            total += F.cross_entropy(base(x[None])[0], y, reduction="sum").item()
            n += len(y)
    assert n == 300
    r = report["results"][0]
    assert r["loss"] == pytest.approx(total / n, abs=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert r["bits_per_char"] == pytest.approx(total / n / math.log(2), abs=1e-5)  # char tokenizer
    assert r["kl_settle"] == 0.0 and r["top1_flip_rate"] == 0.0 and r["delta_loss"] == 0.0
    assert r["calibration"]["entropy"] is not None and -1 <= r["calibration"]["entropy"] <= 1


def test_windows_predict_every_token_once():
    ids = torch.arange(11)
    ws = make_windows(ids, 4)
    assert torch.cat([y for _, y in ws]).tolist() == list(range(1, 11))
    assert all(torch.equal(x + 1, y) for x, y in ws)


def test_pc_t0_is_the_baseline_and_does_not_settle(setup):
    base, tok, path = setup
    pc = PCGPT.from_baseline(base).eval()
    b = evaluate(base, tok, path, settle_steps=[0], split="val", max_tokens=200, block_size=32, name="b")
    p = evaluate(pc, tok, path, settle_steps=[0, 1], split="val", max_tokens=200, block_size=32, name="p")
    r0, r1 = p["results"]
    assert p["model_type"] == "pc" and r0["settle_steps"] == 0 and r1["settle_steps"] == 1
    assert r0["kl_settle"] == 0.0 and r0["top1_flip_rate"] == 0.0 and r0["steps"] == 0.0
    assert r0["loss"] == pytest.approx(b["results"][0]["loss"], abs=1e-6)
    assert r1["steps"] == 1.0 and r1["kl_settle"] > 0.0  # the untrained generators pull: settling moves
    assert r1["delta_loss"] == pytest.approx(r1["loss"] - r0["loss"], abs=1e-6)
    assert r1["energy"] <= r0["energy"] + 1e-9  # backtracking: energy never rises
    assert r0["calibration"]["kl_settle"] is None  # constant zero at T = 0: no rank correlation
    table = format_table(p)
    assert table.count("\n| 0 |") == 2 and "energy0" in table


def test_cli_prints_one_json_object_and_writes_a_plot(setup, tmp_path):
    from pcgpt.model.checkpoint import save_pcgpt
    base, tok, path = setup
    ckpt = save_pcgpt(tmp_path / "pc", PCGPT.from_baseline(base), tok)
    png = tmp_path / "eval.png"
    out = subprocess.run([str(PCGPT_BIN), "eval", str(ckpt), "--data", path, "--settle-steps", "0,1",
                          "--max-tokens", "200", "--device", "cpu", "--json", "--plot", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # exactly one object: extra output would fail to parse
    assert isinstance(report, dict) and {"model", "results"} <= report.keys()
    assert [r["settle_steps"] for r in report["results"]] == [0, 1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
