"""What goes into an engine (Request), what comes out (TokenEvent, DoneEvent, ErrorEvent), and
how the events reach the asyncio queues of an in-process engine's requests (deliver_to_loops)."""

import asyncio
import time
from dataclasses import dataclass, field

from pcgpt.model.sampling import ErrorDrivenParams, SamplingParams


@dataclass
class Request:
    """One sequence to generate (a choice of a completion), as the engine sees it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    settle_steps: int | None = None  # PC models: steps per token; None = the checkpoint's default
    settle_auto: bool = False  # PC models: adaptive settling (settle only where the entropy reaches a threshold)
    settle_threshold: float | None = None  # adaptive: that threshold in bits; None = the checkpoint's
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first match
    stop_at_eos: bool = True
    logprobs: int | None = None  # top alternatives per token (0 = just the chosen token); None = off
    prompt_logprobs: bool = False  # echo: logprobs of the prompt tokens too
    uncertainty: bool = False
    error_driven: ErrorDrivenParams | None = None  # the error-driven sampler, or None for the standard one
    index: int = 0  # the choice index in the response
    # set by the engine / HTTP layer
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    key: int = 0  # set by a RemoteEngine: how the events of its engine process find this request

    def __getstate__(self) -> dict:
        # sent to an engine process: the asyncio queue and loop stay on the server's side
        return {**self.__dict__, "events": None, "loop": None}

    @property
    def wants_token_info(self) -> bool:
        """Whether the response shows anything per token (logprobs or uncertainty): only then are
        per-token dicts built and sent."""
        return self.logprobs is not None or self.uncertainty


@dataclass
class TokenEvent:
    index: int
    text: str  # newly released text (may be empty while UTF-8 or a possible stop string is held back)
    # per released token, for requests that asked for logprobs or uncertainty (else empty):
    # id, text, logprob, top_logprobs, uncertainty
    tokens: list[dict]
    prompt_tokens: list[dict] | None = None  # echo: the prompt's tokens with their logprobs (first event only)


@dataclass
class DoneEvent:
    index: int
    finish_reason: str  # "stop" (EOS or stop string), "length", "cancelled", "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    index: int
    message: str


def deliver_to_loops(items) -> None:
    """Puts each event on its request's asyncio queue, with one call_soon_threadsafe per event
    loop for the whole list."""
    by_loop: dict = {}
    for r, event in items:
        if r.loop is not None and r.events is not None:
            by_loop.setdefault(r.loop, []).append((r.events, event))
    for loop, queued in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, queued)
        except RuntimeError:
            pass  # the client's event loop is gone


def _put_all(items) -> None:
    for queue, event in items:
        queue.put_nowait(event)
