"""CUDA graphs of the batched decode step, one per batch-size bucket (as vLLM and gpt-fast do).

On a GPU a small model's decode step is a few hundred short kernels: launched one by one from
Python, the launches cost more than the kernels. A graph records the step's kernels once and
replays them with one launch. What a graph needs, model/generate.decode_step already gives: the
step reads nothing back to the host, and its shapes depend only on (rows, attended window).

Buckets: a step over n running rows replays the graph of the smallest bucket >= n (1, 2, 4, 8, ...
up to the cache's slot count). The rows past n are free cache slots, which the runner keeps at
token 0, position 0, no settling: they compute padding that nobody reads, and what they write to
their slot's position 0 is overwritten by that slot's next prefill. Every graph attends over the
whole cache (kv_len = max_len): one graph per bucket instead of one per (bucket, window), and on a
GPU attending over masked positions of a small model's context is cheap next to the launches saved.

The graphs read their inputs from the runner's own per-slot tensors (last tokens, positions,
settle steps) and write the K/V into the runner's cache, so a replay needs no copy in; its
outputs (logits and the PC statistics) are the graph's static tensors, valid until the next replay.
PC models are captured on the unsettled path (T = 0); a step in which some row settles runs eagerly
(settling's step count and backtracking are data-dependent).
"""

import torch

from pcgpt.model.generate import decode_step


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... below max_rows, then max_rows itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_rows:
        sizes.append(max_rows)
    return sizes


def bucket_for(rows: int, buckets: list[int]) -> int:
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


class DecodeGraphs:
    """The captured decode steps of one model runner: replay(n_rows) -> (logits, stats) of rows [0, n_rows)."""

    def __init__(self, model, cache, tokens: torch.Tensor, positions: torch.Tensor, settle: torch.Tensor | None,
                 warmup_steps: int = 2):
        if cache.max_len is None or tokens.device.type != "cuda":
            raise ValueError("CUDA graphs need a model and cache on a CUDA device")
        self.buckets = batch_buckets(cache.n_slots)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        pool = torch.cuda.graph_pool_handle()
        # largest first: the smaller graphs then fit in the memory the largest one reserved
        for size in reversed(self.buckets):
            step = bucket_step(model, cache, tokens, positions, settle, size)
            self.graphs[size] = capture(step, pool, warmup_steps)

    def replay(self, n_rows: int):
        graph, (logits, stats) = self.graphs[bucket_for(n_rows, self.buckets)]
        graph.replay()
        return logits[:n_rows], {name: value[:n_rows] for name, value in stats.items()}


def bucket_step(model, cache, tokens, positions, settle, size: int):
    """The decode step a graph of `size` rows records: rows [0, size) of the runner's tensors,
    attending over the whole cache, PC models unsettled. Also what a CPU test runs eagerly to
    check that a padded bucket computes what the unpadded step does."""
    rows = slice(0, size)
    pc = settle is not None

    def step():
        return decode_step(model, tokens[rows], positions[rows], cache, settle[rows] if pc else None,
                           kv_len=cache.max_len, max_settle_steps=0 if pc else None)
    return step


def capture(step, pool, warmup_steps: int):
    """Warm the step up on a side stream (lazy initialisations, allocator state), then record it.
    Warm-up runs write the same K/V the captured step would, at the same positions."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = step()
    return graph, outputs
