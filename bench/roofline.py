"""5. The physical limit: memory bandwidth and matmul rate of this machine, and the batch-1 decode
bound they imply for the GPT-2 124M shape (weight bytes per token / bandwidth).

Bandwidth: torch sum (bytes read per second) and a batch-1 matrix-vector product (bytes of
weight read per second: what a batch-1 decode step does) at working sets of 64 MiB to 1 GiB (the
VM reports a 480 MiB L3, but past ~256 MiB the rate is flat: main memory), plus numpy and torch
copies at 1 GiB (bytes read + written). The bound uses the fastest main-memory read rate, read
from huge pages like the served weights (model/hugepages.py).
A "weights-only pass" applies every GPT-2 weight matrix once to one vector and does nothing
else: the decode step with all non-weight work taken out, the kernel-level ceiling.
"""

import time

import numpy as np
import torch
from tqdm import tqdm

from bench.common import median, set_threads
from pcgpt.model.hugepages import empty_on_huge_pages

MiB = 1 << 20


def _best_of(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times), min(times)


GEMV_COLS = 4096


def read_rates(a: torch.Tensor, reps: int) -> tuple[float, float, float]:
    """GB/s reading the fp32 buffer a: torch sum, a batch-1 GEMV over it as an [out, in] weight
    (nn.Linear's layout) and as an [in, out] one (the layout `pcgpt serve` keeps on CPU): each
    reads every byte of the matrix once per product, like one decode step."""
    W = a.view(-1, GEMV_COLS)
    x, xt = torch.randn(1, GEMV_COLS), torch.randn(1, W.shape[0])
    rates = []
    for fn in (lambda: a.sum(), lambda: torch.nn.functional.linear(x, W), lambda: xt @ W):
        med, _ = _best_of(fn, reps)
        rates.append(a.nbytes / med / 1e9)
    return tuple(rates)


