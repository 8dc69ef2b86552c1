"""The batch-1 decode step compiled with torch.compile, for CPU serving (`pcgpt serve --compile`).

On a CPU a batch-1 step is a weight stream plus many small ops dispatched one by one from Python.
Inductor with mode="max-autotune" and frozen weights replaces both: its C++ GEMV over its own
packing of the weights, chosen per matmul shape against oneDNN's by timing them, and the small ops
fused. It pays at one row and loses from a few rows up (BENCHMARKS.md, "torch.compile of the
decode step"), so the runner takes it for steps of one running row and the eager step otherwise.

What the compiled step needs, and how it gets it here:
- the plain model: over pcgpt's CPU weight formats (formats.py) inductor keeps their oneDNN calls,
  so it compiles formats.plain_view(model), the same Parameters as plain nn.Linear modules;
- oneDNN dispatch on while it compiles (the engine turns it off around fp32 steps; inductor's
  weight packing needs it), and weight freezing for that compile only;
- every window served by the graphs compiled at start: dynamic=True makes kv_len symbolic (the
  batch of one is specialised, as PyTorch specialises sizes of 1); a window as long as the cache
  takes a second graph, so both are compiled at start.
It writes the K/V into the runner's cache like the eager step; the warm-up's writes go to slot 0's
position 0, which the slot's next prefill overwrites.
"""

import logging
import time
import warnings

import torch

from pcgpt.model.formats import plain_view
from pcgpt.model.generate import decode_step

log = logging.getLogger("pcgpt.engine")

WARMUP_WINDOW = 64  # any window below the cache's length: the graph is compiled with kv_len symbolic


def warmup_windows(max_len: int) -> list[int]:
    """The windows compiled at start: one below the cache's length, which serves every such
    window, and the whole cache, where the window is the cache tensor itself (a graph of its own)."""
    return sorted({min(WARMUP_WINDOW, max_len - 1), max_len} - {0, 1})


def compile_supported(model) -> str | None:
    """Why this model's decode step is not compiled, or None where it is."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return "the compiled step is for CPUs (CUDA has its graphs)"
    if model.model_type != "gpt":
        return "PC models settle with data-dependent steps"
    if getattr(model, "quantization", None) is not None:
        return "quantized weights have their own kernels"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()  # inductor's own search (CXX, then g++ / clang++ on PATH)
    except Exception:
        return "torch.compile's CPU kernels need a C++ compiler (g++ or clang++) on PATH"
    return None


class CompiledDecode:
    """step(tokens (1,), positions (1,), kv_len) -> (logits (1, V), stats) of cache slot 0."""

    def __init__(self, model, cache, mode: str = "max-autotune"):
        self.plain = plain_view(model)
        self.cache = cache
        self.compiled = torch.compile(self._step, mode=mode, dynamic=True)
        self.calls = 0
        started = time.perf_counter()
        device = model.lm_head.weight.device
        # two tensors: passing one for both would compile a graph for aliased inputs only
        tokens, positions = (torch.zeros(1, dtype=torch.long, device=device) for _ in range(2))
        saved = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = True
        try:
            # weights frozen for this compile; inductor's autotuning tables stay out of the server's log
            quiet = dict(autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
            with torch.no_grad(), torch._inductor.config.patch(freezing=True, **quiet), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                for kv_len in warmup_windows(cache.max_len):
                    self.compiled(tokens, positions, kv_len)
        finally:
            torch.backends.mkldnn.enabled = saved
        self.compile_seconds = time.perf_counter() - started

    def _step(self, tokens, positions, kv_len: int):
        return decode_step(self.plain, tokens, positions, self.cache, kv_len=kv_len)

    def __call__(self, tokens, positions, kv_len: int):
        self.calls += 1
        return self.compiled(tokens, positions, kv_len)
