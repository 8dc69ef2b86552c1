"""The llama.cpp anchor: pcgpt against llama.cpp on the same GPT-2 124M-shape weights, CPU.

  make bench-llamacpp     (= python -m bench.llamacpp)

1. Builds llama.cpp's llama-bench, llama-batched-bench and llama-quantize from the
   llama-cpp-python sdist on PyPI (llama.cpp is vendored inside it, with its converter
   convert_hf_to_gguf.py and gguf-py) into .cache/llamacpp/ (git-ignored; built once, reused).
2. Writes bench's HF GPT-2 directory (random weights, seed 0: bench.models' GPT2LMHeadModel)
   with a GPT-2 tokenizer beside it (the shipped encoder.json / vocab.bpe as vocab.json /
   merges.txt, and n_ctx in the config, which transformers 5 no longer saves and the converter
   reads), converts it to f32 / f16 / bf16 / q8_0 GGUF with llama.cpp's converter, and q4_0 with
   llama-quantize from the f16 file.
3. Decode throughput, greedy, prompt 16, --new-tokens new tokens, batch 1, 4 and 16, the same
   threads (--threads, default every core): llama-batched-bench (its S_TG, generation tokens/s
   over the batch) against pcgpt's batched decode (bench.decode.run_ours, steady-state decode
   tokens/s) at fp32 / bf16 / int8-dynamic / int4 (group 32), facing f32 / f16 and bf16 / q8_0 /
   q4_0, the methods interleaved in each repeat.
   Then a contended column at batch 1: the same with two busy loops on the machine.
Writes bench/results/llamacpp.json (--out). `make bench-llamacpp` runs it for f32 / f16 / bf16 /
q8_0, again for q4_0 at batch 1 and 4 (into llamacpp_q4.json), at batch 1 with --compile (into
llamacpp_compile.json), then bench.llamacpp_profile.
`make test` does not use any of this.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS, ROOT, machine, set_threads

CACHE = ROOT / ".cache" / "llamacpp"
BUILD = CACHE / "build"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# pcgpt's format facing each llama.cpp type (the table pairs them so)
OURS_FOR = {"f32": "fp32", "f16": "bf16", "bf16": "bf16", "q8_0": "int8-dynamic", "q4_0": "int4"}
BATCHES = (1, 4, 16)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def source_dir() -> Path:
    found = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    log("downloading the llama-cpp-python sdist (llama.cpp is vendored inside)")
    subprocess.run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:", "--no-deps",
                    "-d", str(CACHE)], check=True)
    sdist = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")
    return sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def tool(name: str) -> Path:
    return BUILD / "bin" / name


def build() -> dict:
    """Builds the tools once; returns the source version and the seconds the build took (the
    first build's, kept in a stamp file)."""
    src = source_dir()
    stamp = CACHE / "build-seconds.json"
    if all(tool(t).exists() for t in TOOLS) and stamp.exists():
        return json.loads(stamp.read_text())
    for needed in ("cmake", "g++"):
        if shutil.which(needed) is None:
            raise SystemExit(f"bench-llamacpp: {needed} is missing (make deps-system installs cmake and g++)")
    t = time.monotonic()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(BUILD), *generator, "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
                    "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(BUILD), "--target", *TOOLS, "-j", str(os.cpu_count() or 2)], check=True)
    info = {"source": src.parent.parent.name, "build_seconds": round(time.monotonic() - t), "cores": os.cpu_count()}
    stamp.write_text(json.dumps(info))
    return info


def hf_dir() -> Path:
    """bench's GPT-2 124M shape (random weights, seed 0) as an HF directory llama.cpp converts."""
    d = CACHE / "gpt2-random-hf"
    if (d / "model.safetensors").exists():
        return d
    import transformers
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])
    (d / "config.json").write_text(json.dumps(config, indent=2))
    assets = ROOT / "pcgpt" / "model" / "assets" / "gpt2"
    shutil.copy(assets / "encoder.json", d / "vocab.json")
    shutil.copy(assets / "vocab.bpe", d / "merges.txt")
    return d


