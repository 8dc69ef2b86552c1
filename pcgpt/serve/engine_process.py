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

Messages, pickled over one multiprocessing Pipe (the server writes from a thread per engine, so a
full pipe never blocks its event loop):
  server -> engine  ("submit", [Request]), ("cancel", [key]), ("stop_admitting",),
                    ("collect", token), ("shutdown", drain_seconds)
  engine -> server  ("ready",) or ("failed", why), ("events", [(key, event)]),
                    ("metrics", token, [metric family]), ("heartbeat", steps run), ("dead", why)

The server watches each engine (RemoteEngine's watchdog): a hung one is killed, a dead one
restarted with backoff.
"""

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass

from pcgpt.serve.engine import DoneEvent, Engine, EngineUnavailable, ErrorEvent, QueueFull, check_admission
from pcgpt.serve.metrics import zero_gauges

log = logging.getLogger("pcgpt.engine_process")

START_TIMEOUT_S = 600  # loading a checkpoint in the engine process
COLLECT_TIMEOUT_S = 1.0  # a scrape waits this long for an engine's metrics, then serves its last ones
MAX_MESSAGES_PER_WAKE = 32  # engine messages handled before the event loop gets a turn
READ_BYTES = 1 << 20  # read from an engine's pipe while less than this is buffered (its backpressure)
RESTART_BACKOFF_MAX_S = 60.0  # the longest wait before a restart (the backoff doubles up to it)
RESTART_STREAK_RESET_S = 300.0  # an engine up this long has its count of restarts in a row reset


class EngineStartError(Exception):
    """An engine process that did not come up (its checkpoint failed to load, or it died): the
    message says which model and why, in one line."""


@dataclass
class EngineLostEvent(ErrorEvent):
    """A request failed because its engine process died or hung, not because of the request: the
    client may retry (HTTP 503, code model_unavailable)."""


class _Writer:
    """Sends messages down an engine's pipe from a thread of its own: a pipe whose engine has
    stopped reading (hung, or SIGSTOPped) fills up, and a blocking send on the event loop would
    then stall every route of every model. `on_error` runs if a send fails. The thread closes the
    connection when it ends (after close(), or a failed send): closed under a send still in
    progress, its descriptor could be reused by the next engine's pipe and receive the rest."""

    _CLOSE = object()

    def __init__(self, conn, name: str, on_error):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._conn = conn
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name=f"pcgpt-pipe-{name}", daemon=True)
        self._thread.start()

    def put(self, message) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._CLOSE)

    def _run(self) -> None:
        try:
            while (message := self._queue.get()) is not self._CLOSE:
                try:
                    self._conn.send(message)
                except (OSError, ValueError):  # the process is gone: its end of the pipe is closed
                    self._on_error()
                    return
        finally:
            self._conn.close()


class _Frames:
    """An engine's messages as the event loop reads them: multiprocessing.Connection's framing
    (a "!i" length, or -1 and a "!Q" length, then the pickle), read without ever waiting. Bytes are
    taken as they arrive (recv with MSG_DONTWAIT, on a duplicate of the pipe's socket: the writer
    thread keeps its blocking writes), whole messages come out. An engine stopped half-way through
    writing a message leaves part of it here instead of a read that blocks the loop."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=os.dup(fd))
        self.buffer = bytearray()

    def read(self) -> bool:
        """Takes what has arrived; False at end of file. While READ_BYTES and a whole message are
        buffered it takes nothing, so an engine that sends faster than the loop handles waits."""
        if len(self.buffer) >= READ_BYTES and self._frame() is not None:
            return True
        try:
            data = self.sock.recv(READ_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        self.buffer += data
        return bool(data)

    def _frame(self):
        """(start, end) of the first message's pickle once it has all arrived, else None."""
        buffer = self.buffer
        if len(buffer) < 4:
            return None
        (size,), start = struct.unpack_from("!i", buffer), 4
        if size == -1:
            if len(buffer) < 12:
                return None
            (size,), start = struct.unpack_from("!Q", buffer, 4), 12
        return (start, start + size) if len(buffer) >= start + size else None

    def next(self):
        """The next whole message, or None while it has not all arrived."""
        frame = self._frame()
        if frame is None:
            return None
        start, end = frame
        message = pickle.loads(self.buffer[start:end])
        del self.buffer[:end]
        return message

    def close(self) -> None:
        self.sock.close()


