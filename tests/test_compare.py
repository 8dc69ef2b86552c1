"""`pcgpt compare`: its metrics on inputs whose answer is known, and one small run end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pcgpt.model import compare as C
from pcgpt.model.evaluate import spearman

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tinyshakespeare" / "input.txt"
CKPTS = REPO / "pcgpt" / "checkpoints"


# --- calibration ----------------------------------------------------------------------------------

def test_ece_of_a_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 200_000)
    correct = rng.uniform(0, 1, confidence.shape) < confidence  # right with exactly the stated probability
    ece, rows = C.expected_calibration_error(confidence, correct, bins=15)
    assert ece < 0.01
    assert sum(r[2] for r in rows) == len(confidence)


def test_ece_of_an_overconfident_predictor_is_its_gap():
    confidence = np.full(1000, 0.9)
    correct = np.arange(1000) < 600  # 60% right at 90% confidence
    ece, rows = C.expected_calibration_error(confidence, correct)
    assert ece == pytest.approx(0.3)
    assert len(rows) == 1 and rows[0][3] == pytest.approx(0.9) and rows[0][4] == pytest.approx(0.6)


def test_brier_score_of_certain_and_uniform_predictions():
    V = 5
    targets = torch.tensor([0, 3])
    certain = torch.nn.functional.one_hot(targets, V).float()
    torch.testing.assert_close(C.brier_scores(certain, targets), torch.zeros(2))
    uniform = torch.full((2, V), 1 / V)
    torch.testing.assert_close(C.brier_scores(uniform, targets), torch.full((2,), 1 - 1 / V))
    wrong = torch.nn.functional.one_hot(torch.tensor([1, 1]), V).float()
    torch.testing.assert_close(C.brier_scores(wrong, targets), torch.full((2,), 2.0))


# --- ranking ------------------------------------------------------------------------------------------

def test_auroc_known_cases():
    labels = np.array([0, 0, 1, 1], bool)
    assert C.auroc([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.75)  # sklearn's documented example
    assert C.auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0  # separable
    assert C.auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0  # separable the wrong way
    assert C.auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # ties count half
    assert C.auroc([0.1, 0.2], np.array([1, 1], bool)) is None  # one class only


def test_spearman_known_cases():
    x = torch.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(-x, x) == pytest.approx(-1.0)
    assert spearman(torch.ones(10), x) is None  # constant: undefined


def test_cross_fitted_combination_beats_each_signal():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=4000), rng.normal(size=4000)
    target = 2 * a - b + 0.1 * rng.normal(size=4000)
    fold = np.arange(4000) % 2
    combined = C.cross_fitted_combination({"a": a, "b": -b}, target, fold)
    t = torch.from_numpy(target)
    rho = spearman(torch.from_numpy(combined), t)
    assert rho > 0.98
    assert rho > spearman(torch.from_numpy(a), t) and rho > spearman(torch.from_numpy(-b), t)


# --- samples --------------------------------------------------------------------------------------

def test_sample_text_measures():
    toks = "a b c a b c".split()
    assert C.repeated_ngram_share(toks, 3) == pytest.approx(0.5)  # abc twice of abc, bca, cab, abc
    assert C.distinct_n(toks, 1) == pytest.approx(0.5)
    assert C.distinct_n(toks, 2) == pytest.approx(3 / 5)
    assert C.repeated_ngram_share(["x"], 3) is None
    assert C.words("Thou art, O'er-much; KING!") == ["thou", "art", "o'er", "much", "king"]
    assert C.invented_word_share(["thou", "blorf", "art", "zzk"], {"thou", "art"}) == 0.5


def test_speaker_format_validity():
    text = ("cut off\n\nROMEO:\nBut soft!\n\nFirst Citizen:\nSpeak, speak.\n\nno speaker here\nat all\n\n"
            "JULIET:\n\nlast block, cut off")
    # complete blocks: ROMEO (valid), First Citizen (valid), no speaker (invalid), "JULIET:" alone (invalid)
    assert C.speaker_format_validity(text) == pytest.approx(0.5)
    assert C.speaker_format_validity("one block only") is None


# --- OOD texts ------------------------------------------------------------------------------------

def test_to_vocabulary_keeps_known_characters_only():
    from pcgpt.model.tokenizer import CharTokenizer
    tok = CharTokenizer.from_chars(list(" abcdef\n"))
    assert C.to_vocabulary("café  (bad)\nace", tok) == "cafe   bad \nace"  # a run of unknowns: one space
    assert C.to_vocabulary("x_y#z=é", tok) == " e"


def test_ood_texts_are_made_from_the_reference():
    from pcgpt.model.tokenizer import CharTokenizer
    reference = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    tok = CharTokenizer.from_text(reference + "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    texts, made = C.ood_texts(reference, tok, min_chars=100, seed=0)
    assert set(texts) == set(made) == {"char-shuffled", "word-shuffled", "reversed lines", "python source", "english prose"}
    assert sorted(texts["char-shuffled"]) == sorted(reference) and texts["char-shuffled"] != reference
    assert sorted(texts["word-shuffled"].split()) == sorted(reference.split())
    assert texts["reversed lines"].split("\n")[0] == ":nezitiC tsriF"
    for t in texts.values():
        assert set(t) <= set(tok.stoi)
    assert len(texts["python source"]) >= 100 and len(texts["english prose"]) >= 100


# --- FLOPs ----------------------------------------------------------------------------------------

def test_flops_counts_the_baseline_matmuls_and_grow_with_settling():
    from pcgpt.model.checkpoint import load_checkpoint
    base, _, _ = load_checkpoint(CKPTS / "shakespeare-char")
    pc, _, _ = load_checkpoint(CKPTS / "shakespeare-char-pc")
    c = base.config
    S = 32
    x = torch.randint(0, c.vocab_size, (2, S))
    with torch.no_grad():
        measured = C.flops_per_token(base, x, 0)
        pc_flops = [C.flops_per_token(pc, x, T) for T in (0, 1, 2)]
    linear = 2 * (12 * c.n_layer * c.n_embd ** 2 + c.vocab_size * c.n_embd)  # qkv, proj, MLP; the head
    attention = 4 * c.n_layer * c.n_embd * S  # QKᵀ and AV over the S keys, counted unmasked
    assert measured == linear + attention
    assert pc_flops[0] >= measured and pc_flops[0] < pc_flops[1] < pc_flops[2]


# --- end to end -----------------------------------------------------------------------------------

def test_compare_cli_writes_the_report_and_plots(tmp_path):
    from pcgpt.cli import main
    out = tmp_path / "cmp"
    rc = main(["compare", str(CKPTS / "shakespeare-char"), str(CKPTS / "shakespeare-char-pc"), "--data", str(DATA),
               "--settle-steps", "0,1", "--max-tokens", "128", "--ood-windows", "3", "--ood-window", "32",
               "--sample-rows", "2", "--sample-tokens", "12", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    rows = [(r["model"], r["settle_steps"]) for r in result["rows"]]
    assert rows == [("shakespeare-char", 0), ("shakespeare-char-pc", 0), ("shakespeare-char-pc", 1)]
    base, pc0, pc1 = result["rows"]
    # T = 0 of the shipped PC model is its bottom-up path, the shipped baseline's weights
    assert pc0["loss"] == pytest.approx(base["loss"], abs=1e-5)
    assert pc1["flops_per_token"] > pc0["flops_per_token"]
    assert set(pc1["ood_auroc"]) >= {"entropy", "energy", "kl_settle", "surprise"}
    for s in result["samples"]:
        assert s["standard"]["mean_surprise"] > 0 and len(s["trajectory"]["mu"]) == 12
    report = (out / "report.md").read_text()
    for png in ("loss_vs_flops.png", "reliability.png", "ood_auroc.png", "surprise_trajectory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in report
    assert "## Headline" in report and "| shakespeare-char-pc T=1 |" in report


@pytest.mark.parametrize("argv, message", [
    (["--settle-steps", "1,x"], "--settle-steps"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--data", "/nonexistent.txt"], "--data"),
])
def test_compare_bad_flags_exit_2_naming_the_flag(argv, message, tmp_path, capsys):
    from pcgpt.cli import main
    args = ["compare", str(CKPTS / "shakespeare-char"), "--data", str(DATA), "--out", str(tmp_path)] + argv
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_headline_states_the_margin_both_ways():
    def row(model, kind, T, loss, entropy_ood, kl_ood):
        ood = {"entropy": {"mean": entropy_ood}}
        if kind == "pc":
            ood.update(kl_settle={"mean": kl_ood}, energy={"mean": 0.4})
        return {"model": model, "model_type": kind, "settle_steps": T, "loss": loss, "ood_auroc": ood}
    result = {"rows": [row("base", "gpt", 0, 1.50, 0.9, None), row("pc", "pc", 0, 1.50, 0.9, 0.5),
                       row("pc", "pc", 2, 1.48, 0.9, 0.95)]}
    lines = C.headline(result)
    assert "beats base (1.5000) by ≥ 0.01 nats: it is 0.0200 lower" in lines[0]
    assert len(lines) == 2 and "kl_settle (mean AUROC 0.950), beats entropy (0.900)" in lines[1]  # T = 0 left out
    result["rows"][2].update(loss=1.495, ood_auroc={"entropy": {"mean": 0.9}, "kl_settle": {"mean": 0.6}})
    lines = C.headline(result)
    assert "does not beat base" in lines[0] and "does not beat entropy" in lines[1]