class MainMemoryProbe:
    """The bound's read rate measured again on demand, between the decode runs it is compared
    with: on this shared VM the rate drifts over minutes, so a bound measured in one section and
    a decode in another can be minutes and several GB/s apart."""

    def __init__(self, mib: int = 1024):
        self.buffer = empty_on_huge_pages((mib * MiB // 4,)).fill_(1)
        self()

    def __call__(self, reps: int = 3) -> float:
        """The fastest of the three read rates (GB/s), as the bound takes it."""
        return max(read_rates(self.buffer, reps))


def bandwidth(sizes_mib=(64, 256, 1024), reps=7, bar=None):
    """Read bandwidth (torch sum, batch-1 GEMV) at each working-set size, copy bandwidth at the
    largest. Past a few hundred MiB the rate is flat: that plateau is main memory. The torch
    buffers sit on huge pages where Linux offers them, as the served weights do (a 4 KiB-page
    buffer reads slower, and a bound measured on one would flatter the decode)."""
    out = {"sizes_mib": list(sizes_mib), "sum_read_GBps": [], "gemv_read_GBps": [], "gemv_t_read_GBps": []}
    for mib in sizes_mib:
        a = empty_on_huge_pages((mib * MiB // 4,)).fill_(1)
        for key, rate in zip(("sum_read_GBps", "gemv_read_GBps", "gemv_t_read_GBps"), read_rates(a, reps)):
            out[key].append(rate)
        del a
        if bar: bar.update(1)
    n = sizes_mib[-1] * MiB // 4
    a_np = np.ones(n, dtype=np.float32)
    b_np = np.empty_like(a_np)
    np.copyto(b_np, a_np)
    med, _ = _best_of(lambda: np.copyto(b_np, a_np), reps)
    out["numpy_copy_GBps"] = 2 * a_np.nbytes / med / 1e9
    del a_np, b_np
    a = empty_on_huge_pages((n,)).fill_(1)
    b = empty_on_huge_pages((n,))
    b.copy_(a)
    med, _ = _best_of(lambda: b.copy_(a), reps)
    out["torch_copy_GBps"] = 2 * a.nbytes / med / 1e9
    del a, b
    if bar: bar.update(1)
    out["torch_sum_read_GBps"] = out["sum_read_GBps"][-1]
    out["torch_gemv_read_GBps"] = out["gemv_read_GBps"][-1]
    out["torch_gemv_t_read_GBps"] = out["gemv_t_read_GBps"][-1]
    return out


def weights_only_pass(reps=15, served_layout=True, dtype=torch.float32):
    """Every weight matrix of the GPT-2 124M shape (fresh random tensors, real shapes) applied
    once to one vector, nothing else: the decode step with all non-weight work removed. With
    served_layout the matrices are laid out as `pcgpt serve` keeps them on CPU ([in, out] on huge
    pages in fp32, prepacked for oneDNN in bf16 where the CPU has native bf16), else in nn.Linear's
    [out, in]."""
    from pcgpt.model.formats import to_inference_format
    from pcgpt.model.gpt import GPT, preset_config
    torch.manual_seed(0)
    model = GPT(preset_config("gpt2")).eval().requires_grad_(False).to(dtype)
    if served_layout:
        to_inference_format(model)
    lins = []
    for blk in model.transformer.h:
        lins += [blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj]
    lins.append(model.lm_head)
    inputs = {n: torch.randn(1, 1, n, dtype=dtype) for n in (768, 3072)}

    def run():
        for lin in lins:
            lin(inputs[lin.in_features])

    run()
    med, _ = _best_of(run, reps)
    nbytes = sum(lin.weight.nbytes + (lin.bias.nbytes if lin.bias is not None else 0) for lin in lins)
    return {"weights_only_pass_ms": 1000 * med, "weights_only_pass_GBps": nbytes / med / 1e9,
            "weights_only_pass_tok_s": 1 / med}


def matmul_rate(n=2048, reps=5, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    med, _ = _best_of(lambda: a @ b, reps)
    return 2 * n ** 3 / med / 1e9


def run(quick=False, decode_result=None):
    threads = set_threads()
    sizes = (64, 256) if quick else (64, 256, 1024)
    with tqdm(total=len(sizes) + 6, desc="5 roofline", unit="test") as bar:
        bw = bandwidth(sizes, 3 if quick else 7, bar)
        rates = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rates[f"matmul_{name}_GFLOPs"] = matmul_rate(1024 if quick else 2048, 3 if quick else 5, dtype)
            bar.update(1)
        torch.set_num_threads(1)
        rates["matmul_fp32_1thread_GFLOPs"] = matmul_rate(1024 if quick else 2048, 3, torch.float32)
        set_threads(threads)
        bar.update(1)
        passes = weights_only_pass(5 if quick else 15)
        passes.update({f"{k}_linear_layout": v for k, v in weights_only_pass(5 if quick else 15, False).items()})
        bar.update(1)
        passes.update({f"{k}_bf16": v for k, v in weights_only_pass(5 if quick else 15, True, torch.bfloat16).items()})
        bar.update(1)
    # the GPT-2 124M shape: bytes read per batch-1 decode step
    from pcgpt.model.gpt import GPT, preset_config
    with torch.device("meta"):
        gpt2 = GPT(preset_config("gpt2"))
    from bench.models import weight_bytes_per_token
    wbytes = weight_bytes_per_token(gpt2)
    # the fastest read rate measured from main memory (largest working set): the physical bound
    read_bw = max(bw["torch_sum_read_GBps"], bw["torch_gemv_read_GBps"], bw["torch_gemv_t_read_GBps"]) * 1e9
    flops = gpt2.flops_per_token(context=48)
    with torch.device("meta"):
        wbytes_bf16 = weight_bytes_per_token(GPT(preset_config("gpt2")).to(torch.bfloat16))
    result = {"threads": threads, **bw, **rates, **passes, "gpt2_weight_bytes_per_token": wbytes,
              "gpt2_flops_per_token": flops,
              "bound_read_GBps": read_bw / 1e9,
              "gpt2_b1_bound_tok_s": read_bw / wbytes,
              "gpt2_bf16_weight_bytes_per_token": wbytes_bf16,
              "gpt2_bf16_b1_bound_tok_s": read_bw / wbytes_bf16,
              "gpt2_b1_compute_bound_tok_s": rates["matmul_fp32_GFLOPs"] * 1e9 / flops}
    return result


def attach_decode(roof: dict, decode: dict | None) -> dict:
    """How close batch-1 GPT-2 decode (ours and HF) gets to the bandwidth bound."""
    if not decode:
        return roof
    for r in decode["rows"]:
        if r["model"] == "gpt2" and r["batch"] == 1:
            for m in ("ours", "hf", "nanogpt"):
                if f"{m}_decode_tok_s" in r:
                    roof[f"gpt2_b1_{m}_tok_s"] = r[f"{m}_decode_tok_s"]
                    roof[f"gpt2_b1_{m}_fraction_of_bound"] = r[f"{m}_decode_tok_s"] / roof["gpt2_b1_bound_tok_s"]
                    roof[f"gpt2_b1_{m}_achieved_GBps"] = r[f"{m}_decode_tok_s"] * roof["gpt2_weight_bytes_per_token"] / 1e9
                    if "read_GBps_all" in r:  # each repeat against the bound measured right after it
                        ratios = [tok_s * roof["gpt2_weight_bytes_per_token"] / (gbps * 1e9)
                                  for tok_s, gbps in zip(r[f"{m}_decode_tok_s_all"], r["read_GBps_all"])]
                        roof[f"gpt2_b1_{m}_fraction_of_interleaved_bound_all"] = ratios
                        roof[f"gpt2_b1_{m}_fraction_of_interleaved_bound"] = median(ratios)
            if "read_GBps_all" in r:
                roof["interleaved_read_GBps_all"] = r["read_GBps_all"]
        if r["model"] == "gpt2-bf16" and r["batch"] == 1 and "gpt2_bf16_b1_bound_tok_s" in roof:
            for m in ("ours", "hf"):
                if f"{m}_decode_tok_s" in r:
                    roof[f"gpt2_bf16_b1_{m}_tok_s"] = r[f"{m}_decode_tok_s"]
                    roof[f"gpt2_bf16_b1_{m}_fraction_of_bound"] = r[f"{m}_decode_tok_s"] / roof["gpt2_bf16_b1_bound_tok_s"]
    return roof
