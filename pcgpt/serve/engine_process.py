"""Each model's engine in a process of its own, driven by the server through a pipe.

In one process the engine thread's Python (a decode step, then per-token bookkeeping) and the
HTTP event loop's (parsing requests, writing a chunk per token) take turns on one GIL, and every
torch op the engine runs hands the GIL over: measured, the server delivered 75-79% of the raw
engine's tokens/s at 16 streaming clients. In a process of its own the engine runs on one core
while the event loop streams on another, as vLLM's V1 engine core does.

Server side, RemoteEngine: what the HTTP service uses of an engine (submit, cancel, alive, dead,
stop_admitting, shutdown, the checkpoint's info: config, tokenizer, metadata, no weights) plus
its metrics, collected per scrape.
Engine side, engine_main: the model loaded from its checkpoint, a pcgpt.serve.engine.Engine, and a
thread reading the pipe.

Messages, pickled over one multiprocessing Pipe:
  server -> engine  ("submit", [Request]), ("cancel", [key]), ("stop_admitting",),
                    ("collect", token), ("shutdown", drain_seconds)
  engine -> server  ("ready",) or ("failed", why), ("events", [(key, event)]),
                    ("metrics", token, [metric family]), ("dead", why)
"""

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import threading

from pcgpt.serve.engine import DoneEvent, Engine, EngineUnavailable, ErrorEvent, QueueFull, check_admission

log = logging.getLogger("pcgpt.engine_process")

START_TIMEOUT_S = 600  # loading a checkpoint in the engine process
COLLECT_TIMEOUT_S = 5  # an engine's metrics for one scrape
MAX_MESSAGES_PER_WAKE = 32  # engine messages handled before the event loop gets a turn


class EngineStartError(Exception):
    """An engine process that did not come up (its checkpoint failed to load, or it died): the
    message says which model and why, in one line."""


