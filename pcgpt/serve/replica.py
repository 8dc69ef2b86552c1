"""Being one replica of many behind a load balancer: a stable replica id, and a SIGTERM drain that
keeps listening.

The drain, on the first SIGTERM:
  1. at once, `/ready` answers 503 and every new inference request gets 503 `model_unavailable`
     (OpenAI's error shape), while the listener stays open: a balancer that probes readiness stops
     routing here, and one that still sends (Kubernetes' endpoint removal races the signal) gets an
     answer it can retry elsewhere instead of a refused connection;
  2. running requests, streams included, go on to their end;
  3. when none is left, or `--drain-seconds` have passed, uvicorn's own shutdown runs: the
     listener closes and the engines stop.
A second SIGTERM, or SIGINT (Ctrl-C), skips the wait.
"""

import logging
import signal
import socket
import time

import uvicorn

log = logging.getLogger("pcgpt.replica")


def default_replica_id(port: int) -> str:
    """hostname:port: in Kubernetes the hostname is the pod's name, in compose the container's id;
    the port tells apart replicas that share a host."""
    return f"{socket.gethostname()}:{port}"


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with the drain above. `app` is the FastAPI app (create_app), whose
    `state.shutting_down` the routes read and whose `state.engines` stop admitting."""

    def __init__(self, config: uvicorn.Config, app, drain_seconds: float):
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self.drain_deadline: float | None = None
        self.engines_told = False

    def handle_exit(self, sig: int, frame) -> None:
        starts_drain = sig == signal.SIGTERM and self.drain_deadline is None
        super().handle_exit(sig, frame)  # records the signal, which uvicorn re-raises once it has shut down
        if not starts_drain:
            return
        self.should_exit = False
        self.drain_deadline = time.monotonic() + self.drain_seconds
        # a signal handler runs between two bytecodes of the event loop's thread, possibly inside a
        # write to an engine's pipe: set flags here, and tell the engines from on_tick
        self.app.state.shutting_down = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if not self.engines_told:
                self.engines_told = True
                for engine in self.app.state.engines.values():
                    engine.stop_admitting()
            if counter % 10 == 0:
                log.info("draining: %d request(s) running; /ready answers 503", len(self.server_state.tasks))
            if not self.server_state.tasks:
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                # the drain's time is spent: uvicorn's shutdown and the engines' must not wait as long
                # again (the orchestrator's SIGKILL is due), so what still runs is cancelled now
                log.warning("drain: %d request(s) still running after %.0f s; cancelling them",
                            len(self.server_state.tasks), self.drain_seconds)
                self.config.timeout_graceful_shutdown = 1
                self.app.state.config.drain_seconds = 0
                self.should_exit = True
        return await super().on_tick(counter)
