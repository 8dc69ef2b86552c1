"""The HTTP service: an OpenAI-compatible API over one engine per loaded model.

Routes are thin: they validate (pydantic, schemas.py), turn a request into engine Requests
(service.py), and turn engine events into OpenAI-shaped bodies or SSE chunks.
"""

import asyncio
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pcgpt.serve.auth import RequireAPIKey
from pcgpt.serve.config import ServerConfig
from pcgpt.serve.engine_process import RemoteEngine
from pcgpt.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from pcgpt.serve.replica import default_replica_id
from pcgpt.serve.request_id import RequestIdMiddleware
from pcgpt.serve.schemas import (CHAT_COMPLETION_BODY, CHAT_COMPLETION_CHUNK, COMPLETION_BODY, COMPLETION_CHUNK, ERROR_BODY,
                         HEALTH_BODY, MODEL_CARD, MODEL_LIST, READY_BODY, ChatCompletionRequest, CompletionRequest,
                         stream_event)
from pcgpt.serve import service, web
from pcgpt.serve.scrape import ScrapeCache
from pcgpt.serve.service import APIError

log = logging.getLogger("pcgpt.server")

# Test-only fault injection (tests/test_reliability.py, bench/reliability.py); off unless this is "1".
FAULT_INJECTION_ENV = "PCGPT_FAULT_INJECTION"


def _json(schema: dict, description: str, stream_chunk: dict | None = None) -> dict:
    content = {"application/json": {"schema": schema}}
    if stream_chunk is not None:  # with "stream": true, server-sent events instead (the schema is one event's)
        content["text/event-stream"] = {"schema": stream_event(stream_chunk)}
    return {"description": description, "content": content}


_ERRORS = {status: _json(ERROR_BODY, what) for status, what in (
    (400, "invalid request"), (401, "bad or missing API key"), (404, "unknown model"), (413, "body too large"),
    (429, "queue full"), (500, "generation failed (a server fault)"), (503, "model unavailable"))}
INFERENCE_RESPONSES = {status: _ERRORS[status] for status in (400, 401, 404, 413, 429, 500, 503)}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_, "param": param,
                                                               "code": code}})


class BodySizeLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed chunked."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")

        def too_large(scope, receive, send):  # built only when needed: a response object per request adds up
            return error_response(413, f"request body is larger than {self.max_bytes} bytes",
                                  "invalid_request_error", None, "request_too_large")(scope, receive, send)

        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    return await too_large(scope, receive, send)
            except ValueError:
                return await error_response(400, "invalid Content-Length header", "invalid_request_error")(scope, receive, send)
        # read the whole body here (it is small: at most max_bytes), so a chunked body over the limit
        # is a 413 before any route sees it (a route would turn the error into a 400)
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect, for streams to notice

        await self.app(scope, replay_receive, send)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict", "none")
                                      or "[" in part or part.startswith(("function-", "constrained-")))


def quantization_of(config: ServerConfig):
    from pcgpt.model.quantize import Quantization
    return Quantization.parse(config.quantize, config.group_size)


def start_engines(config: ServerConfig, infos: dict) -> dict:
    """One engine process per model (`infos`: served name -> CheckpointInfo, read without the
    weights), all loading their checkpoints side by side; returns when every one is ready. If one
    fails, the others are stopped and EngineStartError says which model and why."""
    fault_injection = os.environ.get(FAULT_INJECTION_ENV) == "1"
    if fault_injection:
        log.warning("%s=1: test-only fault injection is on (requests with user 'fault:...')", FAULT_INJECTION_ENV)
    engines = {name: RemoteEngine(name, info, device=config.device, dtype=config.dtype, threads=config.threads,
                                  max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                                  sampler_defaults=service.sampler_defaults(info.metadata, info.tokenizer),
                                  stream_interval=config.stream_interval, fault_injection=fault_injection,
                                  log_level=config.log_level, watchdog_s=config.engine_watchdog_s,
                                  max_restarts=config.max_engine_restarts,
                                  restart_backoff_s=config.engine_restart_backoff_s, cuda_graphs=config.cuda_graphs,
                                  compile_decode=config.compile,
                                  quantization=quantization_of(config))
               for name, info in infos.items()}
    try:
        for engine in engines.values():
            engine.start()
        for engine in engines.values():
            engine.wait_ready()
    except BaseException:
        for engine in engines.values():
            engine.shutdown(0)
        raise
    return engines


