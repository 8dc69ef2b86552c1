"""`pcgpt compare`'s settings, free of torch so that `pcgpt compare --help` and a mistyped flag
are answered without importing PyTorch (pcgpt/model/compare.py computes with them)."""

from dataclasses import dataclass


@dataclass
class CompareConfig:
    settle_steps: tuple = (0, 1, 2, 4)
    max_tokens: int = 16384  # held-out tokens per (model, T)
    ood_window: int = 128  # tokens per OOD window
    ood_windows: int = 32  # windows per text (in-distribution and each OOD text)
    sample_rows: int = 8  # sequences per sampler
    sample_tokens: int = 192  # tokens per sequence
    batch_size: int = 8
    bins: int = 15  # calibration bins
    seed: int = 0
