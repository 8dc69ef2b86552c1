"""The engine: continuous batching over a slot KV cache, one per loaded model.

A waiting queue (bounded) and a running batch (bounded by the cache's slots). One loop, on its
own thread: admit waiting sequences into free slots and prefill them, run one decode step for
every running row, sample with per-row parameters, detokenize incrementally, apply stop
conditions, deliver the events (to the requests' asyncio queues, or down the pipe of an engine
process: app/engine_process.py, which is how `pcgpt serve` runs each model), free finished
slots at once.

The engine is the only long-lived mutable object of its process.
"""

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pcgpt.model.generate import decode, prefill, prefill_batch
from pcgpt.model.sampling import (BatchSampling, ErrorDrivenParams, SamplingParams, apply_penalties, error_driven_precision,
                            make_generator, sample_from_logits, surprise_filter, token_stats, top_logprobs, update_mu)
from pcgpt.model.tokenizer import IncrementalDetokenizer

log = logging.getLogger("pcgpt.engine")


# admissions of one step prefill together, up to this many padded prompt tokens a forward: bounds
# the activations and attention scores a burst of long prompts allocates at once
MAX_PREFILL_TOKENS = 4096


class QueueFull(Exception):
    """The waiting queue cannot take the request: answered with 429 at once."""


class EngineUnavailable(Exception):
    """The engine is shutting down or has died: answered with 503."""


