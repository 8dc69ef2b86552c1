"""Between HTTP and the engine: requests to engine Requests, engine events to OpenAI bodies.

Logprobs and uncertainty always describe the model's own distribution (after settling for PC
models), before penalties, temperature, top-k/top-p/min-p or the error-driven sampler's changes.
"""

import asyncio
import calendar
import math
import time
import uuid

import orjson

from pcgpt.serve.engine import DoneEvent, EngineUnavailable, ErrorEvent, QueueFull, Request
from pcgpt.serve.engine_process import EngineLostEvent
from pcgpt.model.card import describe
from pcgpt.model.checkpoint import CheckpointInfo
from pcgpt.model.sampling import ErrorDrivenParams, SamplingParams
from pcgpt.model.tokenizer import TokenizerError

# The chat template: each message as a speaker's turn, the way the Shakespeare corpus writes
# them ("NAME:\ntext\n\n"); the reply is the ASSISTANT's turn. A message's `name` is the speaker.
CHAT_ROLES = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
CHAT_DEFAULT_STOP = ["\n\n"]
SSE_DONE = "data: [DONE]\n\n"  # a stream's last chunk


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def model_card(name: str, engine, metadata: dict | None = None) -> dict:
    """/v1/models' entry and the pcgpt_model info metric: pcgpt.model.card.describe() inside
    OpenAI's model object. `engine`: a RemoteEngine (the HTTP process: it holds the checkpoint's
    info), or an in-process Engine (an engine process: its loaded model, with `metadata`)."""
    if hasattr(engine, "info"):
        info, dtype = engine.info, engine.dtype
    else:
        info = CheckpointInfo.of(engine.model, engine.tokenizer, metadata or {})
        dtype = next(engine.model.parameters()).dtype
    # the training history stays with `pcgpt inspect`: it names the trainer's files and commands
    card = {k: v for k, v in describe(info, dtype).items() if k not in ("training", "eval")}
    return {"id": name, "object": "model", "created": _created(info.metadata), "owned_by": "pcgpt", **card,
            "max_batch_size": engine.max_batch_size}


def _created(metadata: dict) -> int:
    """OpenAI's `created` (Unix seconds): when the checkpoint was saved, 0 when it does not say."""
    try:
        return calendar.timegm(time.strptime(str(metadata["saved_at"]), "%Y-%m-%dT%H:%M:%SZ"))
    except (KeyError, ValueError):
        return 0


def sampler_defaults(metadata: dict, tokenizer) -> dict:
    """The error-driven sampler's defaults for a checkpoint: its own "sampler" entry, else τ = its
    validation cross-entropy in bits for a char model (docs/pc.md) and 5 bits for BPE."""
    defaults = dict(metadata.get("sampler") or {})
    val_loss = (metadata.get("eval") or {}).get("val_loss") if isinstance(metadata.get("eval"), dict) else None
    if "tau" not in defaults:
        char = tokenizer.name == "char" and isinstance(val_loss, (int, float)) and val_loss > 0
        defaults["tau"] = val_loss / math.log(2) if char else 5.0
    return defaults


def chat_prompt(messages) -> str:
    turns = []
    for m in messages:
        speaker = (m.name or CHAT_ROLES[m.role]).upper()
        turns.append(f"{speaker}:\n{m.text()}\n\n")
    return "".join(turns) + "ASSISTANT:\n"


