"""`pcgpt serve`: read the models' checkpoint info (no weights), start each model's engine in a
process of its own (pcgpt/serve/engine_process.py, which loads the weights), then run the HTTP
service under uvicorn."""

import logging
import signal
import sys


def register(sub, model_args, env):
    from pcgpt.serve.config import ServerConfig
    d = ServerConfig()
    s = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API",
                       description="Every flag can also come from an environment variable PCGPT_<FLAG> "
                                   "(e.g. PCGPT_PORT, PCGPT_API_KEY, PCGPT_MODEL='a=/path,b=/path').")
    s.add_argument("--model", action="append", metavar="NAME=PATH",
                   default=[m for m in env("model", "").split(",") if m] or None,
                   help="serve the checkpoint at PATH as NAME (repeatable); default: both shipped checkpoints")
    s.add_argument("--host", default=env("host", d.host))
    s.add_argument("--port", type=int, default=int(env("port", d.port)))
    s.add_argument("--device", default=env("device", d.device))
    s.add_argument("--dtype", default=env("dtype", d.dtype))
    s.add_argument("--max-batch-size", type=int, default=int(env("max_batch_size", d.max_batch_size)))
    s.add_argument("--max-queue", type=int, default=int(env("max_queue", d.max_queue)))
    s.add_argument("--api-key", default=env("api_key", None))
    s.add_argument("--max-body-bytes", type=int, default=int(env("max_body_bytes", d.max_body_bytes)))
    s.add_argument("--max-prompt-chars", type=int, default=int(env("max_prompt_chars", d.max_prompt_chars)))
    s.add_argument("--cors-origin", action="append", default=[o for o in env("cors_origins", "").split(",") if o],
                   help="allow this browser origin (repeatable); CORS is closed by default")
    s.add_argument("--drain-seconds", type=float, default=float(env("drain_seconds", d.drain_seconds)))
    s.add_argument("--quantize", default=env("quantize", d.quantize), choices=["int8", "int8-dynamic", "int4"],
                   help="quantize each model's weights at load: int8 per channel, int4 group-wise")
    s.add_argument("--group-size", type=int, default=int(env("group_size", 0)) or None,
                   help="int4: inputs per scale and zero point (32, 64 or 128; default 32)")
    s.add_argument("--threads", type=int, default=int(env("threads", d.threads)),
                   help="torch CPU threads of each model's engine process (0: PyTorch's default, one per core)")
    s.add_argument("--stream-interval", type=int, default=int(env("stream_interval", d.stream_interval)),
                   help="tokens per stream chunk while a request runs (the first goes at once)")
    s.add_argument("--log-level", default=env("log_level", "info"))
    s.set_defaults(func=cmd_serve)


def parse_models(specs) -> dict:
    from pcgpt.serve.config import DEFAULT_MODELS
    if not specs:
        return dict(DEFAULT_MODELS)
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model takes NAME=PATH, got {spec!r}")
        if name in models:
            raise ValueError(f"model name {name!r} given twice")
        models[name] = path
    return models


def cmd_serve(args) -> int:
    import uvicorn
    from pcgpt.model.checkpoint import read_checkpoint_info
    from pcgpt.serve.config import ServerConfig
    from pcgpt.serve.engine_process import EngineStartError
    from pcgpt.serve.server import create_app, quantization_of, start_engines

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(models=parse_models(args.model), host=args.host, port=args.port, device=args.device,
                          dtype=args.dtype, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                          api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                          max_prompt_chars=args.max_prompt_chars, cors_origins=args.cors_origin,
                          drain_seconds=args.drain_seconds, threads=args.threads,
                          quantize=args.quantize, group_size=args.group_size, stream_interval=args.stream_interval,
                          log_level=args.log_level.lower())
    if config.max_batch_size < 1 or config.max_queue < 0 or config.stream_interval < 1:
        raise ValueError("--max-batch-size and --stream-interval must be at least 1 and --max-queue at least 0")
    # This process reads each checkpoint's config, tokenizer and tensor index (a bad one fails
    # here, at once); each model's engine process loads the weights.
    quantization_of(config)  # a bad --quantize / --group-size pair fails here, before any process starts
    infos = {name: read_checkpoint_info(path) for name, path in config.models.items()}
    try:
        engines = start_engines(config, infos)
    except EngineStartError as e:
        print(f"pcgpt serve: error: {e}", file=sys.stderr)
        return 2
    for name, info in infos.items():
        logging.getLogger("pcgpt").info("serving %s (%s) from %s on %s", name, info.model_type, info.path, config.device)
    app = create_app(config, engines)
    # uvicorn re-raises the SIGTERM it drained on after restoring this handler: with the default
    # handler the process would then die of the signal (exit -15) instead of exiting 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=int(config.drain_seconds) or None)
    return 0
