"""Adaptive settling: held-out loss against the settle steps spent per token, as the entropy
threshold of `settle_steps: "auto"` sweeps from "settle every token" to "settle none".

    .venv/bin/python -m bench.pc_adaptive [--model pcgpt/checkpoints/shakespeare-char-pc]
        [--steps 4] [--max-tokens 20000] [--plot bench/results/pc_adaptive.png]

For each threshold (bits of the unsettled prediction's entropy; 0 settles every token) it prints
the loss (nats/char) over the validation split's first --max-tokens characters and the mean
settle steps used per token; the T = 0 loss and the always-settle loss bracket the curve.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from pcgpt.model.checkpoint import load_checkpoint
from pcgpt.model.evaluate import make_batches, make_windows, split_ids

THRESHOLDS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 1e9)


@torch.no_grad()
def sweep(model, batches, steps: int, thresholds=THRESHOLDS) -> list[dict]:
    rows = []
    for thr in thresholds:
        nll, used, n = 0.0, 0, 0
        for x, y in batches:
            logits, _, info = model.settled_forward(x, settle_steps=steps, settle_threshold=thr)
            nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            used += int(info["steps"].sum())
            n += y.numel()
        rows.append({"threshold_bits": thr if thr < 1e9 else None, "loss": nll / n, "steps_per_token": used / n})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pcgpt/checkpoints/shakespeare-char-pc")
    ap.add_argument("--data", default="data/tinyshakespeare/input.txt")
    ap.add_argument("--steps", type=int, default=4, help="settle steps of a token that settles")
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--plot", help="write a PNG of loss against settle steps per token")
    args = ap.parse_args(argv)
    model, tokenizer, _ = load_checkpoint(args.model)
    ids = split_ids(tokenizer, args.data, "val")[:args.max_tokens + 1]
    batches = make_batches(make_windows(ids, args.block_size), 8)
    rows = sweep(model, batches, args.steps)
    print("| entropy threshold (bits) | settle steps / token | loss (nats/char) |\n| --- | --- | --- |")
    for r in rows:
        thr = "never settles" if r["threshold_bits"] is None else f"{r['threshold_bits']:.1f}"
        print(f"| {thr} | {r['steps_per_token']:.3f} | {r['loss']:.5f} |")
    print(json.dumps({"model": args.model, "steps": args.steps, "rows": rows}))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["steps_per_token"] for r in rows], [r["loss"] for r in rows], "o-")
        for r in rows:
            if r["threshold_bits"] is not None:
                ax.annotate(f"{r['threshold_bits']:g}", (r["steps_per_token"], r["loss"]), fontsize=7)
        ax.set_xlabel("settle steps per token (compute)")
        ax.set_ylabel("validation loss (nats/char)")
        ax.set_title(f"adaptive settling, T = {args.steps} where unsure")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
