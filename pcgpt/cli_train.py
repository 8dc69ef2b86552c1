"""`pcgpt train` and `pcgpt eval`."""

import dataclasses
import json

from pcgpt import cli_args

EVAL_DEFAULT_TOKENS = 20_000


def register(sub, model_args, env):
    from pcgpt.model.train_config import PRESET_TRAIN_DEFAULTS, TrainConfig, default_of
    t = sub.add_parser("train", help="train a baseline or PC model (nanoGPT-style loop)",
                       description="Train a baseline or PC model (nanoGPT's loop). Prints the run's cost (tokens, "
                                   "then an estimated time) before it starts; writes OUT_DIR/config.json + "
                                   "model.safetensors (the best checkpoint by validation loss) and "
                                   "OUT_DIR/train_state.pt (for --resume). The gpt2 presets take nanoGPT's "
                                   "defaults where they differ (shown as 'gpt2 presets: ...').")
    gpt2 = PRESET_TRAIN_DEFAULTS["gpt2"]
    # every parser default is None, so train_config() can tell a value given from a preset's default;
    # the help says the real default
    for f in dataclasses.fields(TrainConfig):
        if f.name == "command":
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING
        meta, default = f.metadata, default_of(f.name)
        notes = [f"default: {default}"] if default is not None and not isinstance(default, bool) else []
        if f.name in gpt2 and gpt2[f.name] != default:
            notes.append(f"gpt2 presets: {gpt2[f.name]}")
        text = meta["help"] + (f" ({'; '.join(notes)})" if notes else "")
        kind = str(f.type)
        if f.type is bool or kind == "bool":
            t.add_argument(flag, action="store_true", default=None, help=text)
            continue
        kwargs = dict(default=None, required=required, help=text)
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = ("PATH" if f.name in ("data", "out_dir", "init_from") else
                                 "N" if "int" in kind else "X" if "float" in kind else f.name.upper())
        if f.name == "data":
            kwargs["type"] = cli_args.existing_file
        elif f.name == "init_from":
            kwargs["type"] = cli_args.existing_path
        elif f.name == "device":
            kwargs["type"] = cli_args.device
        elif "int" in kind:
            kwargs["type"] = cli_args.positive_int if meta.get("minimum") == 1 else (
                cli_args.nonnegative_int if meta.get("minimum") == 0 else int)
        elif "float" in kind:
            kwargs["type"] = cli_args.nonnegative_float if meta.get("minimum") == 0 else float
        t.add_argument(flag, **kwargs)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="loss, perplexity, settling effect and calibration on a text file",
                       description="Loss, perplexity, bits per character, the effect of settling (PC models) and "
                                   "how well each uncertainty signal predicts surprise, on a text file. The whole "
                                   "validation split of Tiny Shakespeare is 111,539 tokens (--max-tokens all); "
                                   "the cost is printed before it starts.")
    model_args(e, positional=True)
    e.add_argument("--data", required=True, type=cli_args.existing_file, metavar="PATH",
                   help="text file; with --split val only its last 10%% is used (the cut training uses)")
    e.add_argument("--split", default="val", choices=["val", "all"], help="val: the last 10%%; all: the whole file")
    e.add_argument("--settle-steps", default=[0, 1, 2, 4, 8], type=cli_args.int_list, metavar="T,T,...",
                   help="settle-step counts to evaluate (pc models; a baseline evaluates 0 only)")
    e.add_argument("--max-tokens", type=cli_args.count_or_all, default=EVAL_DEFAULT_TOKENS, metavar="N|all",
                   help="evaluate the first N tokens of the split, or all of it")
    e.add_argument("--block-size", type=cli_args.positive_int, default=None, metavar="N",
                   help="window length (default: the model's context)")
    e.add_argument("--batch-size", type=cli_args.positive_int, default=8, metavar="N", help="windows per forward")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--plot", type=cli_args.writable_file, metavar="PNG",
                   help="write a PNG of loss and tokens/s against settle steps")
    e.add_argument("--record", action="store_true",
                   help="store the loss at the checkpoint's default settle steps as its validation loss (config.json "
                        "'eval': what inspect and /v1/models report); pcgpt checkpoints, --split val only")
    e.set_defaults(func=cmd_eval)


def cmd_train(args) -> int:
    from pcgpt.model.train_config import TrainConfig, check_train_config, command_line, train_config
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "command"}
    cfg = train_config({**given, "command": command_line()})
    pc_flags = [name for name, value in given.items() if name.startswith("pc_") and value is not None]
    if pc_flags and cfg.model_type != "pc":
        raise ValueError(f"--{pc_flags[0].replace('_', '-')}: only for --model-type pc")
    check_train_config(cfg)  # before torch loads: a mistake is answered at once
    from pcgpt.model.train import train
    result = train(cfg)
    print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    if args.record and args.split != "val":
        raise ValueError("--record: the validation loss is measured on --split val")
    from pcgpt.cli import _load
    from pcgpt.model.evaluate import evaluate, format_table, plot_results, record_eval
    model, tokenizer, _ = _load(args)
    report = evaluate(model, tokenizer, args.data, settle_steps=args.settle_steps, split=args.split,
                      max_tokens=args.max_tokens, block_size=args.block_size, batch_size=args.batch_size,
                      name=args.model)
    if args.plot:
        plot_results(report, args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    if args.record:
        from pcgpt.model.train_config import command_line
        record_eval(args.model, model, report, command_line())
    return 0