def create_app(config: ServerConfig, engines: dict) -> FastAPI:
    """`engines`: served name -> a ready RemoteEngine (start_engines); the app drains and stops
    them when it shuts down."""
    fault_injection = any(e.spec["fault_injection"] for e in engines.values())
    metrics = Metrics(replica=config.replica_id or default_replica_id(config.port))

    async def render_metrics() -> bytes:
        metrics.snapshots.inc()
        engines = app.state.engines
        # side by side: a slow engine costs one COLLECT_TIMEOUT_S, not one per engine
        engine_families = await asyncio.gather(*(e.collect() for e in engines.values()))
        metrics.engine_pids = [e.pid for e in engines.values() if e.alive]
        metrics.observe_engines({n: e.alive for n, e in engines.items()}, {n: e.restarts for n, e in engines.items()})
        return metrics.render(engine_families)

    scrapes = ScrapeCache(render_metrics, config.metrics_max_age)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for name, engine in engines.items():
            engine.attach()
            metrics.register_model(name, service.model_card(name, engine))
        metrics.engine_pids = [e.pid for e in engines.values()]
        app.state.engines = engines
        app.state.shutting_down = False
        yield
        # SIGTERM: uvicorn stops accepting, then we drain the engines (bounded) before exiting
        app.state.shutting_down = True
        for engine in engines.values():
            engine.stop_admitting()
        for engine in engines.values():
            engine.shutdown(config.drain_seconds)

    app = FastAPI(title="pcgpt", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # web.install serves them, offline
                  description="OpenAI-compatible server for nanoGPT-family and predictive-coding GPT models, "
                              "with per-token uncertainty.")
    app.state.config = config
    app.state.metrics = metrics
    app.state.engines = {}
    app.state.shutting_down = False
    if config.api_key:  # before any route reads the body: a client without the key learns nothing of it
        app.add_middleware(RequireAPIKey, api_key=config.api_key,
                           on_refused=lambda: _count_error_type("none", "invalid_request_error"))
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, a 413 included, carries the id

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        _count_error(request, e.type)
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        _count_error(request, "invalid_request_error")
        first = e.errors()[0] if e.errors() else {}
        # pydantic names the union branch it tried ("prompt.str", "stop.list[str]"): not a field
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
            loc = []
        elif loc:
            message = f"{'.'.join(loc)}: {message}"
        return error_response(400, message, "invalid_request_error", ".".join(loc) or None, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        response = error_response(e.status_code, str(e.detail), type_)
        response.headers.update(e.headers or {})  # 405's Allow (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unhandled error")
        _count_error(request, "server_error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    def _count_error(request: Request, type_: str) -> None:
        _count_error_type(getattr(request.state, "model_name", None) or "none", type_)

    def _count_error_type(model: str, type_: str) -> None:
        metrics.errors.labels(model=model, type=type_).inc()
        scrapes.changed()

    def engine_for(request: Request, name: str) -> RemoteEngine:
        request.state.model_name = name if name in request.app.state.engines else None
        engines = request.app.state.engines
        if name not in engines:
            raise APIError(404, f"model {name!r} does not exist; available: {', '.join(engines) or 'none'}",
                           "invalid_request_error", "model", "model_not_found")
        engine = engines[name]
        if request.app.state.shutting_down or not engine.alive:
            raise APIError(503, f"model {name!r} is not available " +
                           ("(shutting down)" if request.app.state.shutting_down else f"(engine stopped: {engine.dead})"),
                           "server_error", None, "model_unavailable")
        return engine

    # Kubernetes' split: liveness (/health) fails only when restarting the server is the cure (an
    # engine down for good); readiness (/ready) fails while any engine is down or restarting.
    @app.get("/health", summary="liveness: the process answers and every model is up or being restarted "
                                "(503 once an engine has used up its restarts)",
             responses={200: _json(HEALTH_BODY, "alive"), 503: _json(HEALTH_BODY, "a model is down for good")})
    async def health(request: Request):
        failed = {name: e.status for name, e in request.app.state.engines.items() if e.gave_up}
        if failed:
            return JSONResponse(status_code=503, content={"status": "failed", "models": failed})
        return {"status": "ok"}

    @app.get("/ready", summary="readiness: models loaded and every engine running (503 otherwise)",
             responses={200: _json(READY_BODY, "ready"), 503: _json(READY_BODY, "not ready: an engine is down or the server is stopping")})
    async def ready(request: Request):
        engines = request.app.state.engines
        status = {name: e.status for name, e in engines.items()}
        ok = bool(engines) and all(e.alive for e in engines.values()) and not request.app.state.shutting_down
        body = {"status": "ready" if ok else "not ready", "models": status}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics_route():
        return Response(await scrapes.get(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="the loaded models",
             responses={200: _json(MODEL_LIST, "the loaded models"), 401: _ERRORS[401]})
    async def list_models(request: Request):
        return {"object": "list", "data": [service.model_card(n, e) for n, e in request.app.state.engines.items()]}

    @app.get("/v1/models/{model_id}", summary="one loaded model",
             responses={200: _json(MODEL_CARD, "the model"), 401: _ERRORS[401], 404: _ERRORS[404]})
    async def get_model(request: Request, model_id: str):
        engines = request.app.state.engines
        if model_id not in engines:
            raise APIError(404, f"model {model_id!r} does not exist", "invalid_request_error", "model", "model_not_found")
        return service.model_card(model_id, engines[model_id])

    @app.post("/v1/completions", summary="text completion (OpenAI)",
              responses={200: _json(COMPLETION_BODY, "the completion, or its SSE stream", COMPLETION_CHUNK), **INFERENCE_RESPONSES})
    async def completions(body: CompletionRequest, request: Request):
        engine = engine_for(request, body.model)
        job = service.completion_job(body, engine, config)
        return await _run(job, engine, request)

    @app.post("/v1/chat/completions", summary="chat completion (OpenAI)",
              responses={200: _json(CHAT_COMPLETION_BODY, "the chat completion, or its SSE stream", CHAT_COMPLETION_CHUNK),
                         **INFERENCE_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = engine_for(request, body.model)
        job = service.chat_job(body, engine, config)
        return await _run(job, engine, request)

    async def _run(job, engine, request):
        if fault_injection and (job.body.user or "").startswith("fault:"):
            for r in job.requests:
                r.fault = job.body.user.removeprefix("fault:")
        job.submit()
        scrapes.changed()
        if job.stream:
            return StreamingResponse(_changes_scrapes_at_end(job.sse(request)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await job.collect(request)
        finally:
            scrapes.changed()

    async def _changes_scrapes_at_end(chunks):
        try:
            async for chunk in chunks:
                if chunk is service.SSE_DONE:  # the client may scrape as soon as it reads this
                    scrapes.changed()
                yield chunk
        finally:
            scrapes.changed()

    def openapi() -> dict:
        """FastAPI's document, less the 422 it adds to every route: validation errors here are 400."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
    web.install(app)  # the playground at / and /playground; /docs and /redoc with local assets
    return app
