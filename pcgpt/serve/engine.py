"""The engine: continuous batching over a slot KV cache, one per loaded model.

It composes three parts, each with one job (the shape of vLLM's V1 engine core):
  Scheduler (serve/scheduler.py)        the waiting queue, admission into cache slots, the decode batch
  ModelRunner (serve/runner.py)         the KV cache and per-slot device state; prefill, decode, sampling
  OutputProcessor (serve/output.py)     detokenization, stop strings, stream interval, per-token dicts
One loop, on its own thread, runs steps: drop cancelled requests, admit waiting ones into free
slots and prefill them, run one decode step for every running row, turn the sampled tokens into
events and deliver them (to the requests' asyncio queues, or down the pipe of an engine process:
serve/engine_process.py, which is how `pcgpt serve` runs each model), free finished slots at once.

The engine is the only long-lived mutable object of its process.
"""

import logging
import threading
import time

import torch

from pcgpt.model.formats import inference_kernels
from pcgpt.serve.output import OutputProcessor
from pcgpt.serve.request import DoneEvent, ErrorEvent, Request, TokenEvent, deliver_to_loops  # noqa: F401  (the API)
from pcgpt.serve.runner import ModelRunner, StepResult
from pcgpt.serve.scheduler import (MAX_PREFILL_TOKENS, EngineUnavailable, QueueFull, Scheduler, Sequence,  # noqa: F401
                                   check_admission)

log = logging.getLogger("pcgpt.engine")


