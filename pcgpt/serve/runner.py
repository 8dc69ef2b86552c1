"""The model runner: the KV cache and every per-slot tensor a decode step needs, kept on the device.

Per cache slot: the last sampled token, the position it is fed at, the PC settle steps, the
sampling parameters, the penalties' prompt mask and output counts, and the error-driven
sampler's state (model/sampling.ErrorDrivenState). They are written when a request is admitted,
in one packed host-to-device copy for the whole admission (slots, positions, parameters and the
prompts' tokens), and advanced on the device by every step (positions += 1 for running rows,
last tokens = the sampled ones). A steady decode step therefore builds no tensor from host data
and reads back exactly one tensor: the sampled tokens with the statistics the batch's requests
(or the metrics) need, packed and copied into one host buffer (pinned on CUDA).

Row b of a decode batch is cache slot b (the contract of model/generate.decode_step); rows of
free slots are padding, fed token 0 at position 0 and settle 0, and their results are ignored.
What the host knows without asking the device stays on the host: which slots run, each slot's
SamplingParams (to skip filters no row uses) and seeded generators.
"""

from dataclasses import dataclass

import torch

from pcgpt.model.generate import decode_step, prefill, prefill_batch
from pcgpt.model.sampling import (BatchSampling, ErrorDrivenState, apply_penalties, make_generator, sample_from_logits,
                                  token_stats, top_logprobs, write_rows)
from pcgpt.serve.compiled_step import CompiledDecode, compile_supported
from pcgpt.serve.cuda_graphs import DecodeGraphs
from pcgpt.serve.request import Request

# columns of an admission's packed rows: where each per-slot value lands
SLOT, POSITION, SETTLE, TOP_K = 0, 1, 2, 3
PARAMS = slice(4, 10)  # temperature, top_p, min_p, repetition, presence, frequency penalties
ERROR_DRIVEN = slice(10, 10 + len(ErrorDrivenState.FIELDS))
ADMISSION_COLUMNS = ERROR_DRIVEN.stop
TOKEN_STATS = ("logprob", "surprise", "entropy", "varentropy")
ERROR_DRIVEN_STATS = ("temperature", "precision", "mu", "n_kept")


@dataclass
class StepResult:
    """One step's sampled tokens and statistics, on the host: row i of `rows` is [token, then
    the columns that `layout` names: name -> (first column, width)]."""

    rows: list[list[float]]
    layout: dict[str, tuple[int, int]]

    def token(self, i: int) -> int:
        return int(self.rows[i][0])

    def get(self, name: str, i: int):
        """Row i's value of a statistic: a float, or a list for the wider ones; None if not sent."""
        at = self.layout.get(name)
        if at is None:
            return None
        start, width = at
        return self.rows[i][start] if width == 0 else self.rows[i][start:start + width]


