"""Profiles behind the numbers: where the time of one decode step goes.

  profile_gpt2_b1.txt     torch.profiler, GPT-2 124M batch-1 decode steps (ours): op table
  profile_engine_char.txt cProfile of the real engine's step() with 32 running char requests
  profile_pc_T2.txt       torch.profiler, PC char model, batch-1 decode at T = 2
  pc_ops (profiles.json)  operators dispatched per decode step, baseline vs PC at each T: on the
                          char model a step is dispatch-bound, so time follows the op count
"""

import cProfile
import io
import pstats
import time
import types

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from bench.common import CHAR_CKPT, RESULTS, median, set_threads
from pcgpt.model.formats import inference_kernels
from pcgpt.model.generate import decode_step, kv_len_bucket, prefill


def _decode_steps(model, B, n, settle=None):
    cache = model.new_cache(B, max_len=16 + n + 1)
    prompts = torch.randint(0, model.config.vocab_size, (B, 16), generator=torch.Generator().manual_seed(0))
    logits = torch.stack([prefill(model, prompts[b], cache, b, settle)[0] for b in range(B)])
    pos = torch.full((B,), 16, dtype=torch.long)
    steps = None if settle is None else torch.full((B,), settle, dtype=torch.long)
    length = 16  # every row's, known on the host as the engine knows it

    def step():
        nonlocal logits, length
        with inference_kernels(model.lm_head.weight):  # as the engine runs each step
            logits, _ = decode_step(model, logits.argmax(-1), pos, cache, steps,
                                    kv_len=kv_len_bucket(length + 1, cache.max_len), max_settle_steps=settle)
        pos.add_(1)
        length += 1

    return step