class Engine:
    def __init__(self, name: str, model, tokenizer, metrics=None, max_batch_size: int = 16,
                 max_queue: int = 64, sampler_defaults: dict | None = None, max_prefill_tokens: int = MAX_PREFILL_TOKENS,
                 stream_interval: int = 1, deliver=None, cuda_graphs: bool = False, compile_decode: bool = False):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.sampler_defaults = sampler_defaults or {}
        # hands a list of (request, event) to whoever waits for them: by default the requests'
        # asyncio queues, each on its event loop (deliver_to_loops); an engine process pipes them
        self.deliver = deliver or deliver_to_loops
        self.device = model.lm_head.weight.device
        self.block_size = model.config.block_size
        self.vocab = tokenizer.vocab_size
        self.scheduler = Scheduler(name, max_batch_size, max_queue, max_prefill_tokens)
        started = time.perf_counter()
        self.runner = ModelRunner(model, self.vocab, max_batch_size, stats_every_step=metrics is not None,
                                  cuda_graphs=cuda_graphs, compile_decode=compile_decode)
        if self.runner.graphs is not None:
            log.info("%s: captured the decode step's CUDA graphs for batch sizes %s in %.1f s", name,
                     self.runner.graphs.buckets, time.perf_counter() - started)
        if self.runner.compiled is not None:
            log.info("%s: compiled the batch-1 decode step in %.1f s", name, self.runner.compiled.compile_seconds)
        elif self.runner.compile_skipped:
            log.info("%s: --compile does not apply: %s", name, self.runner.compile_skipped)
        self._children: dict = {}  # metrics series -> this model's labelled child (_series)
        self.output = OutputProcessor(tokenizer, self.block_size, stream_interval, self._emit,
                                      self._series if metrics else None)
        self._wake = threading.Event()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.dead: str | None = None  # why the loop died, if it did
        self.steps_run = 0
        self.batch_size_counts: dict[int, int] = {}
        self.fault_injector = None  # tests: a callable(seq) that may raise inside one row's step
        # events of the running step, handed to the event loops in one call per loop (see _flush)
        self._outbox: list | None = None
        if metrics:  # weights on the model's device: the one memory series every device has
            metrics.device_memory.labels(model=name, kind="weights").set(model.weight_bytes())
            self._gauges()  # KV-cache bytes allocated are known before the first step

    @property
    def cache(self):
        return self.runner.cache

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def stop_admitting(self) -> None:
        self._accepting = False

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Stops admitting, lets running and waiting requests finish for up to drain_seconds,
        then aborts what is left and ends the loop."""
        self._accepting = False
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and (self.running or self.waiting) and self.alive:
            time.sleep(0.01)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- called from the HTTP event loop --------------------------------------------------------

    def submit(self, requests: list[Request]) -> None:
        """Queues every request or none: a full queue raises QueueFull at once."""
        self.scheduler.submit(requests, self._accepting, self.alive)
        self._gauges()
        self._wake.set()

    def cancel(self, requests: list[Request]) -> None:
        """Marks requests cancelled (a client went away); the loop frees their slots next step."""
        for r in requests:
            r.cancelled = True
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop:
                if not self.running and not self.waiting:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self.step()
        except Exception as e:  # the loop itself failed: /ready reports it, requests are failed
            log.exception("engine %s died", self.name)
            self.dead = f"{type(e).__name__}: {e}"
            for seq in list(self.running):
                self._emit(seq.request, ErrorEvent(seq.request.index, f"engine failure: {self.dead}"))
            while self.waiting:
                r = self.waiting.popleft()
                self._emit(r, ErrorEvent(r.index, f"engine failure: {self.dead}"))
        finally:
            # whatever is left when the loop ends (shutdown past its drain time) is aborted
            for seq in list(self.running):
                self._finish(seq, "abort")
            while self.waiting:
                r = self.waiting.popleft()
                self._emit(r, DoneEvent(r.index, "abort", len(r.prompt_ids), 0))

    def step(self) -> None:
        """Admit and prefill what fits, then one batched decode step."""
        self._outbox = []
        try:
            dropped, cancelled = self.scheduler.take_cancelled()
            for r in dropped:
                self._emit(r, DoneEvent(r.index, "cancelled", len(r.prompt_ids), 0))
            for seq in cancelled:
                self._finish(seq, "cancelled")
            with inference_kernels(self.model.lm_head.weight):
                if not self._stop:
                    self._admit()
                if self.running:
                    self._decode()
                    self._flush()
            self._gauges()
        finally:
            self._flush()
            self._outbox = None

    def _admit(self) -> None:
        admitted = []
        for seq in self.scheduler.admit():
            self.output.start(seq)
            if self.metrics:
                self._series("queue_time").observe(time.perf_counter() - seq.request.arrival)
                self._series("prompt_tokens").inc(len(seq.request.prompt_ids))
            try:
                seq.request.sampling.validate()  # a bad value would turn into silent NaNs later
            except ValueError as e:
                self._fail(seq, e)
                continue
            admitted.append(seq)
        if not admitted:
            return
        groups = self.scheduler.prefill_groups(admitted)
        self.runner.admit([seq for group in groups for seq in group])  # each group a run of the copy
        for group in groups:
            self._prefill(group)
            self._flush()  # the group's first tokens go out now, not after the other admissions

    def _prefill(self, seqs: list[Sequence]) -> None:
        try:
            if len(seqs) > 1:  # a group: its prompts in one padded forward
                self._process(seqs, range(len(seqs)), self.runner.prefill_group(seqs))
            else:
                self._prefill_one(seqs[0])
        except Exception as e:  # a prefill can run again: it rewrites the slot from position 0
            self._retry_alone(seqs, e, self._prefill, "prefill")

    def _prefill_one(self, seq: Sequence) -> None:
        """One request (and so every echo or scoring request: prefill_groups keeps them alone)."""
        r = seq.request
        logits, stats = self.runner.prefill_one(seq, all_logits=r.prompt_logprobs)
        prompt_tokens = None
        if r.prompt_logprobs:
            prompt_tokens = self.output.prompt_token_infos(r, logits, self.vocab)
            logits = logits[-1]
            stats = {k: v[-1] for k, v in stats.items()}
        if r.max_tokens == 0:  # echo scoring: the prompt's logprobs and nothing generated
            self._emit(r, TokenEvent(r.index, "", [], prompt_tokens))
            self._finish(seq, "length")
            return
        row = slice(seq.slot, seq.slot + 1)
        result = self.runner.sample(logits.view(1, -1), row, [seq.slot], {k: v.unsqueeze(0) for k, v in stats.items()})
        self._process([seq], [0], result, prompt_tokens)

    def _decode(self) -> None:
        rows = list(self.running)
        n_rows, kv_len = self.scheduler.decode_batch(self.runner.max_len)
        try:
            result = self.runner.decode(n_rows, kv_len)
        except Exception as e:  # only the forward and sampling are retried: nothing of the step went out
            log.error("batched decode failed on %s; retrying requests one by one", self.name, exc_info=e)
            for seq in rows:
                self._decode_alone(seq)
            return
        self.steps_run += 1
        self.batch_size_counts[len(rows)] = self.batch_size_counts.get(len(rows), 0) + 1
        if self.metrics:
            self._series("batch_size").observe(len(rows))
            self._series("decode_steps").inc()
        for seq in rows:
            seq.pos += 1
        self._process(rows, [seq.slot for seq in rows], result)

    def _decode_alone(self, seq: Sequence) -> None:
        try:
            result = self.runner.decode_alone(seq.slot)
        except Exception as e:
            log.error("decode failed for one request of %s", self.name, exc_info=e)
            self._fail(seq, e)
            return
        seq.pos += 1
        self._process([seq], [0], result)

    def _retry_alone(self, seqs: list[Sequence], error: Exception, run, what: str) -> None:
        """After run(seqs) raised: fail the request when it was alone, else run each sequence on
        its own, so that only the one that fails fails and the others still get their token."""
        if len(seqs) == 1:
            log.error("%s failed for one request of %s", what, self.name, exc_info=error)
            self._fail(seqs[0], error)
            return
        log.error("batched %s failed on %s; retrying requests one by one", what, self.name, exc_info=error)
        for seq in seqs:
            run([seq])

    def _process(self, seqs: list[Sequence], result_rows, result: StepResult, prompt_tokens=None) -> None:
        """Each sequence's sampled token (row result_rows[i] of the result) through the output
        processor; a row that raises fails alone."""
        now = time.perf_counter()
        for seq, i in zip(seqs, result_rows):
            try:
                if self.fault_injector is not None:
                    self.fault_injector(seq)
                finish = self.output.advance(seq, result.token(i), result, i, now, prompt_tokens)
            except Exception as e:
                log.exception("generation failed for one request of %s", self.name)
                self._fail(seq, e)
                continue
            if finish:
                self._finish(seq, finish)

    def _retire(self, seq: Sequence) -> None:
        """A sequence leaves the batch: tokens still held for the stream interval go out and its
        slot is free at once."""
        unsent = self.output.take_unsent(seq)
        if unsent is not None:
            self._emit(seq.request, unsent)
        if self.scheduler.free(seq):
            self.runner.release(seq.slot)

    def _finish(self, seq: Sequence, reason: str) -> None:
        r = seq.request
        self._retire(seq)
        if self.metrics:
            self.metrics.requests.labels(model=self.name, finish_reason=reason).inc()
            if seq.output is not None and seq.output.first_token_at is not None:
                self._series("e2e").observe(time.perf_counter() - r.arrival)
        self._emit(r, DoneEvent(r.index, reason, len(r.prompt_ids), seq.generated))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        self._retire(seq)
        if self.metrics:
            self.metrics.errors.labels(model=self.name, type="generation_error").inc()
        self._emit(seq.request, ErrorEvent(seq.request.index, f"generation failed: {type(error).__name__}: {error}"))

    # --- events and metrics ---------------------------------------------------------------------

    def _emit(self, r: Request, event) -> None:
        if self._outbox is not None:  # inside a step: delivered by _flush, with the step's others
            self._outbox.append((r, event))
            return
        self.deliver([(r, event)])

    def _flush(self) -> None:
        """Hands the events collected so far over in one call: a step of B rows wakes the HTTP
        loop (and takes the GIL from this thread) once instead of B times. Order per request is kept."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        self.deliver(items)

    def _series(self, name: str):
        """This model's child of a metrics series, looked up once (labels() costs microseconds,
        and the token path observes several series per token)."""
        child = self._children.get(name)
        if child is None:
            child = self._children[name] = getattr(self.metrics, name).labels(model=self.name)
        return child

    def _gauges(self) -> None:
        if not self.metrics:
            return
        m = self.metrics
        self._series("running").set(len(self.running))
        self._series("waiting").set(len(self.waiting))
        used = sum(s.pos for s in self.running)
        capacity = self.cache.n_slots * self.cache.max_len
        self._series("kv_usage").set(used / capacity)
        per_token = self.cache.bytes_per_token()
        m.kv_bytes.labels(model=self.name, state="allocated").set(self.cache.nbytes)
        m.kv_bytes.labels(model=self.name, state="used").set(used * per_token)
        if self.device.type == "cuda":
            m.device_memory.labels(model=self.name, kind="allocated").set(torch.cuda.memory_allocated(self.device))
            m.device_memory.labels(model=self.name, kind="reserved").set(torch.cuda.memory_reserved(self.device))