class RemoteEngine:
    """The server's handle on one engine process. It holds the checkpoint's info (config,
    tokenizer, metadata: pcgpt.model.checkpoint.read_checkpoint_info), never its weights.

    start() then wait_ready() before the server runs (a model that fails to load stops the
    server before it listens), then attach() on the server's event loop.

    Once attached it watches the process: an engine that has work (requests, or a metrics
    request) and shows no progress for `watchdog_s` is hung and is killed; a dead one (its process
    exited, or its loop died) fails the requests it held and is started again after a backoff of
    restart_backoff_s, doubling up to RESTART_BACKOFF_MAX_S, at most max_restarts times in a row.
    After that it stays down and `gave_up` is set (the server's /health then fails)."""

    def __init__(self, name: str, info, *, device: str, dtype: str, threads: int,
                 max_batch_size: int, max_queue: int, sampler_defaults: dict, stream_interval: int,
                 fault_injection: bool = False, log_level: str = "info", watchdog_s: float = 30.0,
                 max_restarts: int = 5, restart_backoff_s: float = 1.0,
                 cuda_graphs: bool = True, compile_decode: bool = False, quantization=None):
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
        self.watchdog_s = watchdog_s
        self.max_restarts = max_restarts
        self.restart_backoff_s = restart_backoff_s
        # the engine reports its step count this often, so a stall shows within ~watchdog_s
        heartbeat_s = min(1.0, watchdog_s / 4)
        self.spec = dict(name=name, path=info.path, device=device, dtype=dtype, threads=threads,
                         max_batch_size=max_batch_size, max_queue=max_queue, sampler_defaults=sampler_defaults,
                         stream_interval=stream_interval, fault_injection=fault_injection, log_level=log_level,
                         heartbeat_s=heartbeat_s, cuda_graphs=cuda_graphs, compile_decode=compile_decode,
                         quantization=quantization)
        self.dead: str | None = None  # why the engine is down, while it is
        self.gave_up = False  # down for good: max_restarts restarts in a row did not keep it up
        self.restarts = 0  # restarts since the server started
        self._streak = 0  # restarts in a row (reset once an engine stays up RESTART_STREAK_RESET_S)
        self._restart_at: float | None = None  # when the next restart is due, while one is
        self._up_since = 0.0
        self.pid: int | None = None
        self._accepting = True
        self._closing = False
        self._pending: dict = {}  # key -> Request: submitted, no DoneEvent or ErrorEvent yet
        self._keys = itertools.count(1)
        self._collects: dict = {}  # token -> future of a metrics request
        self._last_families: list = []  # what the engine reported last
        self._proc = self._conn = self._loop = self._writer = self._frames = None
        self._connected = False  # attached to the current process's pipe
        self._generation = 0  # which process incarnation the pipe callbacks belong to
        self._steps = -1  # the engine's step count, as its last heartbeat said
        self._progress_at = 0.0  # when the engine last made progress (or work arrived at an idle one)
        self._unanswered_since: float | None = None  # a metrics request sent and not answered since
        self._watch_timer = self._restart_task = None

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
        log.info("engine %s: process %s started", self.name, self.pid)

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
        """From here on the engine's messages are read on the running event loop, its pipe is
        written by a thread, and the watchdog runs."""
        self._loop = asyncio.get_running_loop()
        self._connect()
        self._watch()

    def _connect(self) -> None:
        self._generation += 1
        generation = self._generation
        self._writer = _Writer(self._conn, self.name,
                               lambda: self._loop.call_soon_threadsafe(self._lost, generation))
        self._connected = True
        self._frames = _Frames(self._conn.fileno())
        self._loop.add_reader(self._frames.sock.fileno(), self._on_readable, generation)
        # uvloop (libuv) makes a watched descriptor non-blocking, and the flag is the socket's, so
        # the writer's too: the writer thread blocks per message (its reads never wait: _Frames)
        os.set_blocking(self._conn.fileno(), True)
        self.dead = None
        self._steps = -1
        self._progress_at = self._up_since = time.monotonic()
        self._unanswered_since = None

    @property
    def alive(self) -> bool:
        return self.dead is None and self._proc is not None and self._proc.is_alive()

    @property
    def status(self) -> str:
        """One line for /ready: running, or why it is down and what happens next."""
        if self.alive:
            return "running"
        why = f"dead: {self.dead or 'not started'}"
        if self._restart_at is not None:
            wait = max(0.0, self._restart_at - time.monotonic())
            return f"{why}; restart {self._streak} of {self.max_restarts} in {wait:.0f} s"
        if self._restart_task is not None:
            return f"{why}; restart {self._streak} of {self.max_restarts} loading"
        if self.gave_up and self.max_restarts == 0:
            return f"{why}; restarts are off (--max-engine-restarts 0)"
        if self.gave_up:
            return f"{why}; gave up after {self.max_restarts} restarts in a row"
        return why

    def stop_admitting(self) -> None:
        self._accepting = False
        self._closing = True
        self._send(("stop_admitting",))

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Lets the engine drain for up to drain_seconds (it aborts what is left), then ends the process."""
        self._accepting = False
        self._closing = True
        for handle in (self._watch_timer, self._restart_task):
            if handle is not None:
                handle.cancel()
        if self._proc is None or self._conn.closed or (self._loop is not None and not self._connected):
            return
        if self._writer is None:  # never attached: nothing else writes the pipe
            try:
                self._conn.send(("shutdown", drain_seconds))
            except (OSError, ValueError):
                pass
        else:
            self._send(("shutdown", drain_seconds))
        self._proc.join(drain_seconds + 10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._disconnect()

    def _disconnect(self) -> None:
        if self._connected:
            self._connected = False
            if not self._loop.is_closed():
                self._loop.remove_reader(self._frames.sock.fileno())
            self._frames.close()
        if self._writer is not None:
            self._writer.close()  # it closes the connection once its last send returns
            self._writer = None
        else:
            self._conn.close()

    # --- called from the HTTP event loop ------------------------------------------------------

    def submit(self, requests: list) -> None:
        """Queues every request or none, with the in-process engine's limit, counted from the
        requests this side still waits on (running + waiting; a finish not yet heard of counts,
        so the check can only be stricter than the engine's own)."""
        running = min(len(self._pending), self.max_batch_size)
        check_admission(self.name, self._accepting, self.alive, len(self._pending) - running,
                        self.max_batch_size - running, len(requests), self.max_queue)
        if not self._pending:  # an idle engine: the watchdog's clock starts now
            self._progress_at = time.monotonic()
        for r in requests:
            r.key = next(self._keys)
            self._pending[r.key] = r
        self._send(("submit", requests))

    def cancel(self, requests: list) -> None:
        for r in requests:
            r.cancelled = True
        self._send(("cancel", [r.key for r in requests if r.key in self._pending]))

    async def collect(self) -> list:
        """This engine's metric families (prometheus_client Metric objects), for one scrape. A
        dead engine's gauges read 0; an engine that does not answer within COLLECT_TIMEOUT_S is
        served from its last answer (and is not asked again while a request is unanswered)."""
        if not self.alive:
            return zero_gauges(self._last_families)
        if self._unanswered_since is not None and time.monotonic() - self._unanswered_since > COLLECT_TIMEOUT_S:
            return self._last_families
        token = next(self._keys)
        future = self._loop.create_future()
        self._collects[token] = future
        if self._unanswered_since is None:
            self._unanswered_since = time.monotonic()
        self._send(("collect", token))
        try:
            self._last_families = await asyncio.wait_for(future, COLLECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("engine %s sent no metrics within %s s", self.name, COLLECT_TIMEOUT_S)
        finally:
            self._collects.pop(token, None)
        return self._last_families if self.alive else zero_gauges(self._last_families)

    # --- the pipe -----------------------------------------------------------------------------

    def _send(self, message) -> None:
        if self.dead is not None or self._writer is None:
            return
        self._writer.put(message)

    def _on_readable(self, generation: int) -> None:
        if generation != self._generation or not self._connected:
            return
        try:
            arrived = self._frames.read()
        except OSError:
            arrived = False
        self._drain(generation)
        if not arrived:  # end of file: the process is gone (what it sent before is handled)
            self._lost(generation)

    def _drain(self, generation: int) -> None:
        # a bounded batch per turn: an engine that keeps sending must not keep the loop from the
        # streams its events are for
        for _ in range(MAX_MESSAGES_PER_WAKE):
            if generation != self._generation or not self._connected:
                return
            message = self._frames.next()
            if message is None:
                return
            self._handle(message)
        self._loop.call_soon(self._drain, generation)

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "events":
            self._progress_at = time.monotonic()
            for key, event in message[1]:
                r = self._pending.get(key)
                if r is None:
                    continue
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    del self._pending[key]
                r.events.put_nowait(event)
        elif kind == "heartbeat":
            if message[1] != self._steps:
                self._steps = message[1]
                self._progress_at = time.monotonic()
        elif kind == "metrics":
            self._unanswered_since = None
            future = self._collects.get(message[1])
            if future is not None and not future.done():
                future.set_result(message[2])
        elif kind == "dead":  # the engine loop died; its process lives on, with nothing to run
            log.error("engine %s died: %s", self.name, message[1])
            self._kill(message[1])

    def _watch(self) -> None:
        """The watchdog: every heartbeat period, is the engine making progress on its work?"""
        self._watch_timer = self._loop.call_later(self.spec["heartbeat_s"], self._watch)
        if not self.alive:
            if self.dead is None and self._proc is not None and self._restart_task is None:
                self._lost(self._generation)  # exited without a word or an EOF seen yet
            return
        now = time.monotonic()
        if self._pending and now - self._progress_at > self.watchdog_s:
            self._kill(f"hung: no step for {now - self._progress_at:.1f} s with {len(self._pending)} requests "
                       f"(--engine-watchdog-seconds {self.watchdog_s:g})")
        elif self._unanswered_since is not None and now - self._unanswered_since > self.watchdog_s:
            self._kill(f"hung: no answer to a metrics request for {now - self._unanswered_since:.1f} s "
                       f"(--engine-watchdog-seconds {self.watchdog_s:g})")
        elif self._streak and now - self._up_since > RESTART_STREAK_RESET_S:
            self._streak = 0

    def _kill(self, why: str) -> None:
        """Ends a hung engine (SIGKILL ends a stopped process too) or one whose loop died."""
        log.error("engine %s: %s; killing its process (pid %s)", self.name, why, self.pid)
        self.dead = why
        self._proc.kill()
        self._lost(self._generation)

    def _lost(self, generation: int) -> None:
        """The engine is gone: every request it held fails, its pipe is closed, a restart is planned."""
        if generation != self._generation or not self._connected:
            return
        if self.dead is None:
            self._proc.join(1)  # the process has ended (its pipe closed): this reaps it at once
            self.dead = f"engine process exited (code {self._proc.exitcode})"
            log.error("engine %s: %s", self.name, self.dead)
        self._disconnect()
        for r in self._pending.values():
            r.events.put_nowait(EngineLostEvent(r.index, f"engine failure: {self.dead}"))
        self._pending.clear()
        for future in self._collects.values():
            if not future.done():
                future.set_result(zero_gauges(self._last_families))
        self._unanswered_since = None
        self._plan_restart()

    def _plan_restart(self) -> None:
        if self._closing:
            return
        if self._streak >= self.max_restarts:
            self.gave_up = True
            log.error("engine %s stays down: %d restarts in a row did not keep it up (--max-engine-restarts)",
                      self.name, self._streak)
            return
        self._streak += 1
        delay = min(self.restart_backoff_s * 2 ** (self._streak - 1), RESTART_BACKOFF_MAX_S)
        self._restart_at = time.monotonic() + delay
        log.warning("engine %s: restart %d of %d in %.1f s", self.name, self._streak, self.max_restarts, delay)
        self._restart_task = asyncio.ensure_future(self._restart(delay))

    async def _restart(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            self._restart_at = None
            if self._closing:
                return
            old = self._proc
            try:
                # spawning and loading block: in a thread, so the other models keep serving
                await asyncio.to_thread(self._respawn, old)
            except EngineStartError as e:
                self.dead = str(e)
                log.error("engine %s: restart failed: %s", self.name, e)
                self._restart_task = None
                self._plan_restart()
                return
            if self._closing:  # the server began to stop while the model loaded
                self._proc.kill()
                self._conn.close()
                return
            self.restarts += 1
            self._connect()
            log.info("engine %s is back (restart %d, pid %s)", self.name, self.restarts, self.pid)
        finally:
            self._restart_at = None
            if self._restart_task is asyncio.current_task():
                self._restart_task = None

    def _respawn(self, old) -> None:
        old.join(5)  # reaped (a killed process has ended by now)
        self.start()
        self.wait_ready()


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
                        stream_interval=spec["stream_interval"], deliver=deliver, cuda_graphs=spec["cuda_graphs"],
                        compile_decode=spec["compile_decode"])
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

    def heartbeat() -> None:  # the step count, for the server's watchdog: a hung step stops it moving
        while True:
            time.sleep(spec["heartbeat_s"])
            send(("heartbeat", engine.steps_run))

    threading.Thread(target=watch, name="engine-watch", daemon=True).start()
    threading.Thread(target=heartbeat, name="engine-heartbeat", daemon=True).start()
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
