"""A/B: this tree against another commit, side by side, interleaved, in fresh processes.

    python -m bench.ab --base REV [--repeats 3] [--only decode,http]

decode  GPT-2 124M (random weights, HF-converted: bench.models.gpt2_pair) in fp32 and bf16, batch 1
        and 16, greedy, prompt 16: decode steps per second of `bench.decode.run_ours`, the same
        call in both trees.
http    the shipped char baseline behind `pcgpt serve --max-batch-size 16 --threads 1`, 16
        streaming clients (bench.http_load.http_level, this tree's client for both servers).

Each repeat runs both trees, the order alternating between repeats, so drift on a shared machine
hits both alike; the medians and ranges are reported. The base commit is checked out with
`git worktree` under /tmp and run with its own sources (the package layout may differ: its
`bench/` and server entry point are found the same way).
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench.common import ROOT, median, write_json

DECODE_CHILD = r"""
import json, sys, torch
from bench.common import set_threads
from bench.models import gpt2_pair
from bench.decode import run_ours, summarise
set_threads()
dtype = getattr(torch, sys.argv[1])
ours, hf, tok = gpt2_pair(dtype=dtype)
del hf
out = {}
for B, n_new in ((1, 64), (16, 32)):
    prompts = torch.randint(0, tok.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B))
    run_ours(ours, prompts[:, :4], 2, tok.vocab_size)  # warm-up
    _, stamps = run_ours(ours, prompts, n_new, tok.vocab_size)
    out[B] = summarise(stamps, B)["decode_tok_s"]
print("RESULT " + json.dumps(out))
"""


def worktree(rev: str) -> Path:
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    path = Path("/tmp") / f"pcgpt-ab-{sha[:12]}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def tree_env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree)}


def decode_run(tree: Path, dtype: str) -> dict:
    p = subprocess.run([sys.executable, "-c", DECODE_CHILD, dtype], cwd=tree, env=tree_env(tree),
                       capture_output=True, text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"decode run in {tree} failed:\n{p.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(line[0][7:]).items()}


def serve_argv(tree: Path, checkpoint: Path, port: int) -> list[str]:
    cli = "pcgpt.cli" if (tree / "pcgpt" / "cli.py").exists() else "app.cli"
    return [sys.executable, "-c", f"import sys; from {cli} import main; sys.exit(main())", "serve", "--model",
            f"shakespeare-char={checkpoint}", "--port", str(port), "--max-batch-size", "16", "--max-queue", "64",
            "--threads", "1", "--log-level", "warning"]


def http_run(tree: Path, clients: int = 16, tokens: int = 8000, time_cap: float = 40.0) -> float:
    import httpx
    from bench.http_load import MAX_TOKENS, http_level
    sys.path.insert(0, str(ROOT / "tests"))
    from serving import free_port
    checkpoint = next(p for p in (tree / "pcgpt" / "checkpoints" / "shakespeare-char",
                                  tree / "checkpoints" / "shakespeare-char") if p.exists())
    port = free_port()
    proc = subprocess.Popen(serve_argv(tree, checkpoint, port), cwd=tree, env=tree_env(tree),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the server of {tree} exited with {proc.returncode}")
            time.sleep(0.2)
        per_client = max(2, -(-tokens // (MAX_TOKENS * clients)))
        asyncio.run(http_level(url, clients, 2, time_cap, proc.pid))  # warm-up
        return asyncio.run(http_level(url, clients, per_client, time_cap, proc.pid))["tok_s"]
    finally:
        proc.terminate()
        proc.wait(30)


def summary(values: list[float]) -> dict:
    return {"median": median(values), "min": min(values), "max": max(values), "all": values}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab")
    ap.add_argument("--base", required=True, help="the commit to compare this tree with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="decode,http", help="comma-separated: decode,http")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",")}
    trees = {"base": worktree(args.base), "head": ROOT}
    runs = {}
    jobs = [(k, d) for d in ("float32", "bfloat16") for k in ("decode",) if "decode" in only]
    jobs += [("http", None)] if "http" in only else []
    with tqdm(total=args.repeats * len(jobs) * 2, desc="A/B", unit="run") as bar:
        for rep in range(args.repeats):
            order = ("base", "head") if rep % 2 == 0 else ("head", "base")
            for kind, dtype in jobs:
                for side in order:
                    bar.set_postfix_str(f"{kind} {dtype or ''} {side}")
                    if kind == "decode":
                        for B, tok_s in decode_run(trees[side], dtype).items():
                            runs.setdefault((f"GPT-2 {dtype} batch {B} decode tok/s", side), []).append(tok_s)
                    else:
                        runs.setdefault(("HTTP 16 streaming clients tok/s (char)", side), []).append(http_run(trees[side]))
                    bar.update(1)
    rows = []
    for what in dict.fromkeys(k for k, _ in runs):
        base, head = summary(runs[(what, "base")]), summary(runs[(what, "head")])
        rows.append({"what": what, "base": base, "head": head, "head_over_base": head["median"] / base["median"]})
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"base": args.base, "head": head_rev, "repeats": args.repeats, "rows": rows}
    write_json("ab", result)
    print(f"| | base {args.base} | head {head_rev} | head / base |\n| --- | --- | --- | --- |")
    for r in rows:
        b, h = r["base"], r["head"]
        print(f"| {r['what']} | {b['median']:.1f} ({b['min']:.1f}-{b['max']:.1f}) | "
              f"{h['median']:.1f} ({h['min']:.1f}-{h['max']:.1f}) | {r['head_over_base']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
