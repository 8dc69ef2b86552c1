"""`pcgpt train` and `pcgpt eval`."""

import dataclasses
import json
import sys


def register(sub, model_args, env):
    from model.train import TrainConfig
    t = sub.add_parser("train", help="train a baseline or PC model (nanoGPT-style loop)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "command":
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING
        kind = f.type if isinstance(f.type, type) else str(f.type)
        if kind in (bool, "bool"):
            t.add_argument(flag, action="store_true", default=f.default)
        elif kind in (int, "int"):
            t.add_argument(flag, type=int, default=None if required else f.default, required=required)
        elif kind in (float, "float"):
            t.add_argument(flag, type=float, default=None if required else f.default, required=required)
        elif "int" in str(kind) and "None" in str(kind):
            t.add_argument(flag, type=int, default=f.default)
        else:
            t.add_argument(flag, default=None if required else f.default, required=required)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="loss, perplexity, settling effect and calibration on a text file")
    model_args(e, positional=True)
    e.add_argument("--data", required=True, help="text file; with --split val only its last 10%% is used")
    e.add_argument("--split", default="val", choices=["val", "all"])
    e.add_argument("--settle-steps", default="0,1,2,4,8", help="comma-separated settle-step counts (PC models)")
    e.add_argument("--max-tokens", type=int, default=20000, help="evaluate the first N tokens of the split")
    e.add_argument("--block-size", type=int, default=None, help="window length (default: the model's context)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--plot", help="write a PNG of loss and tokens/s against settle steps")
    e.set_defaults(func=cmd_eval)


def cmd_train(args) -> int:
    from model.train import TrainConfig, command_line, train
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "command"}
    cfg = TrainConfig(**values, command=command_line())
    result = train(cfg)
    print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    from app.cli import _load
    from model.evaluate import evaluate, format_table, plot_results
    model, tokenizer, _ = _load(args)
    steps = [int(s) for s in args.settle_steps.split(",") if s.strip()]
    report = evaluate(model, tokenizer, args.data, settle_steps=steps, split=args.split, max_tokens=args.max_tokens,
                      block_size=args.block_size, batch_size=args.batch_size, name=args.model)
    if args.plot:
        plot_results(report, args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0
