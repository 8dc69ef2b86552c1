"""The `pcgpt` command as careful as the HTTP API: every mistake is one line on stderr naming the
flag and the problem, exit status 2, no traceback; --help documents every flag; parsing imports
neither torch nor the server; train says its cost and writes files others can read."""

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcgpt.model.checkpoint import save_pcgpt
from pcgpt.model.gpt import GPT, PRESETS, preset_config
from pcgpt.model.tokenizer import CharTokenizer

PCGPT = Path(sys.executable).parent / "pcgpt"
SHIPPED = Path(__file__).resolve().parent.parent / "pcgpt" / "checkpoints"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    data = root / "text.txt"
    data.write_text(TEXT)
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=tokenizer.vocab_size))
    ckpt = save_pcgpt(root / "tiny", model.eval(), tokenizer)
    return {"root": root, "data": data, "ckpt": ckpt}


def run_cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(PCGPT), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def assert_one_line_error(rc, out, err, *expect):
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    for text in expect:
        assert text in lines[0], (text, err)
    assert out == ""


# Mistakes caught while parsing: the real console script, which answers before torch loads.
PARSE_ERRORS = {
    "eval-missing-data": (["eval", "{ckpt}", "--data", "nope.txt"], ["--data", "nope.txt"]),
    "train-missing-data": (["train", "--data", "nope.txt", "--out-dir", "{root}/o"], ["--data", "nope.txt"]),
    "train-unknown-model-type": (["train", "--data", "{data}", "--out-dir", "{root}/o", "--model-type", "foo"],
                                 ["--model-type", "foo", "gpt", "pc"]),
    "train-unknown-preset": (["train", "--data", "{data}", "--out-dir", "{root}/o", "--preset", "huge"],
                             ["--preset", "char-small"]),
    "train-zero-batch": (["train", "--data", "{data}", "--out-dir", "{root}/o", "--batch-size", "0"],
                         ["--batch-size", ">= 1"]),
    "train-pc-flag-on-gpt": (["train", "--data", "{data}", "--out-dir", "{root}/o", "--pc-train", "generators"],
                             ["--pc-train", "--model-type pc"]),
    "train-resume-nothing": (["train", "--data", "{data}", "--out-dir", "{root}/empty", "--resume"],
                             ["--resume", "train_state.pt"]),
    "generate-missing-model": (["generate", "--model", "nope", "--prompt", "x"], ["--model", "nope"]),
    "generate-negative-max-tokens": (["generate", "--model", "{ckpt}", "--prompt", "x", "--max-tokens", "-3"],
                                     ["--max-tokens", ">= 0"]),
    "generate-bad-temperature": (["generate", "--model", "{ckpt}", "--prompt", "x", "--temperature", "-1"],
                                 ["--temperature"]),
    "generate-bad-device": (["generate", "--model", "{ckpt}", "--prompt", "x", "--device", "gpu"], ["--device"]),
    "eval-bad-settle-steps": (["eval", "{ckpt}", "--data", "{data}", "--settle-steps", "1,x"], ["--settle-steps"]),
    "eval-plot-dir-missing": (["eval", "{ckpt}", "--data", "{data}", "--plot", "{root}/no/such/dir/p.png"],
                              ["--plot", "does not exist"]),
    "serve-unknown-dtype": (["serve", "--dtype", "fp8"], ["--dtype", "fp8"]),
}


@pytest.mark.parametrize("name", PARSE_ERRORS)
def test_parse_errors_are_one_line(files, name):
    args, expect = PARSE_ERRORS[name]
    r = run_cli(*[a.format(**files) for a in args], cwd=files["root"])
    assert_one_line_error(r.returncode, r.stdout, r.stderr, *expect)


def run_main(capsys, *args):
    """The CLI in-process, for mistakes found only once the checkpoint or data is read."""
    from pcgpt.cli import main
    with torch.enable_grad():  # the CLI turns gradients off globally; keep this process as it was
        rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args, expect", [
    (["generate", "--model", SHIPPED / "shakespeare-char", "--prompt", "To be", "--settle-steps", "3"],
     ["--settle-steps 3", "baseline"]),
    (["generate", "--model", SHIPPED / "shakespeare-char-pc", "--prompt", "To be", "--settle-steps", "99"],
     ["--settle-steps 99", "at most"]),
    (["generate", "--model", SHIPPED / "shakespeare-char", "--prompt", "To be", "--max-tokens", "1000"],
     ["--max-tokens 1000", "251", "256"]),
    (["generate", "--model", SHIPPED / "shakespeare-char", "--prompt", "Zebra \u00e9"], ["--prompt", "vocabulary"]),
], ids=["settle-steps-on-baseline", "settle-steps-over-max", "max-tokens-over-context", "prompt-outside-vocab"])
def test_generate_errors_against_the_model(capsys, args, expect):
    assert_one_line_error(*run_main(capsys, *args), *expect)


@pytest.mark.parametrize("extra, expect", [
    (["--init-from", "{ckpt}", "--model-type", "gpt", "--block-size", "65"], ["--block-size 65", "64"]),
    (["--block-size", "4000"], ["--data", "too short", "--block-size 4000"]),
], ids=["block-size-over-init-context", "data-too-short"])
def test_train_errors_against_model_and_data(files, capsys, extra, expect):
    args = ["train", "--data", files["data"], "--out-dir", files["root"] / "o", "--preset", "tiny", "--device", "cpu",
            *[a.format(**files) for a in extra]]
    assert_one_line_error(*run_main(capsys, *args), *expect)


