"""2. PC settling cost: ms per decode step and tokens/s against settle steps T, next to the
baseline GPT of the same weights (the PC model's bottom-up path), with the predicted
multiple (1 + 3·T baseline forwards) and the measured one.

Cost does not depend on training, so without a shipped PC checkpoint the PC model is built from
the shipped baseline with PCGPT.from_baseline (generators perturbed so settling moves, as the
server tests do). Every configuration is timed interleaved within each repeat.
"""

import time

import torch
from tqdm import tqdm

from bench.common import CHAR_CKPT, CHAR_PC_CKPT, median, set_threads
from pcgpt.model.checkpoint import load_for_inference
from pcgpt.model.formats import to_inference_format
from pcgpt.model.formats import inference_kernels
from pcgpt.model.generate import decode_step, kv_len_bucket, prefill

STEPS = (0, 1, 2, 4, 8)
BATCHES = (1, 8)


def pc_model():
    if (CHAR_PC_CKPT / "config.json").exists():
        pc, _, _ = load_for_inference(CHAR_PC_CKPT)  # as `pcgpt serve` loads them
        base, _, _ = load_for_inference(CHAR_CKPT)
        # the baseline of the same weights: the PC checkpoint's own bottom-up path
        base.load_state_dict({k: v for k, v in pc.state_dict().items() if k in base.state_dict()})
        source = f"pcgpt/checkpoints/{CHAR_PC_CKPT.name}"
    else:
        from pcgpt.model.pc import PCGPT
        base, _, _ = load_for_inference(CHAR_CKPT)
        torch.manual_seed(0)
        pc = PCGPT.from_baseline(base).eval()
        with torch.no_grad():
            for g in pc.generators:
                torch.nn.init.normal_(g.c_proj.weight, std=0.05)
        to_inference_format(pc.requires_grad_(False))
        source = f"PCGPT.from_baseline({CHAR_CKPT.name}) with random generators"
    return pc, base, source


@torch.no_grad()
def time_decode(model, B, steps, n_decode, prompt_len=16, settle=None):
    """Median seconds per batched decode step over n_decode steps (after per-row prefill)."""
    cache = model.new_cache(B, max_len=prompt_len + n_decode + 1)
    g = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, model.config.vocab_size, (B, prompt_len), generator=g)
    logits = torch.stack([prefill(model, prompts[b], cache, b, settle)[0] for b in range(B)])
    pos = torch.full((B,), prompt_len, dtype=torch.long)
    settle_t = None if settle is None else torch.full((B,), settle, dtype=torch.long)
    times = []
    for i in range(n_decode):
        token = logits.argmax(-1)
        t0 = time.perf_counter()
        with inference_kernels(model.lm_head.weight):  # as the engine runs each step
            logits, _ = decode_step(model, token, pos, cache, settle_t,
                                    kv_len=kv_len_bucket(prompt_len + i + 1, cache.max_len), max_settle_steps=settle)
        times.append(time.perf_counter() - t0)
        pos += 1
    return median(times)


def run(quick=False, n_decode=32, repeats=5):
    threads = set_threads()
    pc, base, source = pc_model()
    if quick:
        n_decode, repeats = 8, 1
    configs = [("baseline", None)] + [(f"pc_T{t}", t) for t in STEPS]
    result = {"threads": threads, "source": source, "n_decode": n_decode, "repeats": repeats, "rows": []}
    with tqdm(total=len(BATCHES) * repeats * len(configs), desc="2 pc cost", unit="run") as bar:
        for B in BATCHES:
            for name, t in configs:  # warm-up
                time_decode(base if t is None else pc, B, t, 2, settle=t)
            samples = {name: [] for name, _ in configs}
            for _ in range(repeats):
                for name, t in configs:
                    samples[name].append(time_decode(base if t is None else pc, B, t, n_decode, settle=t))
                    bar.update(1)
            base_s = median(samples["baseline"])
            result["rows"].append({"batch": B, "config": "baseline", "settle_steps": None, "ms_per_step": 1000 * base_s,
                                   "tok_s": B / base_s, "multiple": 1.0, "predicted": 1.0})
            for name, t in configs[1:]:
                s = median(samples[name])
                predicted = 1 + 3 * t
                result["rows"].append({"batch": B, "config": name, "settle_steps": t, "ms_per_step": 1000 * s,
                                       "tok_s": B / s, "multiple": s / base_s, "predicted": predicted,
                                       "measured_over_predicted": (s / base_s) / predicted})
    return result
