"""`pcgpt serve`: read the models' checkpoint info (no weights), start each model's engine in a
process of its own (pcgpt/serve/engine_process.py, which loads the weights), then run the HTTP
service under uvicorn."""

import argparse
import logging
import signal
import sys

from pcgpt import cli_args


def register(sub, model_args, env):
    from pcgpt.cli_quantize import QUANTIZE_HELP
    from pcgpt.serve.config import ServerConfig
    d = ServerConfig()
    lim = d.connection_limits
    s = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API",
                       description="Every flag can also come from an environment variable PCGPT_<FLAG> "
                                   "(e.g. PCGPT_PORT, PCGPT_API_KEY, PCGPT_MODEL='a=/path,b=/path').")
    s.add_argument("--model", action="append", metavar="NAME=PATH",
                   default=[m for m in env("model", "").split(",") if m] or None,
                   help="serve the checkpoint at PATH as NAME (repeatable); default: both shipped checkpoints")
    s.add_argument("--host", default=env("host", d.host), help="listen address (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=int(env("port", d.port)), help="listen port")
    s.add_argument("--device", default=env("device", d.device), help="auto (CUDA when present), cpu, cuda or cuda:N")
    s.add_argument("--dtype", default=env("dtype", d.dtype), choices=cli_args.DTYPES,
                   help="auto: float32 on CPU, bfloat16 on GPUs that have it")
    s.add_argument("--max-batch-size", type=int, default=int(env("max_batch_size", d.max_batch_size)),
                   help="KV-cache slots per model: sequences decoded together")
    s.add_argument("--max-queue", type=int, default=int(env("max_queue", d.max_queue)),
                   help="requests waiting per model beyond the batch; more are answered 429 at once")
    s.add_argument("--api-key", default=env("api_key", None),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: none, open to anyone who "
                        "can reach the port)")
    s.add_argument("--max-body-bytes", type=int, default=int(env("max_body_bytes", d.max_body_bytes)),
                   help="larger request bodies are answered 413")
    s.add_argument("--max-prompt-chars", type=int, default=int(env("max_prompt_chars", d.max_prompt_chars)),
                   help="longer prompts (characters, per prompt) are answered 400")
    s.add_argument("--cors-origin", action="append", default=[o for o in env("cors_origins", "").split(",") if o],
                   help="allow this browser origin (repeatable); CORS is closed by default")
    s.add_argument("--drain-seconds", type=float, default=float(env("drain_seconds", d.drain_seconds)),
                   help="on SIGTERM, how long running requests may take to finish")
    s.add_argument("--quantize", default=env("quantize", d.quantize), choices=["int8", "int8-dynamic", "int4"],
                   help=f"quantize each model's weights at load. {QUANTIZE_HELP}")
    s.add_argument("--group-size", type=int, default=int(env("group_size", 0)) or None,
                   help="int4: inputs per scale and zero point (32, 64 or 128; default 32)")
    s.add_argument("--threads", type=int, default=int(env("threads", d.threads)),
                   help="torch CPU threads of each model's engine process (0: PyTorch's default, one per core)")
    s.add_argument("--stream-interval", type=int, default=int(env("stream_interval", d.stream_interval)),
                   help="tokens per stream chunk while a request runs (the first goes at once)")
    s.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   default=env("cuda_graphs", "1") not in ("0", "false", "no"),
                   help="on CUDA, capture the decode step as CUDA graphs at start, one per batch-size bucket "
                        "(--no-cuda-graphs: launch it eagerly; no effect on CPU)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   default=env("compile", "0") not in ("0", "false", "no"),
                   help="on CPU, compile the batch-1 decode step with torch.compile at start (tens of seconds "
                        "per model; faster single-stream decoding); float GPT models only, others run eagerly")
    s.add_argument("--log-level", default=env("log_level", "info"), type=str.lower,
                   choices=["critical", "error", "warning", "info", "debug"], help="the server's logging")
    s.add_argument("--replica-id", default=env("replica_id", d.replica_id),
                   help="this replica's name in metrics (label replica) and log lines; default: hostname:port")
    s.add_argument("--engine-watchdog-seconds", type=float, default=float(env("engine_watchdog_seconds", d.engine_watchdog_s)),
                   help="an engine that has requests and runs no step for this long is hung: its requests fail "
                        "with 503, its process is killed and restarted (default %(default)s)")
    s.add_argument("--max-engine-restarts", type=int, default=int(env("max_engine_restarts", d.max_engine_restarts)),
                   help="restarts in a row of a dead or hung engine before its model stays down and /health "
                        "answers 503 (0: never restart; default %(default)s)")
    s.add_argument("--engine-restart-backoff", type=float, default=float(env("engine_restart_backoff", d.engine_restart_backoff_s)),
                   help="seconds before the first restart, doubling per restart in a row up to 60 (default %(default)s)")
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
    from pcgpt.serve.replica import DrainingServer, default_replica_id
    from pcgpt.serve.request_id import LogContext
    from pcgpt.serve.server import create_app, quantization_of, start_engines

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(replica)s %(request_id)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(LogContext(args.replica_id or default_replica_id(args.port)))
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
                          quantize=args.quantize, group_size=args.group_size,
                          log_level=args.log_level.lower(), cuda_graphs=args.cuda_graphs, compile=args.compile,
                          replica_id=args.replica_id, engine_watchdog_s=args.engine_watchdog_seconds,
                          max_engine_restarts=args.max_engine_restarts,
                          engine_restart_backoff_s=args.engine_restart_backoff,
                          connection_limits=limits, metrics_max_age=args.metrics_max_age)
    if config.max_batch_size < 1 or config.max_queue < 0 or config.stream_interval < 1:
        raise ValueError("--max-batch-size and --stream-interval must be at least 1 and --max-queue at least 0")
    if config.api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("pcgpt").warning("listening on %s with no API key: anyone who reaches port %d can use "
                                           "the API; set --api-key (PCGPT_API_KEY)", config.host, config.port)
    if not (config.engine_watchdog_s > 0 and config.max_engine_restarts >= 0 and config.engine_restart_backoff_s >= 0):
        raise ValueError("--engine-watchdog-seconds must be above 0, --max-engine-restarts and "
                         "--engine-restart-backoff at least 0")
    # This process reads each checkpoint's config, tokenizer and tensor index (a bad one fails
    # here, at once); each model's engine process loads the weights.
    quantization_of(config)  # a bad --quantize / --group-size pair fails here, before any process starts
    infos = {name: read_checkpoint_info(path) for name, path in config.models.items()}
    try:
        engines = start_engines(config, infos)
    except EngineStartError as e:
        print(f"pcgpt serve: error: {e}", file=sys.stderr)
        return 2
    from pcgpt.model.card import describe
    for name, info in infos.items():  # the parameter count as inspect and /v1/models give it (model/card.py)
        logging.getLogger("pcgpt").info("serving %s (%s, %s parameters) from %s on %s", name, info.model_type,
                                        f"{describe(info)['parameters']:,}", info.path, config.device)
    app = create_app(config, engines)
    # uvicorn re-raises the SIGTERM it drained on after restoring this handler: with the default
    # handler the process would then die of the signal (exit -15) instead of exiting 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    if warning := raise_file_limit(limits.max_connections):
        logging.getLogger("pcgpt").warning(warning)
    # log_config=None: uvicorn's own lines, access lines included, go through the handler above,
    # with the replica and the request id
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level.lower(),
                                    log_config=None, timeout_graceful_shutdown=int(config.drain_seconds) or None,
                                    **uvicorn_options(limits))
    DrainingServer(uvicorn_config, app, config.drain_seconds).run()
    return 0
