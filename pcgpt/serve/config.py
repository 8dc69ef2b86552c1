"""Server settings: from `pcgpt serve` flags, each also readable from a PCGPT_* variable."""

from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"  # pcgpt/checkpoints, shipped in the wheel
# the embedded default: both shipped checkpoints
DEFAULT_MODELS = {
    "shakespeare-char": str(CHECKPOINTS_DIR / "shakespeare-char"),
    "shakespeare-char-pc": str(CHECKPOINTS_DIR / "shakespeare-char-pc"),
}


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold or wait for (pcgpt/serve/limits.py applies them)."""
    max_header_bytes: int = 64 * 1024  # request line + header fields of one request
    max_headers: int = 100  # header fields of one request
    header_timeout: float = 10.0  # seconds to send a request's head
    body_timeout: float = 30.0  # seconds to send a request's body, once its head is in
    max_connections: int = 1024  # connections open at once
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection stays open (uvicorn's)

    def check(self) -> None:
        """ValueError naming the flag of the first limit out of range."""
        for flag, value, least in (("--max-header-bytes", self.max_header_bytes, 1024),
                                   ("--max-headers", self.max_headers, 1),
                                   ("--max-connections", self.max_connections, 1),
                                   ("--keep-alive-timeout", self.keep_alive_timeout, 1)):
            if value < least:
                raise ValueError(f"{flag} must be at least {least}, got {value}")
        for flag, value in (("--header-timeout", self.header_timeout), ("--body-timeout", self.body_timeout)):
            if not value > 0:
                raise ValueError(f"{flag} must be more than 0 seconds, got {value}")


@dataclass
class ServerConfig:
    models: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODELS))  # served name -> checkpoint path
    host: str = "127.0.0.1"  # listen address (0.0.0.0 in containers)
    port: int = 8000
    device: str = "auto"  # auto (CUDA when present), cpu, cuda[:N]
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPUs that have it), float32, bfloat16, float16
    max_batch_size: int = 16  # KV-cache slots per model: sequences decoded together
    max_queue: int = 64  # sequences waiting per model beyond free slots; more gets 429 at once
    api_key: str | None = None  # when set, every /v1 route needs "Authorization: Bearer <key>"
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_prompt_chars: int = 100_000  # longer prompts (in characters, per prompt) get 400
    cors_origins: list[str] = field(default_factory=list)  # allowed browser origins; none by default
    drain_seconds: float = 30.0  # on SIGTERM, how long running requests may take to finish
    quantize: str | None = None  # int8 or int4: weights quantized at load (pcgpt.model.quantize)
    group_size: int | None = None  # int4: inputs per scale (default 32)
    threads: int = 0  # torch CPU threads of each engine process (0 = PyTorch's default)
    stream_interval: int = 1  # tokens per stream chunk while a request runs (the first goes at once); >1: less HTTP work per token
    log_level: str = "info"  # the server's and its engine processes' logging
    cuda_graphs: bool = True  # on CUDA, replay the decode step from graphs captured at start (serve/cuda_graphs.py)
    compile: bool = False  # on CPU, a torch.compile'd batch-1 decode step (serve/compiled_step.py)
    replica_id: str = ""  # this replica's name in metrics (label `replica`) and log lines; "" = hostname:port
    engine_watchdog_s: float = 30.0  # an engine with work and no step for this long is hung: killed, then restarted
    max_engine_restarts: int = 5  # restarts in a row before a model stays down (and /health fails)
    engine_restart_backoff_s: float = 1.0  # wait before the first restart; doubles per restart in a row, up to 60 s
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    metrics_max_age: float = 1.0  # seconds a /metrics snapshot is served again while no request starts or ends