class Job:
    """One HTTP request: its engine Requests (prompts × n) and the response it builds."""

    def __init__(self, kind: str, body, engine, prompts: list[list[int]], prompt_texts: list[str],
                 max_tokens: int, stop: list[str], logprobs: int | None, echo: bool):
        self.kind = kind  # "text_completion" or "chat.completion"
        self.body = body
        self.engine = engine
        self.stream = bool(body.stream)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.uncertainty = body.uncertainty
        self.logprobs = logprobs
        self.echo = echo
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_texts = prompt_texts
        self.n = body.n or 1
        self.requests: list[Request] = []
        sampling_error = None
        for i, ids in enumerate(prompts):
            for j in range(self.n):
                seed = body.seed if body.seed is None or j == 0 else body.seed + j
                params = SamplingParams(temperature=_or(body.temperature, 1.0), top_k=_or(body.top_k, 0),
                                        top_p=_or(body.top_p, 1.0), min_p=_or(body.min_p, 0.0),
                                        repetition_penalty=_or(body.repetition_penalty, 1.0),
                                        presence_penalty=_or(body.presence_penalty, 0.0),
                                        frequency_penalty=_or(body.frequency_penalty, 0.0), seed=seed)
                try:
                    params.validate()
                except ValueError as e:
                    sampling_error = str(e)
                self.requests.append(Request(
                    prompt_ids=ids, max_tokens=max_tokens, sampling=params, **_settling(body),
                    stop=stop, stop_at_eos=not body.ignore_eos, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
                    uncertainty=body.uncertainty, error_driven=_error_driven(body, engine), index=i * self.n + j))
        if sampling_error:
            raise APIError(400, sampling_error)

    # --- running -------------------------------------------------------------------------------

    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        for r in self.requests:
            r.loop, r.events = loop, self.queue
        try:
            self.engine.submit(self.requests)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", None, "queue_full") from None
        except EngineUnavailable as e:
            raise APIError(503, str(e), "server_error", None, "model_unavailable") from None

    async def events(self, request):
        """Engine events until every choice is done; cancels the choices if the client leaves."""
        open_choices = len(self.requests)
        finished = False
        loop = asyncio.get_running_loop()
        tick = None

        def poke():  # wakes the reader every 0.2 s, events or not, to check that the client is there
            nonlocal tick
            self.queue.put_nowait(_CHECK_CLIENT)
            tick = loop.call_later(0.2, poke)

        # one timer per request, not a timeout per awaited event: at one event per token, the
        # per-event timer was a measurable share of the event loop's time per token
        tick = loop.call_later(0.2, poke)
        try:
            while open_choices:
                event = await self.queue.get()
                if event is _CHECK_CLIENT:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    open_choices -= 1
                yield event
            finished = True
        finally:
            tick.cancel()
            if not finished:
                self.engine.cancel(self.requests)

    async def collect(self, request):
        choices = {r.index: _Choice(r, self) for r in self.requests}
        async for event in self.events(request):
            if isinstance(event, EngineLostEvent):  # not this request's fault: the client may retry
                raise APIError(503, event.message, "server_error", None, "model_unavailable")
            if isinstance(event, ErrorEvent):
                raise APIError(500, event.message, "server_error", None, "generation_failed")
            choices[event.index].add(event)
        if any(c.finish_reason in ("abort", "cancelled") for c in choices.values()):
            raise APIError(503, "the server shut down before this request finished", "server_error", None, "aborted")
        usage = self._usage(choices.values())
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.body.model,
                "choices": [choices[i].body(final=True) for i in sorted(choices)], "usage": usage}

    async def sse(self, request):
        choices = {r.index: _Choice(r, self) for r in self.requests}
        chunk_kind = self.kind + (".chunk" if self.kind == "chat.completion" else "")
        # every chunk repeats id, object, created and model: encoded once, each token's part spliced in
        head = b"data: " + orjson.dumps(self._chunk(chunk_kind, []))[:-3] + b"["
        if self.kind == "chat.completion":
            for i in sorted(choices):
                yield _sse(self._chunk(chunk_kind, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]))
        async for event in self.events(request):
            if isinstance(event, ErrorEvent):
                code = "model_unavailable" if isinstance(event, EngineLostEvent) else "generation_failed"
                yield _sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": code}})
                continue
            part = choices[event.index].add(event)
            if part is not None:
                yield head + orjson.dumps(part) + b"]}\n\n"
        if self.include_usage:
            yield _sse({**self._chunk(chunk_kind, []), "usage": self._usage(choices.values())})
        yield SSE_DONE

    def _chunk(self, kind, choices):
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model, "choices": choices}

    def _usage(self, choices) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.requests if r.index % self.n == 0)
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Choice:
    """Accumulates one choice's text, logprobs and uncertainty; renders bodies and stream parts."""

    def __init__(self, request: Request, job: Job):
        self.r = request
        self.job = job
        self.text = ""
        self.tokens: list[dict] = []
        self.finish_reason = None
        self.completion_tokens = 0
        self.offset = 0  # text offset of the next token (completions logprobs)
        self.prompt_text = job.prompt_texts[request.index // job.n]
        self.started = False
        self.prompt_tokens: list[dict] = []  # echo with logprobs: the prompt's scored tokens

    def add(self, event):
        """Folds an event in; returns the stream part for it (None when there is nothing to send)."""
        prompt = self._start(getattr(event, "prompt_tokens", None))
        if isinstance(event, DoneEvent):
            self.finish_reason = event.finish_reason
            self.completion_tokens = event.completion_tokens
            part = self._part("", [], prompt)
            part["finish_reason"] = event.finish_reason if event.finish_reason in ("stop", "length") else "length"
            return part
        self.text += event.text
        self.tokens.extend(event.tokens)
        return self._part(event.text, event.tokens, prompt)

    def _start(self, prompt_tokens):
        """On a choice's first event: echo puts the prompt (and its scored tokens) in front."""
        if self.started:
            return None
        self.started = True
        if not (self.job.echo and self.job.kind == "text_completion"):
            return None
        self.text = self.prompt_text
        self.prompt_tokens = prompt_tokens or []
        return self.prompt_tokens

    def _part(self, text, tokens, prompt):
        job = self.job
        if job.kind == "text_completion":
            if prompt is not None:  # the first part of an echoed choice
                text = self.prompt_text + text
            part = {"text": text, "index": self.r.index, "logprobs": None, "finish_reason": None}
            if job.logprobs is not None:
                part["logprobs"] = self._completion_logprobs((prompt or []) + tokens)
        else:
            part = {"index": self.r.index, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": None}
            if job.logprobs is not None:
                part["logprobs"] = {"content": [_chat_logprob(t, job.logprobs) for t in tokens], "refusal": None}
        if job.uncertainty:
            part["uncertainty"] = [t["uncertainty"] for t in tokens]
        return part

    def _completion_logprobs(self, tokens):
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            out["tokens"].append(t["text"])
            out["token_logprobs"].append(t["logprob"])
            out["top_logprobs"].append(t["top_logprobs"])
            out["text_offset"].append(self.offset)
            self.offset += len(t["text"])
        return out

    def body(self, final: bool) -> dict:
        job = self.job
        reason = self.finish_reason if self.finish_reason in ("stop", "length") else "length"
        self.offset = 0
        if job.kind == "text_completion":
            out = {"text": self.text, "index": self.r.index, "logprobs": None, "finish_reason": reason}
            if job.logprobs is not None:
                out["logprobs"] = self._completion_logprobs(self.prompt_tokens + self.tokens)
        else:
            out = {"index": self.r.index, "message": {"role": "assistant", "content": self.text, "refusal": None},
                   "logprobs": None, "finish_reason": reason}
            if job.logprobs is not None:
                out["logprobs"] = {"content": [_chat_logprob(t, job.logprobs) for t in self.tokens], "refusal": None}
        if job.uncertainty:
            out["uncertainty"] = [t["uncertainty"] for t in self.tokens]
        return out


def _chat_logprob(t: dict, k: int) -> dict:
    top = [{"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))} for tok, lp in (t["top_logprobs"] or {}).items()]
    return {"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode("utf-8")), "top_logprobs": top[:k]}


_CHECK_CLIENT = object()  # a queue item that is no event: time to check for a disconnect


def _sse(obj) -> bytes:
    # orjson: one chunk per token makes this the hottest line of a stream (json.dumps is much slower);
    # values are finite by construction (serve/output._finite), which orjson would otherwise write as null
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _or(value, default):
    return default if value is None else value


def _error_driven(body, engine) -> ErrorDrivenParams | None:
    if body.sampler != "error_driven":
        if body.mirostat_tau is not None or body.mirostat_eta is not None or body.precision_gain is not None:
            raise APIError(400, "mirostat_tau, mirostat_eta and precision_gain apply to sampler 'error_driven' only",
                           param="sampler")
        return None
    defaults = engine.sampler_defaults
    temperature = _or(body.temperature, 1.0)
    if temperature == 0:
        raise APIError(400, "sampler 'error_driven' needs temperature > 0 (its base temperature T0)", param="temperature")
    tau = body.mirostat_tau if body.mirostat_tau is not None else defaults.get("tau", 5.0)
    lam = _or(body.precision_gain, defaults.get("lam", 0.5))
    params = ErrorDrivenParams(tau=float(tau), eta=_or(body.mirostat_eta, 0.1), lam=float(lam),
                               base_temperature=temperature, m0=defaults.get("m0"))
    try:
        params.validate()
    except ValueError as e:
        raise APIError(400, str(e), param="mirostat_tau") from None
    return params


# --- building jobs ------------------------------------------------------------------------------

def _encode(engine, text: str, config, param: str) -> list[int]:
    if len(text) > config.max_prompt_chars:
        raise APIError(400, f"{param} is {len(text)} characters; the limit is {config.max_prompt_chars}", param=param)
    try:  # JSON's "\ud800" escape gives a lone surrogate: no tokenizer sees it, no response can encode it
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode: a lone surrogate at character {e.start}", param=param) from None
    try:
        return engine.tokenizer.encode(text)
    except TokenizerError as e:
        raise APIError(400, f"{param} cannot be tokenized for model {engine.name!r}: {e}", param=param) from None


def _fit(engine, ids: list[int], max_tokens: int, truncate: int | None, param: str) -> list[int]:
    """Checks (or, when asked, truncates) prompt + max_tokens against the context length."""
    block = engine.block_size
    if truncate is not None:
        ids = ids[-truncate:]
        if len(ids) + max_tokens > block:
            ids = ids[len(ids) + max_tokens - block:]
    if not ids:
        raise APIError(400, f"{param} is empty: at least one token is needed", param=param)
    if max_tokens > block - 1:
        raise APIError(400, f"max_tokens {max_tokens} is more than this model's context of {block} tokens allows",
                       param="max_tokens")
    if len(ids) + max_tokens > block:
        raise APIError(400, f"{param} has {len(ids)} tokens and max_tokens is {max_tokens}: together more than the "
                            f"context length {block}; shorten the prompt, lower max_tokens or set truncate_prompt_tokens",
                       param=param, code="context_length_exceeded")
    bad = [t for t in ids if not 0 <= t < engine.tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"{param} holds token ids outside the vocabulary of {engine.tokenizer.vocab_size}: {bad[:5]}",
                       param=param)
    return ids


def _settling(body) -> dict:
    """The Request fields of a body's settle_steps: a count, or "auto" (adaptive settling)."""
    if body.settle_steps == "auto":
        return {"settle_steps": None, "settle_auto": True, "settle_threshold": body.settle_threshold}
    return {"settle_steps": body.settle_steps}


def _check_common(body, engine):
    if body.settle_steps not in (None, 0) and engine.model_type != "pc":
        raise APIError(400, f"model {engine.name!r} is a baseline GPT and does not settle; "
                            "settle_steps applies to PC models (omit it or send 0)", param="settle_steps")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def _check_capacity(engine, sequences: int, what: str, param: str) -> None:
    """400, not 429: more sequences than the server can ever hold at once is no reason to retry."""
    if sequences > engine.max_batch_size + engine.max_queue:
        raise APIError(400, f"{what} is more than this server can queue at once "
                            f"({engine.max_batch_size + engine.max_queue} sequences)", param=param)


def completion_job(body, engine, config) -> Job:
    _check_common(body, engine)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    max_tokens = _or(body.max_tokens, 16)
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo (it scores the prompt); otherwise ask for at least 1", param="max_tokens")
    prompt = body.prompt
    if isinstance(prompt, str):
        raw = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        raw = [list(prompt)]
    else:
        raw = list(prompt)
    if not raw:
        raise APIError(400, "prompt is empty", param="prompt")
    _check_capacity(engine, len(raw) * (body.n or 1), f"{len(raw)} prompts × n={body.n} choices", "prompt")
    prompts, texts = [], []
    for p in raw:
        ids = _encode(engine, p, config, "prompt") if isinstance(p, str) else list(p)
        ids = _fit(engine, ids, max_tokens, body.truncate_prompt_tokens, "prompt")
        prompts.append(ids)
        texts.append(p if isinstance(p, str) and body.truncate_prompt_tokens is None else engine.tokenizer.decode(ids))
    return Job("text_completion", body, engine, prompts, texts, max_tokens, body.stop or [], body.logprobs, bool(body.echo))


def chat_job(body, engine, config) -> Job:
    _check_common(body, engine)
    text = chat_prompt(body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    _check_capacity(engine, body.n or 1, f"n={body.n} choices", "n")
    ids = _encode(engine, text, config, "messages")
    if max_tokens is None:  # the room the prompt leaves, once truncated as asked
        kept = len(ids) if body.truncate_prompt_tokens is None else min(len(ids), body.truncate_prompt_tokens)
        max_tokens = max(1, min(256, engine.block_size - kept))
    ids = _fit(engine, ids, max_tokens, body.truncate_prompt_tokens, "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    stop = body.stop if body.stop else CHAT_DEFAULT_STOP
    return Job("chat.completion", body, engine, [ids], [text], max_tokens, stop, logprobs, echo=False)