@pytest.mark.parametrize("command, expect", [
    (["eval", "{ckpt}", "--data", "{data}", "--block-size", "65"], ["--block-size 65", "1..64"]),
    (["eval", "{ckpt}", "--data", "{foreign}"], ["--data", "foreign.txt", "vocabulary"]),
    (["train", "--data", "{foreign}", "--out-dir", "{root}/o", "--init-from", "{ckpt}"],
     ["--data", "foreign.txt", "vocabulary"]),
], ids=["eval-block-size-over-context", "eval-text-outside-vocab", "train-text-outside-init-vocab"])
def test_errors_against_the_checkpoint(files, capsys, command, expect):
    foreign = files["root"] / "foreign.txt"
    foreign.write_text("Zebra \u00e9t\u00e9 " * 100)  # characters the checkpoint's vocabulary lacks
    args = [a.format(foreign=foreign, **files) for a in command] + ["--device", "cpu"]
    assert_one_line_error(*run_main(capsys, *args), *expect)


def test_help_documents_every_flag():
    from pcgpt.cli import build_parser
    from pcgpt.model.train_config import TrainConfig, default_of
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) >= {"generate", "inspect", "train", "eval", "serve"}
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"pcgpt {name} {action.option_strings or action.dest}: no help text"
            if action.option_strings and not (action.default is None or action.default is False or action.default == []):
                shown = sub._get_formatter()._get_help_string(action)
                assert "default" in shown, f"pcgpt {name} {action.option_strings}: default not in its help"
                assert "(default: )" not in shown
            for choice in action.choices or ():
                assert str(choice) in text, (name, action.dest, choice)
    # train's defaults are in its help, though its parser's defaults are None (presets fill them in)
    train_help = " ".join(subparsers.choices["train"].format_help().split())
    for field in TrainConfig.__dataclass_fields__:
        default = default_of(field)
        if field != "command" and default is not None and not isinstance(default, bool):
            flag = "--" + field.replace("_", "-")
            assert f"(default: {default}" in train_help.split(flag + " ", 1)[1], flag
    assert "(default: 20000)" in " ".join(subparsers.choices["eval"].format_help().split())


def test_preset_names_match_the_models_presets():
    from pcgpt.model.train_config import PRESET_NAMES
    assert PRESET_NAMES == tuple(PRESETS)


def test_help_and_usage_errors_import_neither_torch_nor_the_server(files):
    code = ("import sys\nfrom pcgpt.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', 'x', '--data', 'nope.txt']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'pcgpt.serve.server') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=files["root"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_train_says_its_cost_and_writes_ordinary_files(files, capsys):
    out_dir = files["root"] / "trained"
    old = os.umask(0o022)
    try:
        rc, out, err = run_main(capsys, "train", "--data", files["data"], "--out-dir", out_dir, "--preset", "tiny",
                                "--block-size", 16, "--batch-size", 2, "--max-iters", 2, "--eval-interval", 2,
                                "--eval-iters", 1, "--device", "cpu")
    finally:
        os.umask(old)
    assert rc == 0, err
    # 2 steps x 2 x 16 tokens; evaluations at steps 0 and 2, each 2 splits x 1 batch of 2 x 16
    assert "train: 2 steps x 32 tokens = 64 tokens; 2 evaluations x 2 splits x 1 batches = 128 tokens" in err
    assert "estimated time" in err
    assert err.index("train: 2 steps") < err.index("evaluate at step 0")  # the cost comes first
    for name in ("model.safetensors", "config.json", "train_state.pt"):
        assert stat.S_IMODE((out_dir / name).stat().st_mode) == 0o644, name


def test_eval_record_sets_the_validation_loss_inspect_reports(files, capsys):
    import shutil
    ckpt = shutil.copytree(files["ckpt"], files["root"] / "recorded")
    rc, out, err = run_main(capsys, "eval", ckpt, "--data", files["data"], "--max-tokens", "all", "--json",
                            "--record", "--device", "cpu")
    assert rc == 0, err
    report = json.loads(out)
    assert report["tokens"] == len(TEXT) - int(0.9 * len(TEXT)) - 1  # the whole validation split
    rc, out, err = run_main(capsys, "inspect", ckpt, "--json")
    card = json.loads(out)
    assert card["val_loss"] == report["results"][0]["loss"]
    assert card["eval"]["tokens"] == report["tokens"] and card["eval"]["settle_steps"] == 0
    assert card["eval"]["command"].startswith("pcgpt ")  # how to measure it again


def test_serve_warns_when_open_to_the_network_without_a_key(files, capsys, caplog):
    """The warning comes before the checkpoints are read, so a missing one ends the run right after."""
    missing = f"x={files['root'] / 'no-such-checkpoint'}"
    for extra, warned in (([], True), (["--api-key", "k"], False)):
        caplog.clear()
        rc, out, err = run_main(capsys, "serve", "--host", "0.0.0.0", "--model", missing, *extra)
        assert_one_line_error(rc, out, err, "no-such-checkpoint")
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("no API key" in w for w in warnings) == warned, warnings
