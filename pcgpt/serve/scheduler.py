"""The scheduler: which requests wait, which run in which cache slot, what each step runs.

A bounded waiting queue; admission into free slots, lowest slot first, so that running
sequences stay packed at the low slots and the decode batch (rows = slots [0, bucket)) stays
small; cancellation; a finished sequence's slot is free at once. It knows only the host side of
a sequence (its slot, its position): the model runner holds the device side.
"""

import threading
import time
from collections import deque

from pcgpt.model.generate import kv_len_bucket
from pcgpt.serve.request import Request

# admissions of one step prefill together, up to this many padded prompt tokens a forward: bounds
# the activations and attention scores a burst of long prompts allocates at once
MAX_PREFILL_TOKENS = 4096


class QueueFull(Exception):
    """The waiting queue cannot take the request: answered with 429 at once."""


class EngineUnavailable(Exception):
    """The engine is shutting down or has died: answered with 503."""


class Sequence:
    """A running request: its slot and the position of the next token it feeds."""

    def __init__(self, request: Request, slot: int):
        self.request = request
        self.slot = slot
        self.pos = len(request.prompt_ids)
        self.generated = 0
        self.output = None  # the output processor's state of this sequence


class Scheduler:
    def __init__(self, name: str, max_batch_size: int, max_queue: int, max_prefill_tokens: int = MAX_PREFILL_TOKENS):
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch_size))
        self.lock = threading.Lock()  # submit (HTTP side) against the engine loop

    def submit(self, requests: list[Request], accepting: bool, alive: bool) -> None:
        """Queues every request or none: a full queue raises QueueFull at once."""
        with self.lock:
            check_admission(self.name, accepting, alive, len(self.waiting), len(self.free_slots), len(requests),
                            self.max_queue)
            now = time.perf_counter()
            for r in requests:
                r.arrival = now
                self.waiting.append(r)

    def take_cancelled(self) -> tuple[list[Request], list[Sequence]]:
        """Removes cancelled waiting requests; returns them and the cancelled running sequences
        (which the engine finishes, freeing their slots)."""
        with self.lock:
            dropped = [r for r in self.waiting if r.cancelled]
            if dropped:
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
        return dropped, [s for s in self.running if s.request.cancelled]

    def admit(self) -> list[Sequence]:
        """Waiting requests into free slots (lowest first), as many as fit."""
        admitted = []
        with self.lock:
            while self.free_slots and self.waiting:
                seq = Sequence(self.waiting.popleft(), self.free_slots.pop(0))
                self.running.append(seq)
                admitted.append(seq)
        return admitted

    def free(self, seq: Sequence) -> bool:
        """The sequence leaves the batch and its slot is free at once; False if it had left already."""
        if seq not in self.running:
            return False
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        self.free_slots.sort()
        return True

    def prefill_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Admissions prefilled together: similar lengths side by side, at most
        max_prefill_tokens padded tokens a group. Echo requests (every prompt position's
        logits) and empty generations go alone."""
        alone = [[s] for s in seqs if scores_prompt(s.request)]
        groups, group = [], []
        for seq in sorted((s for s in seqs if not scores_prompt(s.request)), key=lambda s: len(s.request.prompt_ids)):
            # sorted by length: this one is the longest so far, so it sets the padded width
            if group and (len(group) + 1) * len(seq.request.prompt_ids) > self.max_prefill_tokens:
                groups.append(group)
                group = []
            group.append(seq)
        return alone + groups + ([group] if group else [])

    def decode_batch(self, max_len: int) -> tuple[int, int]:
        """(rows, kv_len) of the next decode step: rows are slots [0, rows), rows the smallest
        power of two past the highest running slot (at most max_batch_size; free slots inside
        are padding), kv_len the attended window of the furthest running position."""
        rows = decode_rows(max(s.slot for s in self.running) + 1, self.max_batch_size)
        return rows, kv_len_bucket(max(s.pos for s in self.running) + 1, max_len)


def decode_rows(needed: int, max_batch_size: int) -> int:
    """The decode batch's row count for `needed` rows: the next power of two, capped (a few batch
    shapes, so that compiled or captured steps are reused)."""
    return min(max_batch_size, 1 << (needed - 1).bit_length())


def check_admission(name: str, accepting: bool, alive: bool, waiting: int, free_slots: int, incoming: int,
                    max_queue: int) -> None:
    """What submit answers when requests cannot all be queued: EngineUnavailable (503) or
    QueueFull (429, at once). Free slots count too: a burst into an idle engine is admitted."""
    if not accepting or not alive:
        raise EngineUnavailable(f"model {name!r} is " + ("shutting down" if not accepting else "not running"))
    if waiting + incoming > max_queue + free_slots:
        raise QueueFull(f"model {name!r} has {waiting} requests waiting (queue limit {max_queue}); try again later")


def scores_prompt(r: Request) -> bool:
    """Echo with logprobs, or max_tokens 0: the prompt's every position is scored, alone."""
    return r.prompt_logprobs or r.max_tokens == 0