def gguf(kind: str) -> Path:
    out = CACHE / f"gpt2-random-{kind}.gguf"
    if out.exists():
        return out
    if kind == "q4_0":
        subprocess.run([str(tool("llama-quantize")), str(gguf("f16")), str(out), "q4_0"], check=True,
                       stdout=subprocess.DEVNULL)
        return out
    src = source_dir()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir()), "--outtype", kind,
                    "--outfile", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def run_llamacpp(kind: str, threads: int, prompt: int, new: int, batches=BATCHES) -> dict:
    """llama-batched-bench: generation tokens/s (S_TG) per batch size."""
    out = subprocess.run([str(tool("llama-batched-bench")), "-m", str(gguf(kind)), "-c", str(max(batches) * (prompt + new) + 64),
                          "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(new),
                          "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads),
                          "--output-format", "jsonl"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {int(r["pl"]): float(r["speed_tg"]) for r in rows}


def load_ours(fmt: str):
    from pcgpt.model.checkpoint import load_for_inference
    from pcgpt.model.quantize import Quantization
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    q = {"int8": Quantization("int8"), "int8-dynamic": Quantization("int8-dynamic"),
         "int4": Quantization("int4", 32)}.get(fmt)
    model, _, _ = load_for_inference(hf_dir(), dtype=dtype, quantization=q)
    return model


def run_ours(model, batch: int, prompt: int, new: int, compiled=None) -> float:
    from bench.decode import run_ours as decode, summarise
    prompts = torch.randint(0, 50257, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    _, stamps = decode(model, prompts, new, 50257, compiled)
    return summarise(stamps, batch)["decode_tok_s"]


def _busy():
    while True:
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    # q4_0 faces pcgpt's int4, ~20x slower per step here (BENCHMARKS.md): a run of its own, with
    # fewer batches and tokens (the Makefile's second command)
    p.add_argument("--types", default="f32,f16,bf16,q8_0", help=f"some of {','.join(GGUF_TYPES)}")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--compile", action="store_true",
                   help="also pcgpt with its batch-1 step compiled (`pcgpt serve --compile`), at batch 1")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "llamacpp.json"))
    args = p.parse_args(argv)
    info = build()
    log(f"llama.cpp tools built ({info})")
    if args.build_only:
        return
    set_threads(args.threads)
    kinds = args.types.split(",")
    batches = tuple(int(b) for b in args.batches.split(","))
    for kind in kinds:
        gguf(kind)
    ours = {fmt: load_ours(fmt) for fmt in dict.fromkeys(OURS_FOR[k] for k in kinds)}
    for model in ours.values():  # warm-up: first-call paths
        run_ours(model, 1, 4, 2)
    compiled = {}  # "<format>+compile" -> (model, its compiled batch-1 step), measured at batch 1
    if args.compile and 1 in batches:
        from pcgpt.serve.compiled_step import CompiledDecode, compile_supported
        for fmt, model in ours.items():
            if compile_supported(model) is None:
                compiled[f"{fmt}+compile"] = (model, CompiledDecode(model, model.new_cache(1, args.prompt + args.new_tokens)))
                log(f"pcgpt {fmt}: batch-1 step compiled in {compiled[f'{fmt}+compile'][1].compile_seconds:.0f} s")
    llama = {k: {b: [] for b in batches} for k in kinds}
    mine = {f: {b: [] for b in batches} for f in ours} | {f: {1: []} for f in compiled}
    for r in range(args.repeats):
        for kind in kinds:
            for b, v in run_llamacpp(kind, args.threads, args.prompt, args.new_tokens, batches).items():
                llama[kind][b].append(v)
            log(f"repeat {r} llama.cpp {kind}: {[llama[kind][b][-1] for b in batches]}")
        for fmt, model in ours.items():
            for b in batches:
                mine[fmt][b].append(run_ours(model, b, args.prompt, args.new_tokens))
            log(f"repeat {r} pcgpt {fmt}: {[mine[fmt][b][-1] for b in batches]}")
        for name, (model, step) in compiled.items():
            mine[name][1].append(run_ours(model, 1, args.prompt, args.new_tokens, step))
            log(f"repeat {r} pcgpt {name}: {mine[name][1][-1]}")
    # contended: two busy loops beside a batch-1 run of each
    busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(2)]
    for proc in busy:
        proc.start()
    contended = {}
    try:
        for kind in kinds:
            contended[f"llama.cpp {kind}"] = run_llamacpp(kind, args.threads, args.prompt, args.new_tokens // 4, (1,))[1]
        for fmt, model in ours.items():
            contended[f"pcgpt {fmt}"] = run_ours(model, 1, args.prompt, args.new_tokens // 4)
        for name, (model, step) in compiled.items():
            contended[f"pcgpt {name}"] = run_ours(model, 1, args.prompt, args.new_tokens // 4, step)
    finally:
        for proc in busy:
            proc.terminate()
    summary = lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}
    result = {"machine": machine(), "threads": args.threads, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "llama_cpp": info,
              "command": " ".join(["python -m bench.llamacpp", *(sys.argv[1:] if argv is None else argv)]),
              "llama_cpp_tok_s": {k: {b: summary(v) for b, v in d.items()} for k, d in llama.items()},
              "pcgpt_tok_s": {f: {b: summary(v) for b, v in d.items()} for f, d in mine.items()},
              "contended_batch1_tok_s": contended}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for b in batches:
        cells = [f"pcgpt {f} {statistics.median(mine[f][b]):.0f}" for f in mine if b in mine[f]] + \
                [f"llama.cpp {k} {statistics.median(llama[k][b]):.0f}" for k in kinds]
        print(f"batch {b}: " + ", ".join(cells))
    print(f"contended batch 1: {json.dumps({k: round(v, 1) for k, v in contended.items()})}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
