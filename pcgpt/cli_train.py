"""`pcgpt train` and `pcgpt eval`."""

import dataclasses
import json


def register(sub, model_args, env):
    from pcgpt.model.train import TRAIN_CHOICES, TrainConfig
    t = sub.add_parser("train", help="train a baseline or PC model (nanoGPT-style loop)",
                       description="Defaults: model/train.py TrainConfig; the gpt2 presets take nanoGPT's "
                                   "(lr 6e-4, warmup 2000, 12 x 5 accumulation, betas 0.9/0.95, ...).")
    # every default is None here, so train_config() can tell a value given from a preset's default
    for f in dataclasses.fields(TrainConfig):
        if f.name == "command":
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING
        kind = str(f.type)
        if kind == "bool" or f.type is bool:
            t.add_argument(flag, action="store_true", default=None)
        elif "int" in kind or f.type is int:
            t.add_argument(flag, type=int, default=None, required=required)
        elif "float" in kind or f.type is float:
            t.add_argument(flag, type=float, default=None, required=required)
        else:
            t.add_argument(flag, default=None, required=required, choices=TRAIN_CHOICES.get(f.name))
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
    from pcgpt.model.train import TrainConfig, command_line, train, train_config
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "command"}
    cfg = train_config({**given, "command": command_line()})
    result = train(cfg)
    print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    from pcgpt.cli import _load
    from pcgpt.model.evaluate import evaluate, format_table, plot_results
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
