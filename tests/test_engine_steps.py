"""What one engine step costs the host, counted by a TorchDispatchMode on a real Engine (shipped
char checkpoint, PC model over it): in steady decode, with rows of mixed sampling parameters (one
error-driven, one with uncertainty, one with logprobs), the engine reads no scalar back, builds
no tensor from host data and copies exactly one tensor to the host buffer; a step that admits a
request adds one packed copy of the admission and one transfer of its first token. The model's
own forward is counted apart (its host reads are the model's contract, tested with the model).
Also: rows that asked for neither logprobs nor uncertainty get no per-token dicts, and greedy
engine output equals model/generate.generate() batched or alone."""

import queue

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pcgpt.serve.runner as runner_module
from pcgpt.model.generate import generate
from pcgpt.model.sampling import ErrorDrivenParams, SamplingParams
from pcgpt.serve.engine import DoneEvent, Engine, Request, TokenEvent
from pcgpt.serve.metrics import Metrics
from pcgpt.serve.output import OutputProcessor
from tests.test_engine import _Immediate, models  # noqa: F401  (models: the fixture, module-scoped there too)

READS = {"aten._local_scalar_dense.default"}  # what .item(), int(), float(), bool() of a tensor dispatch
FROM_HOST = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default", "aten.lift.default"}  # torch.tensor(data)


def _engine(model, tokenizer, metrics=True, max_batch_size=8):
    e = Engine("test", model, tokenizer, Metrics() if metrics else None, max_batch_size=max_batch_size, max_queue=8)
    e._thread = type("Alive", (), {"is_alive": staticmethod(lambda: True)})()  # stepped by hand, no thread
    return e


def _request(tokenizer, prompt, max_tokens=64, **kw):
    r = Request(prompt_ids=tokenizer.encode(prompt), max_tokens=max_tokens, **kw)
    r.loop, r.events = _Immediate(), queue.Queue()
    return r


def _mixed(tokenizer, settle=None):
    return [
        _request(tokenizer, "ROMEO:\n", sampling=SamplingParams(temperature=0.0), logprobs=3, settle_steps=settle),
        _request(tokenizer, "JULIET:\nO", sampling=SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3,
                                                                 repetition_penalty=1.2), settle_steps=settle),
        _request(tokenizer, "KING:\n", sampling=SamplingParams(temperature=1.0, seed=4), uncertainty=True,
                 error_driven=ErrorDrivenParams(tau=2.5), settle_steps=settle),
        _request(tokenizer, "First Citizen:\n", sampling=SamplingParams(temperature=0.7, min_p=0.05,
                                                                       frequency_penalty=0.5), uncertainty=True,
                 settle_steps=settle),
        _request(tokenizer, "O", sampling=SamplingParams(temperature=1.0), settle_steps=settle),  # asks for nothing
    ]