class RemoteEngine:
    """The server's handle on one engine process. It holds the checkpoint's info (config,
    tokenizer, metadata: pcgpt.model.checkpoint.read_checkpoint_info), never its weights.

    start() then wait_ready() before the server runs (a model that fails to load stops the
    server before it listens), then attach() on the server's event loop."""

    def __init__(self, name: str, info, *, device: str, dtype: str, threads: int,
                 max_batch_size: int, max_queue: int, sampler_defaults: dict, stream_interval: int,
                 fault_injection: bool = False, log_level: str = "info", quantization=None):
        from pcgpt.model.device import resolve_device, resolve_dtype
        if quantization is not None and "quantization" not in info.metadata:
            # the model card describes the weights as served: quantized at load
            info = dataclasses.replace(info, metadata={**info.metadata, "quantization": quantization.to_dict()})
        self.name = name
        self.info = info
        self.tokenizer = info.tokenizer
        self.model_type = info.model_type
        self.block_size = info.config.block_size
        self.dtype = resolve_dtype(dtype, resolve_device(device))  # what the engine process will run in
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.sampler_defaults = sampler_defaults
        self.spec = dict(name=name, path=info.path, device=device, dtype=dtype, threads=threads,
                         max_batch_size=max_batch_size, max_queue=max_queue, sampler_defaults=sampler_defaults,
                         stream_interval=stream_interval, fault_injection=fault_injection, log_level=log_level,
                         quantization=quantization)
        self.dead: str | None = None
        self.pid: int | None = None
        self._accepting = True
        self._pending: dict = {}  # key -> Request: submitted, no DoneEvent or ErrorEvent yet
        self._keys = itertools.count(1)
        self._collects: dict = {}  # token -> future of a metrics request
        self._last_families: list = []  # what the engine reported last (served once it is gone)
        self._proc = self._conn = self._loop = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the process (spawned: a forked child would hang in OpenMP after the parent
        ran a parallel region); wait_ready() then waits for its model."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=engine_main, args=(child_end, self.spec), name=f"pcgpt-engine-{self.name}",
                                 daemon=True)
        self._proc.start()
        child_end.close()
        self.pid = self._proc.pid

    def wait_ready(self) -> None:
        """Blocks until the engine process has loaded its model; raises EngineStartError with its
        reason if it failed (the process has ended then)."""
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise EngineStartError(f"model {self.name!r}: its engine process did not start within {START_TIMEOUT_S} s")
        try:
            message = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise EngineStartError(f"model {self.name!r}: its engine process exited with code "
                                   f"{self._proc.exitcode} while loading {self.info.path}") from None
        if message[0] != "ready":
            self._proc.join(5)
            # the engine sends "<exception type>: <message>"; a CheckpointError's message names the file
            why = str(message[1]).removeprefix("CheckpointError: ")
            raise EngineStartError(f"model {self.name!r}: {why}")

    def attach(self) -> None:
        """From here on the engine's messages are read on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        # uvloop (libuv) makes a watched descriptor non-blocking; a message read then could stop
        # half-way (EAGAIN). Readiness is all the loop needs: reads and writes block per message.
        os.set_blocking(self._conn.fileno(), True)

    @property
    def alive(self) -> bool:
        return self.dead is None and self._proc is not None and self._proc.is_alive()

    def stop_admitting(self) -> None:
        self._accepting = False
        self._send(("stop_admitting",))

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Lets the engine drain for up to drain_seconds (it aborts what is left), then ends the process."""
        self._accepting = False
        if self._proc is None or self._conn.closed:
            return
        self._send(("shutdown", drain_seconds))
        self._proc.join(drain_seconds + 10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._conn.close()

    # --- called from the HTTP event loop ------------------------------------------------------

    def submit(self, requests: list) -> None:
        """Queues every request or none, with the in-process engine's limit, counted from the
        requests this side still waits on (running + waiting; a finish not yet heard of counts,
        so the check can only be stricter than the engine's own)."""
        running = min(len(self._pending), self.max_batch_size)
        check_admission(self.name, self._accepting, self.alive, len(self._pending) - running,
                        self.max_batch_size - running, len(requests), self.max_queue)
        for r in requests:
            r.key = next(self._keys)
            self._pending[r.key] = r
        self._send(("submit", requests))

    def cancel(self, requests: list) -> None:
        for r in requests:
            r.cancelled = True
        self._send(("cancel", [r.key for r in requests if r.key in self._pending]))

    async def collect(self) -> list:
        """This engine's metric families (prometheus_client Metric objects), for one scrape."""
        if not self.alive:
            return self._last_families
        token = next(self._keys)
        future = self._loop.create_future()
        self._collects[token] = future
        self._send(("collect", token))
        try:
            self._last_families = await asyncio.wait_for(future, COLLECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("engine %s sent no metrics within %s s", self.name, COLLECT_TIMEOUT_S)
        finally:
            self._collects.pop(token, None)
        return self._last_families

    # --- the pipe -----------------------------------------------------------------------------

    def _send(self, message) -> None:
        if self.dead is not None or self._conn is None:
            return
        try:
            self._conn.send(message)
        except (OSError, ValueError):  # the process is gone: its end of the pipe is closed
            self._lost()

    def _on_readable(self) -> None:
        try:
            # a bounded batch per wake-up: an engine that keeps sending must not keep the loop
            # from the streams its events are for
            for _ in range(MAX_MESSAGES_PER_WAKE):
                self._handle(self._conn.recv())
                if not self._conn.poll():
                    break
        except (EOFError, OSError):
            self._lost()

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "events":
            for key, event in message[1]:
                r = self._pending.get(key)
                if r is None:
                    continue
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    del self._pending[key]
                r.events.put_nowait(event)
        elif kind == "metrics":
            future = self._collects.get(message[1])
            if future is not None and not future.done():
                future.set_result(message[2])
        elif kind == "dead":
            self.dead = message[1]
            log.error("engine %s died: %s", self.name, self.dead)

    def _lost(self) -> None:
        """The engine process ended without being asked: every request it held fails."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        if self.dead is None:
            self._proc.join(1)
            self.dead = f"engine process exited (code {self._proc.exitcode})"
            log.error("engine %s: %s", self.name, self.dead)
        for r in self._pending.values():
            r.events.put_nowait(ErrorEvent(r.index, f"engine failure: {self.dead}"))
        self._pending.clear()
        for future in self._collects.values():
            if not future.done():
                future.set_result(self._last_families)


# --- the engine process ---------------------------------------------------------------------------

def engine_main(conn, spec: dict) -> None:
    """Loads the model, runs an Engine, serves the pipe; ends on "shutdown" or when the server's
    end of the pipe closes (the server is gone)."""
    # signals are the server's to handle (Ctrl-C in a terminal reaches the whole process group)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = threading.Lock()  # the engine thread, this thread and the watcher all send

    def send(message) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                os._exit(0)  # the server is gone

    try:
        import torch
        from pcgpt.serve.metrics import Metrics
        from pcgpt.serve.service import model_card
        from pcgpt.model.checkpoint import load_for_inference
        from pcgpt.model.device import resolve_device, resolve_dtype
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        device = resolve_device(spec["device"])
        model, tokenizer, metadata = load_for_inference(spec["path"], device=device,
                                                        dtype=resolve_dtype(spec["dtype"], device),
                                                        quantization=spec["quantization"])
        if spec["quantization"] is not None:
            metadata = {**metadata, "quantization": spec["quantization"].to_dict()}
        metrics = Metrics()
        live: dict = {}  # key -> this process's copy of the request

        def deliver(items) -> None:
            for r, event in items:
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    live.pop(r.key, None)
            send(("events", [(r.key, event) for r, event in items]))

        engine = Engine(spec["name"], model, tokenizer, metrics, max_batch_size=spec["max_batch_size"],
                        max_queue=spec["max_queue"], sampler_defaults=spec["sampler_defaults"],
                        stream_interval=spec["stream_interval"], deliver=deliver)
        if spec["fault_injection"]:
            install_fault_injection(engine)
        metrics.register_model(spec["name"], model_card(spec["name"], engine, metadata))
        engine.start()
    except Exception as e:
        log.exception("engine process for %s failed to start", spec["name"])
        send(("failed", f"{type(e).__name__}: {e}"))
        return

    def watch() -> None:  # the engine loop died: the server's /ready must say so at once
        engine._thread.join()
        if engine.dead:
            send(("dead", engine.dead))

    threading.Thread(target=watch, name="engine-watch", daemon=True).start()
    send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the server is gone: nobody is left to stream to
        kind = message[0]
        if kind == "submit":
            requests = message[1]
            for r in requests:
                live[r.key] = r
            try:
                engine.submit(requests)
            except (QueueFull, EngineUnavailable) as e:  # the server checks first; a race at shutdown
                deliver([(r, ErrorEvent(r.index, str(e))) for r in requests])
        elif kind == "cancel":
            engine.cancel([live[k] for k in message[1] if k in live])
        elif kind == "collect":
            send(("metrics", message[1], list(metrics.registry.collect())))
        elif kind == "stop_admitting":
            engine.stop_admitting()
        elif kind == "shutdown":
            engine.shutdown(message[1])
            return


def install_fault_injection(engine: Engine) -> None:
    """TEST ONLY, enabled by PCGPT_FAULT_INJECTION=1 (never set it in production). A request whose
    `user` is "fault:request" raises inside its row's step after its first token (that request
    fails, the others go on); "fault:engine" makes the engine loop itself raise, so it dies."""
    def row_fault(seq):
        if getattr(seq.request, "fault", None) == "request" and seq.generated >= 1:
            raise RuntimeError("injected fault (fault:request)")

    step = engine.step

    def step_with_fault():
        if any(getattr(r, "fault", None) == "engine" for r in list(engine.waiting)):
            raise RuntimeError("injected fault (fault:engine)")
        step()

    engine.fault_injector = row_fault
    engine.step = step_with_fault
