"""Where a quantized decode step's time goes: the matmul kernels alone over GPT-2 124M's weights.

One "weights pass" is what a decode step's matmuls read: 12 layers' c_attn (768x2304), attn
c_proj (768x768), c_fc (768x3072), mlp c_proj (3072x768) and the head (768x50257), each a
separate weight (main memory, not cache). For M = 1, 4, 16 rows it times the pass in each format,
the formats interleaved in each repeat, and gives ms per pass and the weight bytes read per second:

  fp32        F.linear over the [in, out] layout (formats.RowsLinear: what pcgpt serves fp32
              weights under 1 MiB in)
  fp32pk      the weights prepacked for oneDNN (formats.PrepackedLinear: fp32 weights of 1 MiB
              and up, as pcgpt serves them)
  bf16        F.linear, bf16 weights and activations (oneDNN)
  bf16pk      bf16 prepacked for oneDNN (formats.PrepackedLinear, as `--dtype bfloat16` serves)
  int8        pcgpt --quantize int8: QuantizedLinear, which takes int8pack up to
              quantize.INT8PACK_MAX_ROWS rows and int8ao beyond
  int8ao      torchao's Int8Tensor path alone (it converts the int8 weight to the activation
              dtype, then one fp32 matmul)
  int8pack    ATen's _weight_int8pack_mm alone (int8 weight, fp32 activations, one kernel)
  int8dq      torchao Int8DynamicActivationInt8WeightConfig alone (eager: torch._int_mm)
  int8dyn     pcgpt --quantize int8-dynamic: FBGEMM's linear_dynamic (activations quantized per call)
  int4        pcgpt --quantize int4 --group-size 32: torchao Int4OpaqueTensor,
              ATen's _weight_int4pack_mm_for_cpu

  python -m bench.quant_kernels [--threads N] [--repeats R]   (writes bench/results/quant_kernels.json)
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import RESULTS, machine
from pcgpt.model.formats import PrepackedLinear, RowsLinear
from pcgpt.model.quantize import Quantization, QuantizedLinear, tensor_bytes

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]


def layers(fmt: str):
    torch.manual_seed(0)
    out = []
    for k, n in SHAPES:
        lin = nn.Linear(k, n, bias=False).requires_grad_(False)
        if fmt == "fp32":
            out.append(RowsLinear.wrap(lin))
        elif fmt == "fp32pk":
            out.append(PrepackedLinear.wrap(lin))
        elif fmt == "bf16":
            out.append(lin.to(torch.bfloat16))
        elif fmt == "bf16pk":
            out.append(PrepackedLinear.wrap(lin.to(torch.bfloat16)))
        elif fmt in ("int8", "int8ao"):
            out.append(QuantizedLinear.wrap(lin, Quantization("int8")))
        elif fmt == "int4":
            out.append(QuantizedLinear.wrap(lin, Quantization("int4", 32)))
        elif fmt == "int8dyn":
            out.append(QuantizedLinear.wrap(lin, Quantization("int8-dynamic")))
        elif fmt == "int8pack":
            w = lin.weight
            scale = w.abs().amax(1) / 127
            q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
            out.append((q, scale))
        elif fmt == "int8dq":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            quantize_(lin, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
            out.append(lin)
    return out


def weights_pass(fmt, mods, x):
    if fmt == "int8pack":
        for (q, scale), (k, n) in zip(mods, SHAPES):
            torch._weight_int8pack_mm(x[:, :k], q, scale)
        return
    xx = x.to(torch.bfloat16) if fmt.startswith("bf16") else x
    for m, (k, n) in zip(mods, SHAPES):
        if fmt == "int8ao":
            F.linear(xx[:, :k], m.weight)
        else:
            m(xx[:, :k])


def nbytes(fmt, mods):
    if fmt == "int8pack":
        return sum(q.numel() + s.numel() * 4 for q, s in mods)
    return sum(tensor_bytes(m.weight.data) for m in mods)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--formats", default="fp32,bf16,int8,int8ao,int8pack,int8dq,int8dyn,int4")
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--out", default=str(RESULTS / "quant_kernels.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    mods = {f: layers(f) for f in formats}
    sizes = {f: nbytes(f, mods[f]) for f in formats}
    rows = []
    for M in map(int, args.rows.split(",")):
        x = torch.randn(M, 3072)
        times = {f: [] for f in formats}
        for f in formats:
            weights_pass(f, mods[f], x)  # warm-up
        for _ in range(args.repeats):
            for f in formats:
                t = time.perf_counter()
                weights_pass(f, mods[f], x)
                times[f].append(time.perf_counter() - t)
        for f in formats:
            med = statistics.median(times[f])
            rows.append({"rows": M, "format": f, "ms_median": med * 1e3, "ms_min": min(times[f]) * 1e3,
                         "ms_max": max(times[f]) * 1e3, "weight_bytes": sizes[f], "GBps_median": sizes[f] / med / 1e9})
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine(), "threads": args.threads, "repeats": args.repeats,
              "command": " ".join(["python -m bench.quant_kernels", *(sys.argv[1:] if argv is None else argv)]),
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