class StepCounter(TorchDispatchMode):
    """Counts the engine's ops of interest; the model's forwards (decode_step, prefill,
    prefill_batch, wrapped by `model_calls`) are counted apart."""

    def __init__(self, host_buffer):
        super().__init__()
        self.host_buffer = host_buffer
        self.in_model = False
        self.engine = {"reads": 0, "from_host": 0, "to_host_buffer": 0}
        self.model = {"reads": 0, "from_host": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        counts = self.model if self.in_model else self.engine
        if name in READS:
            counts["reads"] += 1
        if name in FROM_HOST:
            counts["from_host"] += 1
        if name.startswith("aten.copy_") and not self.in_model:
            dst = args[0]
            if dst.untyped_storage().data_ptr() == self.host_buffer().untyped_storage().data_ptr():
                counts["to_host_buffer"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def model_calls(monkeypatch):
    """Wraps the runner's model calls so that a StepCounter counts them apart."""
    counter = {}

    def wrap(fn):
        def inside(*args, **kw):
            mode = counter.get("mode")
            if mode is not None:
                mode.in_model = True
            try:
                return fn(*args, **kw)
            finally:
                if mode is not None:
                    mode.in_model = False
        return inside

    for name in ("decode_step", "prefill", "prefill_batch"):
        monkeypatch.setattr(runner_module, name, wrap(getattr(runner_module, name)))
    return counter


def _counted_step(engine, model_calls):
    mode = StepCounter(lambda: engine.runner._host)
    model_calls["mode"] = mode
    torch.set_grad_enabled(False)
    try:
        with mode:
            engine.step()
    finally:
        torch.set_grad_enabled(True)
        model_calls["mode"] = None
    return mode


def _steps(engine, n):
    torch.set_grad_enabled(False)
    try:
        for _ in range(n):
            engine.step()
    finally:
        torch.set_grad_enabled(True)


@pytest.mark.parametrize("kind,settle", [("base", None), ("pc", 0), ("pc", 1)])
def test_steady_decode_step_reads_nothing_back_but_one_packed_result(models, kind, settle, model_calls):
    """The engine's side of a step, and the model's decode step itself for the baseline and PC at
    T = 0 (settling at T >= 1 runs eagerly, with its backtracking decisions read on the host)."""
    model, tokenizer = models[kind], models["tokenizer"]
    engine = _engine(model, tokenizer)
    requests = _mixed(tokenizer, settle=settle)
    engine.submit(requests)
    _steps(engine, 3)  # admission + prefill + first decodes
    assert len(engine.running) == len(requests)

    steady = _counted_step(engine, model_calls)
    assert steady.engine == {"reads": 0, "from_host": 0, "to_host_buffer": 1}, steady.engine
    if not settle:
        assert steady.model == {"reads": 0, "from_host": 0}, steady.model

    # a step that admits a request: one packed copy of the admission, and one more transfer
    # (the new request's first token, sampled after its prefill)
    engine.submit([_request(tokenizer, "HAMLET:\n", sampling=SamplingParams(temperature=0.9, top_k=5),
                            logprobs=2, settle_steps=settle)])
    admitting = _counted_step(engine, model_calls)
    assert admitting.engine == {"reads": 0, "from_host": 1, "to_host_buffer": 2}, admitting.engine

    again = _counted_step(engine, model_calls)  # and back to steady with one more row
    assert again.engine == {"reads": 0, "from_host": 0, "to_host_buffer": 1}, again.engine
    if not settle:
        assert again.model == {"reads": 0, "from_host": 0}, again.model
    assert len(engine.running) == len(requests) + 1


def test_rows_that_asked_for_nothing_get_no_per_token_dicts(models, monkeypatch):
    """No logprobs, no uncertainty: events carry the text alone (and the done event the count);
    no token dict or uncertainty object is built, metrics (on, as in the server) still observe."""
    tokenizer = models["tokenizer"]
    built = []
    real = OutputProcessor._token_info

    def spy(self, r, *args):
        built.append(r)
        return real(self, r, *args)

    monkeypatch.setattr(OutputProcessor, "_token_info", spy)
    engine = _engine(models["pc"], tokenizer)
    plain = [_request(tokenizer, p, max_tokens=10, sampling=SamplingParams(temperature=t))
             for p, t in (("ROMEO:\n", 0.0), ("JULIET:\n", 1.0), ("O", 0.5))]
    engine.submit(plain)
    _steps(engine, 20)
    assert not engine.running and not built
    for r in plain:
        events = [r.events.get_nowait() for _ in range(r.events.qsize())]
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert tokens and all(e.tokens == [] for e in tokens)
        assert "".join(e.text for e in tokens)
        assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 10
    assert engine.metrics.entropy.labels(model="test")._sum.get() > 0  # observed all the same
    assert engine.metrics.settle_steps.labels(model="test")._sum.get() > 0


@pytest.mark.parametrize("kind", ["base", "pc"])
def test_greedy_engine_output_equals_generate_batched_or_alone(models, kind):
    model, tokenizer = models[kind], models["tokenizer"]
    prompts = ["ROMEO:\nWhat light", "To be", "First Citizen:\nBefore we proceed", "O"]
    want = [tokenizer.decode([t for t, _, _ in generate(model, tokenizer.encode(p), 16, SamplingParams(temperature=0))])
            for p in prompts]

    def run(batch):
        engine = _engine(model, tokenizer, metrics=False)
        requests = [_request(tokenizer, p, max_tokens=16, sampling=SamplingParams(temperature=0.0)) for p in batch]
        engine.submit(requests)
        _steps(engine, 40)
        return ["".join(e.text for e in (r.events.get_nowait() for _ in range(r.events.qsize()))
                        if isinstance(e, TokenEvent)) for r in requests]

    assert run(prompts) == want
    assert [run([p])[0] for p in prompts] == want


def test_a_step_runs_on_aten_kernels_and_leaves_the_process_defaults(models, monkeypatch):
    """Inside a CPU step PyTorch's oneDNN dispatch is off (formats.inference_kernels); after it the
    process has its defaults back, so other models in the process are untouched."""
    seen = []
    real = runner_module.decode_step

    def spy(*args, **kw):
        seen.append(torch.backends.mkldnn.enabled)
        return real(*args, **kw)

    monkeypatch.setattr(runner_module, "decode_step", spy)
    tokenizer = models["tokenizer"]
    engine = _engine(models["base"], tokenizer)
    engine.submit([_request(tokenizer, "ROMEO:\n", max_tokens=4, sampling=SamplingParams(temperature=0.0))])
    assert torch.backends.mkldnn.enabled
    _steps(engine, 3)
    assert seen and not any(seen)
    assert torch.backends.mkldnn.enabled
