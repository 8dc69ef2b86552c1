"""`pcgpt serve`: read the models' checkpoint info (no weights), start each model's engine in a
process of its own (pcgpt/serve/engine_process.py, which loads the weights), then run the HTTP
service under uvicorn."""

import logging
import signal
import sys


def register(sub, model_args, env):
    from pcgpt.serve.config import ServerConfig
    d = ServerConfig()
    lim = d.connection_limits
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
    s.add_argument("--threads", type=int, default=int(env("threads", d.threads)),
                   help="torch CPU threads of each model's engine process (0: PyTorch's default, one per core)")
    s.add_argument("--stream-interval", type=int, default=int(env("stream_interval", d.stream_interval)),
                   help="tokens per stream chunk while a request runs (the first goes at once)")
    s.add_argument("--log-level", default=env("log_level", "info"))
    c = s.add_argument_group("connection limits", "what one client connection may hold or wait for "
                                                   "(RELIABILITY.md)")
    c.add_argument("--max-header-bytes", type=int, default=int(env("max_header_bytes", lim.max_header_bytes)),
                   help="bytes of a request's line and header fields; more gets 431 (default: %(default)s)")
    c.add_argument("--max-headers", type=int, default=int(env("max_headers", lim.max_headers)),
                   help="header fields of a request; more gets 431 (default: %(default)s)")
    c.add_argument("--header-timeout", type=float, default=float(env("header_timeout", lim.header_timeout)),
                   help="seconds a client has to send a request's headers; then 408 (default: %(default)s)")
    c.add_argument("--body-timeout", type=float, default=float(env("body_timeout", lim.body_timeout)),
                   help="seconds a client has to send a request's body; then 408 (default: %(default)s)")
    c.add_argument("--max-connections", type=int, default=int(env("max_connections", lim.max_connections)),
                   help="connections open at once; one more gets 503 (default: %(default)s)")
    c.add_argument("--keep-alive-timeout", type=int, default=int(env("keep_alive_timeout", lim.keep_alive_timeout)),
                   help="seconds an idle keep-alive connection stays open (default: %(default)s)")
    s.add_argument("--metrics-max-age", type=float, default=float(env("metrics_max_age", d.metrics_max_age)),
                   help="seconds a /metrics snapshot is served again while no request starts or ends "
                        "(0: collect at every scrape; default: %(default)s)")
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
    if args.api_key is not None and not args.api_key.strip():
        # an empty key used to switch authentication off without a word
        raise ValueError("--api-key (or PCGPT_API_KEY) is empty; give a key, or unset it to serve without one")
    import uvicorn
    from pcgpt.model.checkpoint import read_checkpoint_info
    from pcgpt.serve.config import ConnectionLimits, ServerConfig
    from pcgpt.serve.engine_process import EngineStartError
    from pcgpt.serve.limits import raise_file_limit, uvicorn_options
    from pcgpt.serve.server import create_app, start_engines

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = ConnectionLimits(max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
                              header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                              max_connections=args.max_connections, keep_alive_timeout=args.keep_alive_timeout)
    limits.check()
    if args.metrics_max_age < 0:
        raise ValueError(f"--metrics-max-age must be at least 0 seconds, got {args.metrics_max_age}")
    config = ServerConfig(models=parse_models(args.model), host=args.host, port=args.port, device=args.device,
                          dtype=args.dtype, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                          api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                          max_prompt_chars=args.max_prompt_chars, cors_origins=args.cors_origin,
                          drain_seconds=args.drain_seconds, threads=args.threads, stream_interval=args.stream_interval,
                          log_level=args.log_level.lower(), connection_limits=limits,
                          metrics_max_age=args.metrics_max_age)
    if config.max_batch_size < 1 or config.max_queue < 0 or config.stream_interval < 1:
        raise ValueError("--max-batch-size and --stream-interval must be at least 1 and --max-queue at least 0")
    # This process reads each checkpoint's config, tokenizer and tensor index (a bad one fails
    # here, at once); each model's engine process loads the weights.
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
    if warning := raise_file_limit(limits.max_connections):
        logging.getLogger("pcgpt").warning(warning)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=int(config.drain_seconds) or None, **uvicorn_options(limits))
    return 0
