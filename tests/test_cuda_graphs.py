"""The CUDA-graph decode (serve/cuda_graphs.py), as far as a CPU can check it: the buckets, and that
the step a graph records (rows padded up to the bucket with free slots, attending over the whole
cache) computes what the runner's unpadded eager step computes, on a real engine's state. The
capture itself needs a GPU: bench/gpu.py runs it there (greedy text with and without graphs)."""

import pytest
import torch

from pcgpt.model.generate import decode_step, kv_len_bucket
from pcgpt.model.sampling import SamplingParams
from pcgpt.serve.cuda_graphs import DecodeGraphs, batch_buckets, bucket_for, bucket_step
from tests.test_engine import models  # noqa: F401  (module-scoped fixture)
from tests.test_engine_steps import _engine, _request


def test_buckets_double_up_to_the_slot_count():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert [bucket_for(n, [1, 2, 4, 8, 12]) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
    with pytest.raises(ValueError):
        bucket_for(13, [1, 2, 4, 8, 12])


@pytest.mark.parametrize("kind", ["base", "pc"])
def test_padded_bucket_step_equals_the_unpadded_step(models, kind):
    model, tokenizer = models[kind], models["tokenizer"]
    engine = _engine(model, tokenizer, metrics=False, max_batch_size=8)
    prompts = ["ROMEO:\nWhat light", "To be", "First Citizen:\nBefore we proceed"]
    engine.submit([_request(tokenizer, p, max_tokens=30, sampling=SamplingParams(temperature=0.0), settle_steps=0
                            if kind == "pc" else None) for p in prompts])
    for _ in range(4):  # admitted, prefilled and a few decode steps in: three running rows of different lengths
        engine.step()
    runner = engine.runner
    assert [r is not None for r in runner.requests[:4]] == [True, True, True, False]
    settle = runner.settle if runner.is_pc else None
    n = 3
    window = kv_len_bucket(int(runner.positions[:n].max()) + 1, runner.max_len)
    assert window < runner.max_len  # so the two steps attend over different windows
    want_logits, want_stats = decode_step(model, runner.last_tokens[:n], runner.positions[:n], runner.cache,
                                          settle[:n] if settle is not None else None, kv_len=window,
                                          max_settle_steps=0 if runner.is_pc else None)
    logits, stats = bucket_step(model, runner.cache, runner.last_tokens, runner.positions, settle,
                                bucket_for(n, batch_buckets(8)))()
    assert logits.shape[0] == 4
    torch.testing.assert_close(logits[:n], want_logits, rtol=1e-5, atol=1e-5)
    assert set(stats) == set(want_stats)
    for name in want_stats:
        torch.testing.assert_close(stats[name][:n], want_stats[name], rtol=1e-5, atol=1e-5)


def test_graphs_need_cuda(models):
    model = models["base"]
    cache = model.new_cache(2, max_len=32)
    zeros = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(model, cache, zeros, zeros, None)
    engine = _engine(model, models["tokenizer"], metrics=False)
    assert engine.runner.graphs is None  # a CPU runner asked for nothing it cannot do


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_gpu_benchmark_fails_clearly_without_cuda():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no CUDA device" in p.stderr
