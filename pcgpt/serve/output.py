"""The output processor: from sampled token ids to the events a request's response is built from.

Incremental detokenization, stop strings (text that may be the start of one is held back until
it cannot be), EOS and length finishes, the stream interval, and per-token dicts (logprobs, top
alternatives, uncertainty) built only for the requests that asked for logprobs or uncertainty:
the others get their text alone. It also observes the per-token metrics.
"""

import math
import time

import torch

from pcgpt.model.tokenizer import IncrementalDetokenizer
from pcgpt.serve.request import Request, TokenEvent
from pcgpt.serve.runner import StepResult

PC_STATS = ("energy0", "energy", "kl_settle")


class OutputState:
    """What the output processor keeps of one running sequence."""

    def __init__(self, tokenizer):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.held = ""  # text not yet released: it might be the start of a stop string
        self.held_tokens: list[dict] = []  # token dicts not yet released with their text
        self.held_lengths: list[int] = []  # the characters each held token added
        self.released_chars = 0  # characters of the held tokens' text already released
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.unsent: TokenEvent | None = None  # released tokens waiting for the stream interval
        self.sent_at = 0  # tokens generated when text last went out (0: nothing yet)


class OutputProcessor:
    def __init__(self, tokenizer, block_size: int, stream_interval: int, emit, series=None):
        self.tokenizer = tokenizer
        self.block_size = block_size
        # a running request's tokens go out every stream_interval tokens (the first at once, the
        # rest with the finish): fewer, larger events and stream chunks, less HTTP work per token
        self.stream_interval = max(1, stream_interval)
        self.emit = emit  # (request, event)
        self.series = series  # name -> this model's metrics child, or None without metrics

    def start(self, seq) -> None:
        seq.output = OutputState(self.tokenizer)

    def advance(self, seq, token: int, result: StepResult, i: int, now: float, prompt_tokens=None) -> str | None:
        """Adds row i's sampled token to the sequence (seq.pos is already where that token is
        fed), releases text and checks the stop conditions; returns the finish reason if the
        sequence is done."""
        r, out = seq.request, seq.output
        info = self._token_info(r, token, result, i) if r.wants_token_info else None
        if self.series:
            self._observe(result, i, now - (r.arrival if out.first_token_at is None else out.last_token_at),
                          out.first_token_at is None)
        if out.first_token_at is None:
            out.first_token_at = now
        out.last_token_at = now
        seq.generated += 1
        if r.stop_at_eos and self.tokenizer.eos_id is not None and token == self.tokenizer.eos_id:
            # the EOS token ends the text and is not part of it
            out.held += out.detok.flush()
            self._release(seq, prompt_tokens, final=True)
            return "stop"
        piece = out.detok.push(token)
        out.held += piece
        if info is not None:
            info["text"] = self.token_text(token)
            out.held_tokens.append(info)
            out.held_lengths.append(len(piece))
        finish = None
        if r.stop:
            cut = _first_stop(out.held, r.stop)
            if cut is not None:
                out.held = out.held[:cut]
                finish = "stop"
        if finish is None and (seq.generated >= r.max_tokens or seq.pos >= self.block_size):
            finish = "length"  # max_tokens, or the context is full
        if finish == "length":
            out.held += out.detok.flush()
        self._release(seq, prompt_tokens, final=finish is not None)
        return finish

    def take_unsent(self, seq):
        """Tokens held for the stream interval, when the sequence leaves the batch (a cancel,
        abort or failure between intervals loses nothing made)."""
        out = seq.output
        if out is None or out.unsent is None:
            return None
        event, out.unsent = out.unsent, None
        return event

    def token_text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def prompt_token_infos(self, r: Request, logits: torch.Tensor, vocab: int) -> list[dict]:
        """OpenAI's echo: the first prompt token has no logprob; each later one is scored by the
        prediction at the position before it."""
        lp = torch.log_softmax(logits[:, :vocab].float(), dim=-1)
        ids = r.prompt_ids
        infos = [{"id": ids[0], "text": self.token_text(ids[0]), "logprob": None, "top_logprobs": None}]
        k = r.logprobs or 0
        if k:
            top_v, top_i = torch.topk(lp[:-1], min(k, vocab), dim=-1)
        chosen = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist() if len(ids) > 1 else []
        for j, token in enumerate(ids[1:]):
            top = None
            if k:
                top = {self.token_text(int(t)): float(v) for t, v in zip(top_i[j].tolist(), top_v[j].tolist())}
            infos.append({"id": token, "text": self.token_text(token), "logprob": chosen[j], "top_logprobs": top})
        return infos

    # --- internals -------------------------------------------------------------------------------

    def _token_info(self, r: Request, token: int, result: StepResult, i: int) -> dict:
        logprob = result.get("logprob", i)
        info = {"id": token, "text": None, "logprob": logprob, "top_logprobs": None, "uncertainty": None}
        if r.logprobs:
            ids, values = result.get("top_ids", i)[:r.logprobs], result.get("top_values", i)[:r.logprobs]
            info["top_logprobs"] = {self.token_text(int(t)): v for t, v in zip(ids, values)}
        if r.uncertainty:
            u = {"logprob": logprob, "surprise": result.get("surprise", i), "entropy": result.get("entropy", i),
                 "varentropy": result.get("varentropy", i)}
            if "energy" in result.layout:
                u.update({k: result.get(k, i) for k in PC_STATS})
                u["steps"] = int(result.get("steps", i))
                u["rejected"] = int(result.get("rejected", i))
                u["err_up"] = result.get("err_up", i)
                u["err_down"] = result.get("err_down", i)
            if r.error_driven is not None:
                u.update({k: result.get(k, i) for k in ("temperature", "precision", "mu")})
                u["n_kept"] = int(result.get("n_kept", i))
            info["uncertainty"] = _finite(u)
        return info

    def _observe(self, result: StepResult, i: int, latency: float, first: bool) -> None:
        series = self.series
        series("ttft" if first else "itl").observe(latency)
        series("generation_tokens").inc()
        series("entropy").observe(result.get("entropy", i))
        series("surprise").observe(min(result.get("surprise", i), 1e6))
        if "energy" in result.layout:
            series("settle_steps").observe(result.get("steps", i))
            series("energy").observe(result.get("energy", i))

    def _release(self, seq, prompt_tokens, final: bool) -> None:
        """Emits held text that can no longer be the start of a stop string, with the tokens
        whose text is then wholly out (at the end, every token whose text began before the cut)."""
        r, out = seq.request, seq.output
        keep = 0 if final else _stop_prefix_len(out.held, r.stop)
        text = out.held[:len(out.held) - keep]
        out.held = out.held[len(text):]
        out.released_chars += len(text)
        released = []
        if final:
            start = 0
            for t, n in zip(out.held_tokens, out.held_lengths):
                if start < out.released_chars or (n == 0 and start <= out.released_chars):
                    released.append(t)
                start += n
            out.held_tokens, out.held_lengths = [], []
        else:
            while out.held_tokens and out.held_lengths[0] <= out.released_chars:
                out.released_chars -= out.held_lengths.pop(0)
                released.append(out.held_tokens.pop(0))
        if text or released or prompt_tokens is not None:
            self._stream(seq, TokenEvent(r.index, text, released, prompt_tokens), final)

    def _stream(self, seq, event: TokenEvent, final: bool) -> None:
        """Emits released tokens, or keeps them for the stream interval: the first tokens and
        the last ones go at once, the others once stream_interval tokens have come since."""
        out = seq.output
        if out.unsent is not None:
            held = out.unsent
            event = TokenEvent(event.index, held.text + event.text, held.tokens + event.tokens,
                               held.prompt_tokens if held.prompt_tokens is not None else event.prompt_tokens)
            out.unsent = None
        if final or out.sent_at == 0 or seq.generated - out.sent_at >= self.stream_interval:
            out.sent_at = seq.generated
            self.emit(seq.request, event)
        else:
            out.unsent = event


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