class ModelRunner:
    def __init__(self, model, vocab: int, n_slots: int, stats_every_step: bool = False, cuda_graphs: bool = False,
                 compile_decode: bool = False):
        self.model = model
        self.vocab = vocab  # the tokenizer's: logits past it (nanoGPT pads 50257 to 50304) are dropped
        self.device = model.lm_head.weight.device
        self.is_pc = model.model_type == "pc"
        self.default_settle = model.config.default_settle_steps if self.is_pc else 0
        # the metrics observe each token's entropy and surprise (and PC settling): their statistics
        # then come back every step, whether or not a request asked
        self.stats_every_step = stats_every_step
        self.cache = model.new_cache(n_slots, max_len=model.config.block_size)
        self.max_len = self.cache.max_len
        n, dev = n_slots, self.device
        self.last_tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.settle = torch.zeros(n, dtype=torch.long, device=dev)
        self.active = torch.zeros(n, dtype=torch.long, device=dev)  # 1 for a running slot: its position advances
        self.top_k = torch.zeros(n, dtype=torch.long, device=dev)
        self.params = torch.zeros(n, PARAMS.stop - PARAMS.start, dtype=torch.float32, device=dev)
        self.prompt_mask = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
        self.output_counts = torch.zeros(n, vocab, dtype=torch.long, device=dev)
        self.error_driven = ErrorDrivenState(n, dev)
        # the host's knowledge per slot (None: free)
        self.requests: list[Request | None] = [None] * n
        self.generators: list = [None] * n
        self.settle_host = [0] * n
        # adaptive settling ("auto"): per slot the entropy threshold (bits) and the early-stop
        # fraction; 0 for the others, which then settle as asked (an entropy is never below 0)
        self.settle_threshold = torch.zeros(n, dtype=torch.float32, device=dev)
        self.settle_early_stop = torch.zeros(n, dtype=torch.float32, device=dev)
        self._plans: dict = {}  # what a step over given rows samples and sends back; reset on admission/release
        self._admission = None  # the last admission's packed rows on the device, and each slot's row there
        self._prompts: dict[int, torch.Tensor] = {}  # slot -> its prompt (a view of the admission's copy)
        self._host = torch.empty(0)
        # CUDA: the decode step replayed from graphs captured here, at start (serve/cuda_graphs.py)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, self.cache, self.last_tokens, self.positions,
                                       self.settle if self.is_pc else None)
        # CPU: the batch-1 step compiled here, at start (serve/compiled_step.py); None where it is
        # off or does not apply (then compile_skipped says why)
        self.compiled = self.compile_skipped = None
        if compile_decode:
            self.compile_skipped = compile_supported(model)
            if self.compile_skipped is None:
                self.compiled = CompiledDecode(model, self.cache)

    # --- admission and release -------------------------------------------------------------------

    def settle_of(self, r: Request) -> int:
        if r.settle_auto and self.is_pc:
            return self.model.config.auto_settle_steps
        return self.default_settle if r.settle_steps is None else r.settle_steps

    def admit_adaptive(self, seqs: list) -> None:
        """The adaptive-settling rows of newly admitted sequences (one copy, only when any asks)."""
        auto = [s for s in seqs if s.request.settle_auto and self.is_pc]
        if not auto:
            return
        config = self.model.config
        values = [[s.slot, config.auto_threshold if s.request.settle_threshold is None else s.request.settle_threshold,
                   config.auto_early_stop] for s in auto]
        rows = torch.tensor(values, dtype=torch.float64).to(self.device)
        slots = rows[:, 0].long()
        self.settle_threshold.index_copy_(0, slots, rows[:, 1].float())
        self.settle_early_stop.index_copy_(0, slots, rows[:, 2].float())

    def is_adaptive(self, slot: int) -> bool:
        r = self.requests[slot]
        return self.is_pc and r is not None and r.settle_auto

    def adaptive(self, slots, rows):
        """decode_step's `adaptive` for the batch rows `rows` (slots `slots` on the host): None
        unless one of them settles adaptively."""
        if not any(self.is_adaptive(s) for s in slots):
            return None
        return {"settle_threshold": self.settle_threshold[rows], "early_stop": self.settle_early_stop[rows]}

    def admit(self, seqs: list) -> None:
        """Writes the slots of newly admitted sequences: one packed copy to the device (float64:
        token ids and positions stay exact; parameters become float32 there). Prefill groups
        must be runs of consecutive sequences of `seqs` (prefill_group slices this copy)."""
        meta, tokens = [], []
        for s in seqs:
            r, p = s.request, s.request.sampling
            meta += [s.slot, len(r.prompt_ids), self.settle_of(r), p.top_k, p.temperature, p.top_p, p.min_p,
                     p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                     *ErrorDrivenState.initial_row(r.error_driven)]
            tokens += r.prompt_ids
            self.requests[s.slot] = r
            self.generators[s.slot] = make_generator(p.seed, self.device)
            self.settle_host[s.slot] = self.settle_of(r)
        packed = torch.tensor(meta + tokens, dtype=torch.float64).to(self.device)
        rows = packed[:len(meta)].view(len(seqs), ADMISSION_COLUMNS)
        slots = rows[:, SLOT].long()
        settle = rows[:, SETTLE].long()
        self.positions.index_copy_(0, slots, rows[:, POSITION].long())
        self.settle.index_copy_(0, slots, settle)
        self.top_k.index_copy_(0, slots, rows[:, TOP_K].long())
        self.params.index_copy_(0, slots, rows[:, PARAMS].float())
        self.error_driven.admit(slots, rows[:, ERROR_DRIVEN])
        self.active.index_fill_(0, slots, 1)
        prompts = packed[len(meta):].long().split([len(s.request.prompt_ids) for s in seqs])
        for s, prompt in zip(seqs, prompts):
            self.prompt_mask[s.slot].zero_()
            self.prompt_mask[s.slot].index_fill_(0, prompt, True)
            self.output_counts[s.slot].zero_()
            self._prompts[s.slot] = prompt
        self._admission = (slots, settle, {s.slot: i for i, s in enumerate(seqs)})
        self.admit_adaptive(seqs)
        self._plans.clear()

    def release(self, slot: int) -> None:
        """A slot is free: it becomes a padding row (token 0 at position 0, no settling)."""
        if self.is_adaptive(slot):  # a later request in this slot must not inherit its threshold
            self.settle_threshold[slot].zero_()
            self.settle_early_stop[slot].zero_()
        self.requests[slot] = self.generators[slot] = None
        self._prompts.pop(slot, None)
        for t in (self.active, self.positions, self.settle, self.last_tokens):
            t[slot].zero_()
        self._plans.clear()

    # --- forwards --------------------------------------------------------------------------------

    def prefill_group(self, seqs: list) -> StepResult:
        """Several admissions' prompts in one padded forward, then their first tokens."""
        slots, settle, row_of = self._admission
        first = row_of[seqs[0].slot]
        assert [row_of[s.slot] for s in seqs] == list(range(first, first + len(seqs))), "not a run of the admission"
        rows = slots[first:first + len(seqs)]
        logits, stats = prefill_batch(self.model, [self._prompts[s.slot] for s in seqs], self.cache, rows,
                                      settle[first:first + len(seqs)] if self.is_pc else None,
                                      adaptive=self.adaptive([s.slot for s in seqs], rows))
        return self.sample(logits, rows, [s.slot for s in seqs], stats)

    def prefill_one(self, seq, all_logits: bool = False):
        """One prompt into its slot: (logits (V,), or (S, V) with all_logits; stats)."""
        return prefill(self.model, self._prompts[seq.slot], self.cache, seq.slot,
                       self.settle_host[seq.slot] if self.is_pc else None, all_logits=all_logits,
                       adaptive=self.adaptive([seq.slot], slice(seq.slot, seq.slot + 1)))

    def decode(self, n_rows: int, kv_len: int) -> StepResult:
        """One decode step over slots [0, n_rows): the running rows' next tokens."""
        rows = slice(0, n_rows)
        plan = self._plan(rows, range(n_rows))
        max_settle = plan["max_settle"]
        adaptive = self.adaptive(range(n_rows), rows) if plan["adaptive"] else None
        if self.graphs is not None and not max_settle and adaptive is None:  # settling is data-dependent: eager
            logits, stats = self.graphs.replay(n_rows)
        elif self.compiled is not None and n_rows == 1:  # it pays at one row only
            logits, stats = self.compiled(self.last_tokens[rows], self.positions[rows], kv_len)
        else:
            logits, stats = decode_step(self.model, self.last_tokens[rows], self.positions[rows], self.cache,
                                        self.settle[rows] if self.is_pc else None, kv_len=kv_len,
                                        max_settle_steps=max_settle,
                                        adaptive=adaptive)
        result = self.sample(logits, rows, range(n_rows), stats)
        self.positions[rows].add_(self.active[rows])
        return result

    def decode_alone(self, slot: int) -> StepResult:
        """The decode step of one slot after a batched step failed. The rows below it are fed
        only what cannot harm them: token 0 at one past their position (clamped to the cache),
        which their own next step overwrites before reading, so a bad row's data reaches no one
        else's forward and a neighbour's K/V already written this step stays as it is."""
        n = slot + 1
        alone = torch.arange(n, device=self.device) == slot
        tokens = torch.where(alone, self.last_tokens[:n], 0)
        pos = torch.where(alone, self.positions[:n], (self.positions[:n] + self.active[:n]).clamp(max=self.max_len - 1))
        settle = torch.where(alone, self.settle[:n], 0) if self.is_pc else None
        logits, stats = decode_step(self.model, tokens, pos, self.cache, settle, kv_len=self.max_len,
                                    max_settle_steps=self.settle_host[slot] if self.is_pc else None,
                                    adaptive=self.adaptive([slot], slice(0, n)))
        rows = slice(slot, n)
        result = self.sample(logits[rows], rows, [slot], {k: v[rows] for k, v in stats.items()})
        self.positions[rows].add_(1)
        return result

    # --- sampling --------------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, rows, slots, stats: dict) -> StepResult:
        """Next tokens for the batch rows `rows` (a slice of the slots, or an index tensor; `slots`
        the same on the host) with each slot's parameters, the slots' state advanced, and one copy
        of the tokens and wanted statistics to the host."""
        plan = self._plan(rows, slots)
        raw = logits[:, :self.vocab].float()
        p = self.params[rows]
        batch = BatchSampling(temperature=p[:, 0], top_k=self.top_k[rows], top_p=p[:, 1], min_p=p[:, 2],
                              repetition_penalty=p[:, 3], presence_penalty=p[:, 4], frequency_penalty=p[:, 5],
                              **plan["hints"])
        x = apply_penalties(raw, self.prompt_mask[rows], self.output_counts[rows], batch) if batch.use_penalties else raw
        ed = None
        if plan["error_driven"]:
            x, batch.temperature, ed = self.error_driven.apply(raw, x, batch.temperature, rows)
        chosen = sample_from_logits(x, batch, [self.generators[s] for s in slots])
        if ed is not None:
            self.error_driven.update(ed, x, batch.temperature, chosen, rows)
        write_rows(self.last_tokens, rows, chosen)
        counted = self.active[rows].view(-1, 1)
        if isinstance(rows, slice):
            self.output_counts[rows].scatter_add_(1, chosen.view(-1, 1), counted)
        else:
            self.output_counts.index_put_((rows, chosen), counted.view(-1), accumulate=True)
        return self._to_host(plan, raw, chosen, stats, ed)

    def _plan(self, rows, slots) -> dict:
        """What the requests of these rows need (host knowledge, cached until the slots change):
        which filters run, and which statistics come back."""
        key = (rows.start, rows.stop) if isinstance(rows, slice) else tuple(slots)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        running = [self.requests[s] for s in slots if self.requests[s] is not None]
        params = [r.sampling for r in running]
        error_driven = any(r.error_driven is not None for r in running)
        uncertainty = any(r.uncertainty for r in running)
        plan = self._plans[key] = {
            "hints": dict(use_top_k=any(p.top_k > 0 for p in params), use_top_p=any(p.top_p < 1.0 for p in params),
                          use_min_p=any(p.min_p > 0.0 for p in params),
                          use_penalties=any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                                            or p.frequency_penalty != 0.0 for p in params),
                          all_greedy=bool(params) and not error_driven and all(p.temperature == 0.0 for p in params)),
            "error_driven": error_driven,
            "token_stats": self.stats_every_step or any(r.wants_token_info for r in running),
            "top_logprobs": max((r.logprobs or 0 for r in running), default=0),
            "model_stats": self.stats_every_step or uncertainty,
            "error_driven_stats": error_driven and uncertainty,
            # PC: the most settle steps a row asks for (0: the unsettled path, without a device read)
            "max_settle": max((self.settle_of(r) for r in running), default=0) if self.is_pc else None,
            "adaptive": self.is_pc and any(r.settle_auto for r in running),
        }
        return plan

    def _to_host(self, plan: dict, raw, chosen, stats: dict, ed: dict | None) -> StepResult:
        B = chosen.shape[0]
        columns, layout = [chosen.float().view(B, 1)], {}
        width = 1

        def add(name, value):
            nonlocal width
            value = value.float().reshape(B, -1)
            columns.append(value)
            # width 0: a scalar per row; otherwise a list (the per-layer stats, top logprobs)
            wide = value.dim() > 1 and name in ("err_up", "err_down", "top_values", "top_ids")
            layout[name] = (width, value.shape[1] if wide else 0)
            width += value.shape[1]

        if plan["token_stats"]:
            st = token_stats(raw, chosen)
            for name in TOKEN_STATS:
                add(name, st[name])
        if plan["top_logprobs"]:
            values, ids = top_logprobs(raw, plan["top_logprobs"])
            add("top_values", values)
            add("top_ids", ids)
        if plan["model_stats"]:
            for name, value in stats.items():
                add(name, value)
        if plan["error_driven_stats"]:
            for name in ERROR_DRIVEN_STATS:
                add(name, ed[name])
        packed = torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]
        host = self._host_buffer(B * width).view(B, width)
        host.copy_(packed, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return StepResult(host.tolist(), layout)

    def _host_buffer(self, n: int) -> torch.Tensor:
        """The one buffer every step's results are copied into (pinned on CUDA, so the copy is a
        DMA the step waits for once)."""
        if self._host.numel() < n:
            self._host = torch.empty(max(n, 2 * self._host.numel()), dtype=torch.float32,
                                     pin_memory=self.device.type == "cuda")
        return self._host[:n]