@dataclass
class Request:
    """One sequence to generate (a choice of a completion), as the engine sees it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    settle_steps: int | None = None  # PC models: steps per token; None = the checkpoint's default
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


@dataclass
class TokenEvent:
    index: int
    text: str  # newly released text (may be empty while UTF-8 or a possible stop string is held back)
    tokens: list[dict]  # per released token: id, text, logprob, top_logprobs, uncertainty
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


class Sequence:
    """Engine-side state of one running request."""

    def __init__(self, request: Request, slot: int, tokenizer, device):
        self.request = request
        self.slot = slot
        self.pos = len(request.prompt_ids)  # position of the next token to feed
        self.last_token: int | None = None
        self.generated = 0
        self.detok = IncrementalDetokenizer(tokenizer)
        self.held = ""  # text not yet released: it might be the start of a stop string
        self.held_tokens: list[dict] = []  # tokens not yet released with their text
        self.released_chars = 0  # characters of the held tokens' text already released
        self.generator = make_generator(request.sampling.seed, device)
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.unsent: TokenEvent | None = None  # released tokens waiting for the stream interval
        self.sent_at = 0  # tokens generated when text last went out (0: nothing yet)
        ed = request.error_driven
        self.mu = (2 * ed.tau if ed.mu0 is None else ed.mu0) if ed else math.inf
        self.log_mean = ed.m0 if ed else None


class Engine:
    def __init__(self, name: str, model, tokenizer, metrics=None, max_batch_size: int = 16,
                 max_queue: int = 64, sampler_defaults: dict | None = None, max_prefill_tokens: int = MAX_PREFILL_TOKENS,
                 stream_interval: int = 1, deliver=None):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        # a running request's tokens go out every stream_interval tokens (the first at once, the
        # rest with the finish): fewer, larger events and stream chunks, less HTTP work per token
        self.stream_interval = max(1, stream_interval)
        self.sampler_defaults = sampler_defaults or {}
        # hands a list of (request, event) to whoever waits for them: by default the requests'
        # asyncio queues, each on its event loop (deliver_to_loops); an engine process pipes them
        self.deliver = deliver or deliver_to_loops
        self.device = model.lm_head.weight.device
        self.block_size = model.config.block_size
        # the tokenizer's vocabulary: logits past it (nanoGPT pads 50257 to 50304) are dropped
        self.vocab = tokenizer.vocab_size
        self.cache = model.new_cache(max_batch_size, max_len=self.block_size)
        # per-slot token statistics for the penalties, on the model's device
        self.prompt_mask = torch.zeros(max_batch_size, self.vocab, dtype=torch.bool, device=self.device)
        self.output_counts = torch.zeros(max_batch_size, self.vocab, dtype=torch.long, device=self.device)
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch_size))
        self._lock = threading.Lock()
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
        self._children: dict = {}  # metrics series -> this model's labelled child (_series)
        if metrics:  # weights on the model's device: the one memory series every device has
            metrics.device_memory.labels(model=name, kind="weights").set(model.weight_bytes())
            self._gauges()  # KV-cache bytes allocated are known before the first step

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
        with self._lock:
            check_admission(self.name, self._accepting, self.alive, len(self.waiting), len(self.free_slots),
                            len(requests), self.max_queue)
            now = time.perf_counter()
            for r in requests:
                r.arrival = now
                self.waiting.append(r)
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
            self._drop_cancelled()
            self._admit()
            rows = [s for s in self.running if s.last_token is not None]
            if rows:
                self._decode(rows)
                self._flush()
            self._gauges()
        finally:
            self._flush()
            self._outbox = None

    def _drop_cancelled(self) -> None:
        with self._lock:
            kept = deque()
            for r in self.waiting:
                if r.cancelled:
                    self._emit(r, DoneEvent(r.index, "cancelled", len(r.prompt_ids), 0))
                else:
                    kept.append(r)
            self.waiting = kept
        for seq in list(self.running):
            if seq.request.cancelled:
                self._finish(seq, "cancelled")

    def _admit(self) -> None:
        admitted = []
        while self.free_slots and self.waiting and self._accepting_or_draining():
            with self._lock:
                request = self.waiting.popleft()
                slot = self.free_slots.pop(0)
            seq = Sequence(request, slot, self.tokenizer, self.device)
            self.running.append(seq)
            admitted.append(seq)
            if self.metrics:
                self._series("queue_time").observe(time.perf_counter() - request.arrival)
                self._series("prompt_tokens").inc(len(request.prompt_ids))
        for group in self._prefill_groups(admitted):
            self._prefill(group)
            self._flush()  # the group's first tokens go out now, not after the other admissions

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

    def _prefill_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Admissions prefilled together: similar lengths side by side, at most
        max_prefill_tokens padded tokens a group. Echo requests (every prompt position's
        logits) and empty generations go alone."""
        alone = [[s] for s in seqs if _scores_prompt(s.request)]
        groups, group = [], []
        for seq in sorted((s for s in seqs if not _scores_prompt(s.request)), key=lambda s: len(s.request.prompt_ids)):
            # sorted by length: this one is the longest so far, so it sets the padded width
            if group and (len(group) + 1) * len(seq.request.prompt_ids) > self.max_prefill_tokens:
                groups.append(group)
                group = []
            group.append(seq)
        return alone + groups + ([group] if group else [])

    def _accepting_or_draining(self) -> bool:
        return not self._stop

    def _prefill(self, seqs: list[Sequence]) -> None:
        try:
            self._prefill_rows(seqs)
        except Exception as e:  # a prefill can run again: it rewrites the slot from position 0
            self._retry_alone(seqs, e, self._prefill, "prefill")

    def _prefill_rows(self, seqs: list[Sequence]) -> None:
        prompts = []
        for seq in seqs:
            self.prompt_mask[seq.slot] = False
            self.output_counts[seq.slot] = 0
            prompts.append(torch.tensor(seq.request.prompt_ids, dtype=torch.long, device=self.device))
            self.prompt_mask[seq.slot, prompts[-1]] = True
        if len(seqs) > 1:  # a group: its prompts in one padded forward
            slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)
            logits, stats = prefill_batch(self.model, prompts, self.cache, slots, self._settle_steps(seqs))
            self._sample_and_emit(seqs, logits, stats)
            return
        # one request (and so every echo or scoring request: _prefill_groups keeps them alone)
        seq, prompt, r = seqs[0], prompts[0], seqs[0].request
        logits, stats = prefill(self.model, prompt, self.cache, seq.slot, r.settle_steps, all_logits=r.prompt_logprobs)
        prompt_tokens = None
        if r.prompt_logprobs:
            prompt_tokens = self._prompt_token_infos(r, logits)
            logits = logits[-1]
            stats = {k: v[-1] for k, v in stats.items()}
        if r.max_tokens == 0:  # echo scoring: the prompt's logprobs and nothing generated
            self._emit(r, TokenEvent(r.index, "", [], prompt_tokens))
            self._finish(seq, "length")
            return
        self._sample_and_emit([seq], logits.view(1, -1), {k: v.view(1, *v.shape) for k, v in stats.items()},
                              prompt_tokens=prompt_tokens)

    def _prompt_token_infos(self, r: Request, logits: torch.Tensor) -> list[dict]:
        """OpenAI's echo: the first prompt token has no logprob; each later one is scored by the
        prediction at the position before it."""
        lp = torch.log_softmax(logits[:, :self.vocab].float(), dim=-1)
        ids = r.prompt_ids
        infos = [{"id": ids[0], "text": self._token_text(ids[0]), "logprob": None, "top_logprobs": None}]
        k = r.logprobs or 0
        if k:
            top_v, top_i = torch.topk(lp[:-1], min(k, self.vocab), dim=-1)
        chosen = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist() if len(ids) > 1 else []
        for j, token in enumerate(ids[1:]):
            top = None
            if k:
                top = {self._token_text(int(t)): float(v) for t, v in zip(top_i[j].tolist(), top_v[j].tolist())}
            infos.append({"id": token, "text": self._token_text(token), "logprob": chosen[j], "top_logprobs": top})
        return infos

    def _decode(self, rows: list[Sequence]) -> None:
        tokens = torch.tensor([s.last_token for s in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([s.pos for s in rows], dtype=torch.long, device=self.device)
        slots = torch.tensor([s.slot for s in rows], dtype=torch.long, device=self.device)
        steps = self._settle_steps(rows)
        try:
            logits, stats = decode(self.model, tokens, pos, self.cache, slots, steps)
        except Exception as e:  # only the forward is retried: nothing else of the step has happened
            self._retry_alone(rows, e, self._decode, "decode")
            return
        self.steps_run += 1
        self.batch_size_counts[len(rows)] = self.batch_size_counts.get(len(rows), 0) + 1
        if self.metrics:
            self._series("batch_size").observe(len(rows))
            self._series("decode_steps").inc()
        for s in rows:
            s.pos += 1
        self._sample_and_emit(rows, logits, stats)

    def _settle_steps(self, rows: list[Sequence]):
        if self.model.model_type != "pc":
            return None
        default = self.model.config.default_settle_steps
        return torch.tensor([default if s.request.settle_steps is None else s.request.settle_steps for s in rows],
                            dtype=torch.long, device=self.device)

    def _sample_and_emit(self, rows: list[Sequence], logits: torch.Tensor, stats: dict, prompt_tokens=None) -> None:
        raw = logits[:, :self.vocab].float()
        slots = torch.tensor([s.slot for s in rows], dtype=torch.long, device=self.device)
        batch = BatchSampling.from_params([s.request.sampling for s in rows], self.device)
        x = apply_penalties(raw, self.prompt_mask[slots], self.output_counts[slots], batch) if batch.use_penalties else raw
        ed_rows = [i for i, s in enumerate(rows) if s.request.error_driven is not None]
        ed_info = {}
        if ed_rows:
            x, batch, ed_info = self._error_driven(rows, ed_rows, raw, x, batch)
        chosen = sample_from_logits(x, batch, [s.generator for s in rows])
        st = token_stats(raw, chosen)
        if ed_rows:
            idx = torch.tensor(ed_rows, device=self.device)
            ed = [rows[i].request.error_driven for i in ed_rows]
            new_mu = update_mu(ed_info["mu"], x[idx], batch.temperature[idx], chosen[idx],
                               torch.tensor([e.tau for e in ed], device=self.device),
                               torch.tensor([e.eta for e in ed], device=self.device))
            for j, i in enumerate(ed_rows):
                rows[i].mu = float(new_mu[j])
        self.output_counts[slots, chosen] += 1
        k = max((s.request.logprobs or 0) for s in rows)
        top_v = top_i = None
        if k:
            top_v, top_i = top_logprobs(raw, k)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        chosen_l = chosen.tolist()
        host = {name: v.tolist() for name, v in st.items()}
        host_stats = {name: v.float().tolist() for name, v in stats.items()}
        now = time.perf_counter()
        for i, seq in enumerate(rows):
            try:
                if self.fault_injector is not None:
                    self.fault_injector(seq)
                info = self._token_info(seq, i, chosen_l[i], host, host_stats, ed_info, top_v, top_i)
                self._advance(seq, chosen_l[i], info, now, prompt_tokens)
            except Exception as e:
                log.exception("generation failed for one request of %s", self.name)
                self._fail(seq, e)

    def _error_driven(self, rows, ed_rows, raw, x, batch):
        """Per-row temperature from the prediction's precision, then mirostat v2's truncation."""
        idx = torch.tensor(ed_rows, device=self.device)
        ed = [rows[i].request.error_driven for i in ed_rows]
        lp = torch.log_softmax(raw[idx], dim=-1)
        entropy = -(lp.exp() * lp).nan_to_num().sum(-1) / math.log(2)
        for j, i in enumerate(ed_rows):
            if rows[i].log_mean is None:  # no m0 stored: the first prediction sets the reference
                rows[i].log_mean = math.log(max(float(entropy[j]), 1e-6))
        log_mean = torch.tensor([rows[i].log_mean for i in ed_rows], device=self.device)
        lam = torch.tensor([e.lam for e in ed], device=self.device)
        precision, new_mean = error_driven_precision(entropy, log_mean, lam)
        temperature = torch.tensor([e.base_temperature for e in ed], device=self.device) / precision
        mu = torch.tensor([rows[i].mu for i in ed_rows], device=self.device)
        filtered, n_kept = surprise_filter(x[idx], temperature, mu)
        x = x.clone()
        x[idx] = filtered
        batch.temperature = batch.temperature.clone()
        batch.temperature[idx] = temperature
        batch.all_greedy = False
        for j, i in enumerate(ed_rows):
            rows[i].log_mean = float(new_mean[j])
        host = {"temperature": temperature.tolist(), "precision": precision.tolist(), "mu": mu.tolist(),
                "n_kept": n_kept.tolist()}
        return x, batch, {"mu": mu, "rows": {i: j for j, i in enumerate(ed_rows)}, "host": host}

    def _token_info(self, seq, i, token, host, host_stats, ed_info, top_v, top_i) -> dict:
        r = seq.request
        info = {"id": token, "text": None, "logprob": host["logprob"][i], "top_logprobs": None, "uncertainty": None}
        if r.logprobs:
            info["top_logprobs"] = {self._token_text(t): v for t, v in zip(top_i[i][:r.logprobs], top_v[i][:r.logprobs])}
        u = {"logprob": host["logprob"][i], "surprise": host["surprise"][i], "entropy": host["entropy"][i],
             "varentropy": host["varentropy"][i]}
        if host_stats:
            u.update({k: host_stats[k][i] for k in ("energy0", "energy", "kl_settle")})
            u["steps"] = int(host_stats["steps"][i])
            u["rejected"] = int(host_stats["rejected"][i])
            u["err_up"] = host_stats["err_up"][i]
            u["err_down"] = host_stats["err_down"][i]
        if ed_info and i in ed_info["rows"]:
            j = ed_info["rows"][i]
            u.update({k: ed_info["host"][k][j] for k in ("temperature", "precision", "mu")})
            u["n_kept"] = int(ed_info["host"]["n_kept"][j])
        info["uncertainty"] = _finite(u)
        if self.metrics:
            self._series("entropy").observe(u["entropy"])
            self._series("surprise").observe(min(u["surprise"], 1e6))
            if host_stats:
                self._series("settle_steps").observe(u["steps"])
                self._series("energy").observe(u["energy"])
        return info

    def _token_text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def _advance(self, seq: Sequence, token: int, info: dict, now: float, prompt_tokens=None) -> None:
        """Adds the sampled token to the sequence, releases text and checks stop conditions."""
        r = seq.request
        if self.metrics:
            if seq.first_token_at is None:
                self._series("ttft").observe(now - r.arrival)
            else:
                self._series("itl").observe(now - seq.last_token_at)
            self._series("generation_tokens").inc()
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        seq.generated += 1
        if r.stop_at_eos and self.tokenizer.eos_id is not None and token == self.tokenizer.eos_id:
            # the EOS token ends the text and is not part of it
            seq.held += seq.detok.flush()
            self._release(seq, prompt_tokens, final=True)
            self._finish(seq, "stop")
            return
        info["text"] = self._token_text(token)
        piece = seq.detok.push(token)
        seq.held += piece
        seq.held_tokens.append({**info, "_len": len(piece)})
        finish = None
        if r.stop:
            cut = _first_stop(seq.held, r.stop)
            if cut is not None:
                seq.held = seq.held[:cut]
                finish = "stop"
        if finish is None and seq.generated >= r.max_tokens:
            finish = "length"
        if finish is None and seq.pos >= self.block_size:
            finish = "length"  # the context is full
        if finish:
            if finish == "length":
                seq.held += seq.detok.flush()
            self._release(seq, prompt_tokens, final=True)
            self._finish(seq, finish)
            return
        seq.last_token = token
        self._release(seq, prompt_tokens, final=False)

    def _release(self, seq: Sequence, prompt_tokens, final: bool) -> None:
        """Emits held text that can no longer be the start of a stop string, with the tokens
        whose text is then wholly out (at the end, every token whose text began before the cut)."""
        r = seq.request
        keep = 0 if final else _stop_prefix_len(seq.held, r.stop)
        text = seq.held[:len(seq.held) - keep]
        seq.held = seq.held[len(text):]
        seq.released_chars += len(text)
        released = []
        if final:
            start = 0
            for t in seq.held_tokens:
                if start < seq.released_chars or (t["_len"] == 0 and start <= seq.released_chars):
                    released.append(t)
                start += t["_len"]
            seq.held_tokens = []
        else:
            while seq.held_tokens and seq.held_tokens[0]["_len"] <= seq.released_chars:
                t = seq.held_tokens.pop(0)
                seq.released_chars -= t["_len"]
                released.append(t)
        released = [{k: v for k, v in t.items() if k != "_len"} for t in released]
        if text or released or prompt_tokens is not None:
            self._stream(seq, TokenEvent(r.index, text, released, prompt_tokens), final)

    def _stream(self, seq: Sequence, event: TokenEvent, final: bool) -> None:
        """Emits released tokens, or keeps them for the stream interval: the first tokens and
        the last ones go at once, the others once stream_interval tokens have come since."""
        if seq.unsent is not None:
            held = seq.unsent
            event = TokenEvent(event.index, held.text + event.text, held.tokens + event.tokens,
                               held.prompt_tokens if held.prompt_tokens is not None else event.prompt_tokens)
            seq.unsent = None
        if final or seq.sent_at == 0 or seq.generated - seq.sent_at >= self.stream_interval:
            seq.sent_at = seq.generated
            self._emit(seq.request, event)
        else:
            seq.unsent = event

    def _retire(self, seq: Sequence) -> None:
        """A sequence leaves the batch: tokens still held for the stream interval go out (a cancel,
        abort or failure between intervals loses nothing made) and its slot is free at once."""
        if seq.unsent is not None:
            self._emit(seq.request, seq.unsent)
            seq.unsent = None
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()

    def _finish(self, seq: Sequence, reason: str) -> None:
        r = seq.request
        self._retire(seq)
        if self.metrics:
            self.metrics.requests.labels(model=self.name, finish_reason=reason).inc()
            if seq.first_token_at is not None:
                self._series("e2e").observe(time.perf_counter() - r.arrival)
        self._emit(r, DoneEvent(r.index, reason, len(r.prompt_ids), seq.generated))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        self._retire(seq)
        if self.metrics:
            self.metrics.errors.labels(model=self.name, type="generation_error").inc()
        self._emit(seq.request, ErrorEvent(seq.request.index, f"generation failed: {type(error).__name__}: {error}"))

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


def check_admission(name: str, accepting: bool, alive: bool, waiting: int, free_slots: int, incoming: int,
                    max_queue: int) -> None:
    """What submit answers when requests cannot all be queued: EngineUnavailable (503) or
    QueueFull (429, at once). Free slots count too: a burst into an idle engine is admitted."""
    if not accepting or not alive:
        raise EngineUnavailable(f"model {name!r} is " + ("shutting down" if not accepting else "not running"))
    if waiting + incoming > max_queue + free_slots:
        raise QueueFull(f"model {name!r} has {waiting} requests waiting (queue limit {max_queue}); try again later")


def _scores_prompt(r: Request) -> bool:
    """Echo with logprobs, or max_tokens 0: the prompt's every position is scored, alone."""
    return r.prompt_logprobs or r.max_tokens == 0


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


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _finite(values: dict) -> dict:
    """JSON has no inf/NaN: clamp what a -inf logit or an empty distribution could produce."""
    out = {}
    for k, v in values.items():
        if isinstance(v, list):
            out[k] = [_finite({"x": x})["x"] for x in v]
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = 0.0 if math.isnan(v) else math.copysign(1e30, v)
        else:
            out[k] = v
    return out
