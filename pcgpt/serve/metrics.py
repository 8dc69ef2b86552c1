"""Prometheus metrics, every series labelled by model.

Buckets start at 0.5 ms, fine enough for a 4-layer char model on a CPU, and reach minutes, wide
enough for a 124M model on a CPU under load.
"""

import os
import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
STEP_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16)
BITS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
ENERGY_BUCKETS = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 100)
FINISH_REASONS = ("stop", "length", "cancelled", "abort")
ERROR_TYPES = ("invalid_request_error", "rate_limit_error", "server_error", "generation_error")
# the series an engine writes, in its own process (pcgpt/serve/engine_process.py): a scrape takes them from
# the engines; the server process writes the rest (HTTP errors, its memory, the model info)
ENGINE_SERIES = ("requests", "ttft", "itl", "e2e", "queue_time", "prompt_tokens", "generation_tokens", "running",
                 "waiting", "batch_size", "kv_usage", "kv_bytes", "device_memory", "settle_steps", "entropy",
                 "surprise", "energy", "decode_steps")
ENGINE_ERROR_TYPE = "generation_error"  # of pcgpt_request_errors, the one type an engine counts


class Metrics:
    """All series of one server process; the engine and routes call these, tests read /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None, replica: str | None = None):
        self.registry = registry or CollectorRegistry()
        self.replica = replica  # when set, every exported sample carries replica="..." (pcgpt/serve/replica.py)
        r = self.registry
        m = ["model"]
        self.requests = Counter("pcgpt_requests", "Finished requests (choices) by finish reason", m + ["finish_reason"], registry=r)
        self.errors = Counter("pcgpt_request_errors", "Requests answered with an error, by error type", m + ["type"], registry=r)
        self.ttft = Histogram("pcgpt_time_to_first_token_seconds", "Arrival to first generated token",
                              m, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pcgpt_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             m, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pcgpt_e2e_request_latency_seconds", "Arrival to last token",
                             m, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("pcgpt_request_queue_time_seconds", "Arrival to admission into the running batch",
                                    m, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pcgpt_prompt_tokens", "Prompt tokens prefilled", m, registry=r)
        self.generation_tokens = Counter("pcgpt_generation_tokens", "Tokens generated", m, registry=r)
        self.running = Gauge("pcgpt_num_requests_running", "Sequences in the running batch", m, registry=r)
        self.waiting = Gauge("pcgpt_num_requests_waiting", "Sequences waiting for a slot", m, registry=r)
        self.batch_size = Histogram("pcgpt_batch_size", "Rows per decode step", m, buckets=BATCH_BUCKETS, registry=r)
        self.kv_usage = Gauge("pcgpt_kv_cache_usage_ratio", "Fraction of KV-cache positions held by running sequences", m, registry=r)
        self.kv_bytes = Gauge("pcgpt_kv_cache_bytes", "KV-cache bytes: allocated in all, and used by running sequences", m + ["state"], registry=r)
        self.device_memory = Gauge("pcgpt_device_memory_bytes", "Model weights on the device (any device); CUDA memory allocated / reserved by PyTorch", m + ["kind"], registry=r)
        self.rss = Gauge("pcgpt_process_resident_memory_bytes",
                         "Resident memory of the server process and its engine processes", registry=r)
        self.rss_peak = Gauge("pcgpt_process_peak_resident_memory_bytes",
                              "Peak resident memory of the server process plus each engine process's own peak", registry=r)
        self.settle_steps = Histogram("pcgpt_settle_steps", "Settle steps used per generated token", m, buckets=STEP_BUCKETS, registry=r)
        self.entropy = Histogram("pcgpt_token_entropy_bits", "Entropy of each next-token prediction", m, buckets=BITS_BUCKETS, registry=r)
        self.surprise = Histogram("pcgpt_token_surprise_bits", "Surprise of each generated token", m, buckets=BITS_BUCKETS, registry=r)
        self.energy = Histogram("pcgpt_token_energy", "PC energy per unit after settling, per generated token", m, buckets=ENERGY_BUCKETS, registry=r)
        self.decode_steps = Counter("pcgpt_decode_steps", "Batched decode steps run", m, registry=r)
        self.model_info = Info("pcgpt_model", "The loaded models", m, registry=r)
        self.engine_up = Gauge("pcgpt_engine_up", "1 while the model's engine process runs and steps; 0 while it is "
                               "dead, hung or restarting", m, registry=r)
        self.engine_restarts = Counter("pcgpt_engine_restarts", "Restarts of the model's engine process after it "
                                       "died or hung", m, registry=r)
        self._restarts_counted: dict[str, int] = {}
        self.snapshots = Counter("pcgpt_metrics_snapshots", "Collections of these series from the engines (pcgpt/serve/scrape.py)", registry=r)
        self.errors.labels(model="none", type="invalid_request_error")  # requests for no loaded model
        self.engine_pids: list[int] = []  # engine processes, whose memory the process series add

    def register_model(self, name: str, card: dict) -> None:
        """`card`: the model's card (service.model_card); its flat fields become pcgpt_model's labels."""
        self.model_info.labels(model=name).info({k: str(v) for k, v in card.items()
                                                 if k != "id" and not isinstance(v, (dict, list))})
        # touch every labelled series so dashboards see zeros before the first request
        for series in (self.ttft, self.itl, self.e2e, self.queue_time, self.prompt_tokens, self.generation_tokens,
                       self.running, self.waiting, self.batch_size, self.kv_usage, self.settle_steps, self.entropy,
                       self.surprise, self.energy, self.decode_steps):
            series.labels(model=name)
        for state in ("allocated", "used"):
            self.kv_bytes.labels(model=name, state=state)
        # counters by reason and type too, so a rate() sees their first increment
        for reason in FINISH_REASONS:
            self.requests.labels(model=name, finish_reason=reason)
        for type_ in ERROR_TYPES:
            self.errors.labels(model=name, type=type_)

    def observe_engines(self, up: dict[str, bool], restarts: dict[str, int]) -> None:
        """Per model (served name): whether its engine is up, and how often it was restarted."""
        for name, is_up in up.items():
            self.engine_up.labels(model=name).set(1 if is_up else 0)
            counted = self._restarts_counted.get(name, 0)
            self.engine_restarts.labels(model=name).inc(restarts.get(name, 0) - counted)
            self._restarts_counted[name] = restarts.get(name, 0)

    def render(self, engine_families: list[list[Metric]]) -> bytes:
        """The exposition text: the engine series from engine_families (each engine process's
        collected families), the rest from this process, in this registry's order."""
        self._sample_process()
        theirs: dict[str, list] = {}
        for families in engine_families:
            for family in families:
                theirs.setdefault(family.name, []).extend(family.samples)
        owned = {family.name for attr in ENGINE_SERIES for family in getattr(self, attr).describe()}
        errors = self.errors.describe()[0].name
        out = []
        for family in self.registry.collect():
            if family.name in owned:
                family = _empty_like(family)
                family.samples = theirs.get(family.name, [])
            elif family.name == errors:  # HTTP errors counted here, generation errors by the engines
                family.samples = ([s for s in family.samples if s.labels.get("type") != ENGINE_ERROR_TYPE] +
                                  [s for s in theirs.get(errors, []) if s.labels.get("type") == ENGINE_ERROR_TYPE])
            out.append(family)
        if self.replica:
            out = [_with_label(family, "replica", self.replica) for family in out]
        return generate_latest(_Families(out))

    def _sample_process(self) -> None:
        rss = peak = 0
        for pid in [os.getpid(), *self.engine_pids]:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                # VmHWM, the process's own peak: ru_maxrss can carry a parent's peak across fork + exec
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak += int(line.split()[1]) * 1024
                            break
            except OSError:  # no /proc (or an engine process just ended)
                if pid == os.getpid():
                    peak += resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.rss.set(rss)
        self.rss_peak.set(peak)


def zero_gauges(families: list[Metric]) -> list[Metric]:
    """An engine's families as they read once it is dead: its gauges 0 (nothing runs, nothing is
    held), its counters and histograms as they last were."""
    out = []
    for family in families:
        if family.type == "gauge":
            copy = _empty_like(family)
            copy.samples = [s._replace(value=0.0) for s in family.samples]
            family = copy
        out.append(family)
    return out


def _empty_like(family: Metric) -> Metric:
    return Metric(family.name, family.documentation, family.type, family.unit)


def _with_label(family: Metric, name: str, value: str) -> Metric:
    labelled = _empty_like(family)
    labelled.samples = [s._replace(labels={**s.labels, name: value}) for s in family.samples]
    return labelled


class _Families:
    """Collected metric families as generate_latest takes a registry."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families
