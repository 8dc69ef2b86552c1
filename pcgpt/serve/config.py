"""Server settings: from `pcgpt serve` flags, each also readable from a PCGPT_* variable."""

from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"  # pcgpt/checkpoints, shipped in the wheel
# the embedded default: both shipped checkpoints
DEFAULT_MODELS = {
    "shakespeare-char": str(CHECKPOINTS_DIR / "shakespeare-char"),
    "shakespeare-char-pc": str(CHECKPOINTS_DIR / "shakespeare-char-pc"),
}


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
