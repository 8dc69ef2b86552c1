"""Training FLOPs per optimizer step of the shipped recipes, for the compute-matched baseline of
docs/pc.md: the baseline's (32 × 256 tokens, all weights) against the PC fine-tune's (16 × 128
tokens, generators and precisions only, K unrolled settling steps, K ∈ {0, 1, 2} uniformly).
Counted with pcgpt.model.compare.FlopCount (matmuls and attention, forward and backward).

    .venv/bin/python -m bench.train_flops
"""

import json
from unittest import mock

import torch

from bench.common import CHAR_CKPT, CHAR_PC_CKPT
from pcgpt.model.checkpoint import load_checkpoint
from pcgpt.model.compare import FlopCount


def batch(model, rows, block):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.config.vocab_size, (rows, block), generator=g) for _ in range(2)]


def step_flops(model, x, y, **loss_options) -> float:
    with FlopCount() as count:
        loss, _ = model.loss(x, y, **loss_options)
        loss.backward()
    return count.total


def run() -> dict:
    base, _, _ = load_checkpoint(CHAR_CKPT)
    base.train()
    pc, _, _ = load_checkpoint(CHAR_PC_CKPT)
    pc.train()
    pc.requires_grad_(False)  # --pc-train generators: the bottom-up path is frozen
    for p in pc.generator_parameters():
        p.requires_grad_(True)
    baseline = step_flops(base, *batch(base, 32, 256))
    x, y = batch(pc, 16, 128)
    per_K = {}
    for K in (0, 1, 2):  # PCGPT.loss draws K with torch.randint: fix it
        with mock.patch("torch.randint", lambda *a, _K=K, **k: torch.tensor(_K)):
            per_K[K] = step_flops(pc, x, y, k_max=2)
    pc_mean = sum(per_K.values()) / len(per_K)
    return {"baseline_step": baseline, "pc_step_by_K": per_K, "pc_step_mean": pc_mean,
            "pc_step_in_baseline_steps": pc_mean / baseline}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
