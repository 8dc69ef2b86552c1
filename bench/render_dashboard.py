"""Renders docs/dashboard.png: the Grafana dashboard's main panels, drawn with matplotlib from a real
Prometheus (query_range) that scrapes a real `pcgpt serve` under ~60 s of rising load.

There is no Grafana here; the PNG plots the very PromQL of deploy/grafana/dashboards/pcgpt.json
(looked up by panel title), with $model = both models and $__rate_interval = 15 s (4 scrapes at 1 s).

    .venv/bin/python -m bench.render_dashboard [--seconds 60] [--out docs/dashboard.png]
"""

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from prometheus_stack import Prometheus, all_panels, drive_load, load_dashboard, substitute  # noqa: E402
from serving import BASELINE, PC, Server, make_pc_checkpoint  # noqa: E402

BASE_NAME, PC_NAME = "shakespeare-char", "shakespeare-char-pc"
PANELS = [  # dashboard panel titles, in grid order
    "Tokens/s by model", "Requests/s by finish reason", "Running and waiting requests", "Batch size (p50 / p99)",
    "Time to first token (p50 / p90 / p99)", "Inter-token latency (p50 / p90 / p99)",
    "End-to-end latency (p50 / p90 / p99)", "Queue time (p50 / p90 / p99)",
    "KV-cache usage", "Process memory", "Errors/s by type", "Device memory",
    "Mean token entropy (bits)", "Mean token surprise (bits)", "Settle steps per token (mean)",
    "PC energy after settling (p50 / p90 / p99)",
]
# one colour family per model (baseline blue, PC orange), line style by series within a model
COLOURS = {BASE_NAME: ["tab:blue", "navy", "deepskyblue"], PC_NAME: ["tab:orange", "darkred", "gold"],
           None: ["tab:green", "tab:purple", "tab:gray"]}
STYLES = ["-", "--", ":"]
SCALE = {"s": (1e3, "ms"), "bytes": (2 ** -20, "MiB"), "percentunit": (100, "%"), "reqps": (1, "req/s")}


def legend(fmt: str, metric: dict) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)
    return text.replace(PC_NAME, "PC").replace(BASE_NAME, "base").replace("127.0.0.1:", ":")


def render(prom: Prometheus, start: float, end: float, out: Path, subtitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {p["title"]: p for p in all_panels(load_dashboard())}
    missing = [t for t in PANELS if t not in panels]
    assert not missing, f"not on the dashboard: {missing}"
    cols = 4
    rows = (len(PANELS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), constrained_layout=True)
    for ax, title in zip(axes.flat, PANELS):
        panel = panels[title]
        unit = panel["fieldConfig"]["defaults"].get("unit", "none")
        factor, label = SCALE.get(unit, (1, ""))
        n, used = 0, {}
        for target in panel["targets"]:
            expr = substitute(target["expr"], [BASE_NAME, PC_NAME], rate_interval="15s")
            for series in sorted(prom.query_range(expr, start, end, 2), key=lambda s: legend(target["legendFormat"], s["metric"])):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) * factor for _, v in series["values"]]
                if not any(y == y and y != 0 for y in ys) and "waiting" not in target["legendFormat"]:
                    continue  # all-zero series (e.g. finish reasons that never happened) only crowd the legend
                model = series["metric"].get("model")
                shades = COLOURS.get(model, COLOURS[None])
                style = STYLES[used.get(model, 0) % len(STYLES)]
                ax.plot(xs, ys, lw=1.3, color=shades[used.get(model, 0) // len(STYLES) % len(shades)], ls=style,
                        label=legend(target["legendFormat"], series["metric"]))
                used[model] = used.get(model, 0) + 1
                n += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        if label:
            ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if n:
            ax.legend(fontsize=6.5, loc="upper left", ncol=2 if n > 4 else 1, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.suptitle("pcgpt dashboard (deploy/grafana/dashboards/pcgpt.json) from Prometheus query_range\n" + subtitle,
                 fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pc_path, pc_note = PC, "shipped PC checkpoint"
        if not (PC / "config.json").exists():
            pc_path, pc_note = make_pc_checkpoint(tmp / "pc"), "stand-in PC model (random generators over the baseline)"
        with Server({BASE_NAME: BASELINE, PC_NAME: pc_path}, "--max-batch-size", "4") as server:
            with Prometheus(f"127.0.0.1:{server.port}", tmp / "prometheus", interval="1s") as prom:
                prom.wait_for('up{job="pcgpt"}', lambda v: v == 1)
                time.sleep(5)
                start = time.time()
                phases = [1, 2, 4, 8, 12]  # client threads, rising: queueing shows at the end
                counts = {"ok": 0, "error": 0}
                for i, c in enumerate(phases):
                    got = drive_load(server.url, BASE_NAME, PC_NAME, seconds=args.seconds / len(phases), rounds=1,
                                     concurrency=c, max_tokens=48, seed=1000 * i)
                    counts = {k: counts[k] + got[k] for k in counts}
                time.sleep(8)
                end = time.time()
                print(f"load: {end - start:.0f} s, {counts['ok']} completions, {counts['error']} errors")
                subtitle = (f"{end - start:.0f} s of load, client threads {phases} over time; "
                            f"base = {BASE_NAME} (baseline GPT), PC = {pc_note}, settle_steps 0/1/2; "
                            f"max batch 4 per model, 1 torch thread")
                render(prom, start - 5, end, args.out, subtitle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
