"""The engine driven step by step in-process: a burst of admissions is prefilled in one padded
forward and gives each request exactly what it gets alone (baseline and PC, with their
uncertainty), the prefill token budget splits a burst, and a failing batched prefill falls back
to one request at a time so only the bad request fails."""

import queue

import pytest
import torch

import pcgpt.serve.runner as runner_module
from pcgpt.serve.engine import DoneEvent, Engine, ErrorEvent, Request, TokenEvent
from pcgpt.model.checkpoint import load_checkpoint
from pcgpt.model.sampling import SamplingParams
from tests.serving import BASELINE, make_pc_checkpoint

PROMPTS = ["ROMEO:\nWhat light", "To be", "First Citizen:\nBefore we proceed any further, hear me",
           "O", "KING HENRY:\nOnce more unto the breach", "JULIET:\nO Romeo"]


class _Immediate:
    """Stands in for the HTTP event loop: events are delivered at once, on the engine's thread."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base, tokenizer, _ = load_checkpoint(BASELINE)
    pc, _, _ = load_checkpoint(make_pc_checkpoint(tmp_path_factory.mktemp("pc")))
    for m in (base, pc):
        m.requires_grad_(False)
    return {"base": base, "pc": pc, "tokenizer": tokenizer}


def _request(tokenizer, prompt, i, settle=None):
    params = SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0, seed=100 + i)
    r = Request(prompt_ids=tokenizer.encode(prompt), max_tokens=12, sampling=params, settle_steps=settle,
                uncertainty=True, index=i)
    r.loop, r.events = _Immediate(), queue.Queue()
    return r


def _drain(engine, after_first_step=None, max_steps=200):
    """Steps the engine (as its thread would: no autograd) until nothing runs or waits."""
    torch.set_grad_enabled(False)
    try:
        for step in range(max_steps):
            if not engine.running and not engine.waiting:
                break
            engine.step()
            if step == 0 and after_first_step:
                after_first_step()
    finally:
        torch.set_grad_enabled(True)


def _run(engine, requests):
    """Submits every request before the first step (one burst), steps until all are done;
    returns per request (text, per-token uncertainty, finish reason)."""
    engine.submit(requests)
    _drain(engine)
    out = []
    for r in requests:
        text, unc, finish = "", [], None
        while not r.events.empty():
            ev = r.events.get_nowait()
            if isinstance(ev, TokenEvent):
                text += ev.text
                unc += [t["uncertainty"] for t in ev.tokens]
            elif isinstance(ev, DoneEvent):
                finish = ev.finish_reason
            elif isinstance(ev, ErrorEvent):
                finish = "error: " + ev.message
        out.append((text, unc, finish))
    return out


def _engine(model, tokenizer, **kw):
    e = Engine("test", model, tokenizer, max_batch_size=8, max_queue=8, **kw)
    e._thread = type("Alive", (), {"is_alive": staticmethod(lambda: True)})()  # stepped by hand, no thread
    return e


@pytest.fixture
def prefill_calls(monkeypatch):
    calls = []
    real = runner_module.prefill_batch

    def spy(model, prompts, *args, **kw):
        calls.append([len(p) for p in prompts])
        return real(model, prompts, *args, **kw)

    monkeypatch.setattr(runner_module, "prefill_batch", spy)
    return calls


@pytest.mark.parametrize("kind", ["base", "pc"])
def test_burst_is_prefilled_together_and_each_request_gets_what_it_gets_alone(models, kind, prefill_calls):
    model, tokenizer = models[kind], models["tokenizer"]
    settle = (lambda i: [0, 1, 2, None][i % 4]) if kind == "pc" else (lambda i: None)
    burst = _run(_engine(model, tokenizer), [_request(tokenizer, p, i, settle(i)) for i, p in enumerate(PROMPTS)])
    assert prefill_calls == [sorted(len(tokenizer.encode(p)) for p in PROMPTS)]  # one padded forward
    for i, prompt in enumerate(PROMPTS):
        alone = _run(_engine(model, tokenizer), [_request(tokenizer, prompt, i, settle(i))])[0]
        text, unc, finish = burst[i]
        assert finish == alone[2] == "length"
        assert text == alone[0] and len(unc) == 12, prompt
        for got, want in zip(unc, alone[1]):
            assert got.keys() == want.keys()
            for key in got:
                torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64),
                                           torch.tensor(want[key], dtype=torch.float64), atol=1e-4, rtol=1e-4)
        if kind == "pc":
            expected = model.config.default_settle_steps if settle(i) is None else settle(i)
            assert unc[0]["steps"] == expected


def test_prefill_token_budget_splits_a_burst(models, prefill_calls):
    tokenizer = models["tokenizer"]
    lengths = sorted(len(tokenizer.encode(p)) for p in PROMPTS)
    budget = 2 * lengths[-1]  # two of the longest fit, so the burst needs several forwards
    results = _run(_engine(models["base"], tokenizer, max_prefill_tokens=budget),
                   [_request(tokenizer, p, i) for i, p in enumerate(PROMPTS)])
    assert all(r[2] == "length" for r in results)
    assert len(prefill_calls) > 1 and sorted(n for call in prefill_calls for n in call) == lengths
    for call in prefill_calls:
        assert len(call) * max(call) <= budget or len(call) == 1, call


def test_failed_batched_prefill_retries_each_request_alone(models, monkeypatch):
    tokenizer = models["tokenizer"]

    def broken(*args, **kw):
        raise RuntimeError("batched prefill broke")

    monkeypatch.setattr(runner_module, "prefill_batch", broken)
    requests = [_request(tokenizer, p, i) for i, p in enumerate(PROMPTS[:3])]
    results = _run(_engine(models["base"], tokenizer), requests)
    # every request still completes through the one-request prefill
    assert [r[2] for r in results] == ["length"] * 3
    alone = [_run(_engine(models["base"], tokenizer), [_request(tokenizer, p, i)])[0][0] for i, p in enumerate(PROMPTS[:3])]
    assert [r[0] for r in results] == alone


def test_a_decode_that_fails_for_one_row_fails_only_that_request(models, monkeypatch):
    """A forward that raises whenever one poisoned row is in the batch: the batch is retried row by
    row, that request ends with an error, the others finish with their own tokens, and the engine
    goes on serving (also when the poisoned row ends up decoding alone)."""
    tokenizer = models["tokenizer"]
    real = runner_module.decode_step
    poisoned = {}

    def decode_step(model, tokens, pos, cache, *args, **kw):
        # row b is slot b: the poisoned sequence's row is live when it is fed its own position
        seq = poisoned.get("seq")
        if seq in engine.running and seq.slot < len(pos) and int(pos[seq.slot]) == seq.pos:
            raise RuntimeError("poisoned row")
        return real(model, tokens, pos, cache, *args, **kw)

    monkeypatch.setattr(runner_module, "decode_step", decode_step)
    engine = _engine(models["base"], tokenizer)
    requests = [_request(tokenizer, p, i) for i, p in enumerate(PROMPTS[:4])]
    engine.submit(requests)

    def poison():  # after the first step has admitted, prefilled and decoded all four
        poisoned["seq"] = next(s for s in engine.running if s.request is requests[2])

    _drain(engine, after_first_step=poison)
    finishes, texts = [], []
    for r in requests:
        events = [r.events.get_nowait() for _ in range(r.events.qsize())]
        finishes.append(next(("error" if isinstance(e, ErrorEvent) else e.finish_reason)
                             for e in events if isinstance(e, (DoneEvent, ErrorEvent))))
        texts.append("".join(e.text for e in events if isinstance(e, TokenEvent)))
    assert finishes == ["length", "length", "error", "length"]
    assert engine.dead is None and not engine.running
    monkeypatch.setattr(runner_module, "decode_step", real)
    alone = [_run(_engine(models["base"], tokenizer), [_request(tokenizer, p, i)])[0][0] for i, p in enumerate(PROMPTS[:4])]
    assert [texts[i] for i in (0, 1, 3)] == [alone[i] for i in (0, 1, 3)]  # the survivors: as alone
    again = _run(engine, [_request(tokenizer, PROMPTS[0], 0)])  # and the engine still serves
    assert again[0][2] == "length" and again[0][0] == alone[0]


@pytest.mark.parametrize("interval", [2, 4])
def test_stream_interval_sends_the_same_tokens_in_fewer_events(models, interval):
    """stream_interval > 1 (`pcgpt serve --stream-interval`): the first token goes out at once,
    then at most one event per `interval` tokens, the rest with the finish; text, tokens and
    their uncertainty are exactly those of interval 1."""
    tokenizer = models["tokenizer"]

    def events_of(engine_interval):
        engine = _engine(models["pc"], tokenizer, stream_interval=engine_interval)
        requests = [_request(tokenizer, p, i, settle=1) for i, p in enumerate(PROMPTS[:3])]
        engine.submit(requests)
        _drain(engine)
        return [[r.events.get_nowait() for _ in range(r.events.qsize())] for r in requests]

    plain, chunked = events_of(1), events_of(interval)
    for one, many in zip(plain, chunked):
        tokens_one = [e for e in one if isinstance(e, TokenEvent)]
        tokens_many = [e for e in many if isinstance(e, TokenEvent)]
        assert "".join(e.text for e in tokens_many) == "".join(e.text for e in tokens_one)
        assert [t for e in tokens_many for t in e.tokens] == [t for e in tokens_one for t in e.tokens]
        sizes = [len(e.tokens) for e in tokens_many]
        assert sizes[0] == 1 and all(n <= interval for n in sizes) and all(n == interval for n in sizes[1:-1]), sizes
        assert len(tokens_many) < len(tokens_one)
        assert isinstance(many[-1], DoneEvent) and many[-1].finish_reason == one[-1].finish_reason == "length"