class _OpCounter(TorchDispatchMode):
    """Counts every ATen operator that reaches a kernel (forward and backward; views included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step, n=5) -> float:
    step()
    with _OpCounter() as counter:
        for _ in range(n):
            step()
    return counter.count / n


def pc_op_counts(pc, base, quick=False):
    """Operators per batch-1 decode step and median step time: the baseline and PC at each T."""
    from bench.pc_cost import STEPS, time_decode
    rows = []
    with torch.no_grad():
        for settle in (None, *STEPS):
            model = base if settle is None else pc
            rows.append({"settle_steps": settle, "ops": ops_per_step(_decode_steps(model, 1, 12, settle)),
                         "ms": 1000 * time_decode(model, 1, None, 12 if quick else 32, settle=settle)})
    return rows


def torch_profile(step, n, title, path):
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    path.write_text(f"{title}\n{n} decode steps profiled\n\n{table}\n")


def engine_profile(path, n_rows=32, n_steps=60):
    from pcgpt.serve.engine import Engine, Request
    from pcgpt.serve.metrics import Metrics
    from bench.common import CHAR_CKPT
    from pcgpt.model.checkpoint import load_for_inference
    from pcgpt.model.sampling import SamplingParams
    model, tok, _ = load_for_inference(CHAR_CKPT)  # as the server loads it
    engine = Engine("prof", model, tok, Metrics(), max_batch_size=n_rows, max_queue=n_rows)
    # the engine's thread is not started: step() is driven by hand below
    for i in range(n_rows):
        r = Request(prompt_ids=tok.encode("ROMEO:\nWhat light"), max_tokens=n_steps + 5,
                    sampling=SamplingParams(temperature=1.0, seed=i))
        engine.waiting.append(r)
    torch.set_grad_enabled(False)
    engine.step()  # admit + prefill everything
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_steps):
        engine.step()
    prof.disable()
    torch.set_grad_enabled(True)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    path.write_text(f"cProfile of Engine.step() with {n_rows} running char-model requests, {n_steps} steps "
                    f"(torch threads {torch.get_num_threads()})\n\n{s.getvalue()}")


def _median_step_ms(model, B=1, n=40):
    cache = model.new_cache(B, 16 + n + 1)
    tok = torch.zeros(B, dtype=torch.long)
    times = []
    for i in range(n):
        pos = torch.full((B,), 16 + i)
        t0 = time.perf_counter()
        with inference_kernels(model.lm_head.weight):
            decode_step(model, tok, pos, cache, kv_len=kv_len_bucket(17 + i, cache.max_len))
        times.append(time.perf_counter() - t0)
    return 1000 * median(times[5:])


@torch.no_grad()
def gpt2_breakdown(ours, quick=False):
    """Where a batch-1 GPT-2 decode step goes, all in this process on the same weights: the full
    step; every weight matrix applied alone (the weights-only pass); the step with the weight
    matrices stubbed out (everything else); and the same step with bf16 weights, with how far
    its logits move from fp32."""
    n = 15 if quick else 40
    out = {"step_ms": _median_step_ms(ours, n=n)}
    lins = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {k: torch.randn(1, 1, k) for k in {m.in_features for m in lins}}
    passes = []
    for _ in range(n // 2):
        t0 = time.perf_counter()
        for m in lins:
            m(inputs[m.in_features])
        passes.append(time.perf_counter() - t0)
    out["weights_only_pass_ms"] = 1000 * median(passes[2:])
    from bench.models import gpt2_pair
    bf = gpt2_pair(dtype=torch.bfloat16)[0]  # the same weights as `pcgpt serve --dtype bfloat16` loads them
    out["bf16_step_ms"] = _median_step_ms(bf, n=n)
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    l32, lbf = ours(x).float(), bf(x).float()
    lp32, lpbf = torch.log_softmax(l32, -1), torch.log_softmax(lbf, -1)
    out["bf16_max_abs_dlogit"] = float((l32 - lbf).abs().max())
    out["fp32_logit_std"] = float(l32.std())
    out["bf16_top1_agree"] = float((l32.argmax(-1) == lbf.argmax(-1)).float().mean())
    out["bf16_mean_kl_nats"] = float((lp32.exp() * (lp32 - lpbf)).sum(-1).mean())
    del bf
    # stub the matrices: each Linear module returns a preallocated output of the right shape
    for m in lins:
        z = torch.zeros(m.out_features)
        m.forward = types.MethodType(lambda self, x, z=z: z.expand(*x.shape[:-1], -1), m)
    out["no_weights_step_ms"] = _median_step_ms(ours, n=n)
    for m in lins:
        del m.forward
    return out


@torch.no_grad()
def bf16_tolerance_char(quick=False):
    """How far `--dtype bfloat16` moves a trained model's predictions: the shipped char baseline in
    fp32 and in bf16 (prepacked, as served) on the validation split: loss, top-1 agreement, KL."""
    from pcgpt.model.checkpoint import load_for_inference
    from pcgpt.model.evaluate import make_windows, split_ids
    from bench.common import ROOT
    fp32, tok, _ = load_for_inference(CHAR_CKPT)
    bf16, _, _ = load_for_inference(CHAR_CKPT, dtype=torch.bfloat16)
    ids = split_ids(tok, str(ROOT / "data" / "tinyshakespeare" / "input.txt"), "val")
    windows = make_windows(ids[: 4096 if quick else 32768], fp32.config.block_size)
    x = torch.stack([w[0] for w in windows if len(w[0]) == fp32.config.block_size])
    y = torch.stack([w[1] for w in windows if len(w[1]) == fp32.config.block_size])
    l32, lbf = fp32(x).float(), bf16(x).float()
    lp32, lpbf = torch.log_softmax(l32, -1), torch.log_softmax(lbf, -1)
    loss = lambda lp: float(-lp.gather(-1, y[..., None]).mean())  # noqa: E731
    return {"tokens": y.numel(), "fp32_loss": loss(lp32), "bf16_loss": loss(lpbf),
            "max_abs_dlogit": float((l32 - lbf).abs().max()), "logit_std": float(l32.std()),
            "top1_agree": float((l32.argmax(-1) == lbf.argmax(-1)).float().mean()),
            "mean_kl_nats": float((lp32.exp() * (lp32 - lpbf)).sum(-1).mean())}


def run(quick=False):
    set_threads()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tqdm(total=3, desc="profiles", unit="profile") as bar:
        from bench.models import gpt2_pair
        ours, hf, _ = gpt2_pair()
        del hf
        with torch.no_grad():
            torch_profile(_decode_steps(ours, 1, 12), 3 if quick else 8,
                          "GPT-2 124M (random weights), ours, batch 1, fp32", RESULTS / "profile_gpt2_b1.txt")
        breakdown = gpt2_breakdown(ours, quick)
        del ours
        bar.update(1)
        engine_profile(RESULTS / "profile_engine_char.txt", n_steps=20 if quick else 60)
        bar.update(1)
        from bench.pc_cost import pc_model
        pc, base, _ = pc_model()
        with torch.no_grad():
            torch_profile(_decode_steps(pc, 1, 30, settle=2), 10 if quick else 20,
                          "PC char model, batch 1, T = 2", RESULTS / "profile_pc_T2.txt")
        pc_ops = pc_op_counts(pc, base, quick)
        bar.update(1)
    return {"files": ["profile_gpt2_b1.txt", "profile_engine_char.txt", "profile_pc_T2.txt"],
            "threads": torch.get_num_threads(), "gpt2_b1": breakdown, "pc_ops": pc_ops,
            "bf16_char": bf16_tolerance_char(quick)}
