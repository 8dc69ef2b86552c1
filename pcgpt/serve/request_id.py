"""Request ids: `X-Request-Id` taken from the request (a load balancer's or the client's) or made
here, echoed in the response header and carried into every log line written while the request runs.

A given id must be 1-128 characters of letters, digits and `._:-` (what nginx's $request_id,
UUIDs and the usual tracing ids use); anything else is answered 400 before any route runs, so a log
line can never carry a forged line break or an unbounded string.
"""

import logging
import re
import uuid
from contextvars import ContextVar

import orjson

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,%d}" % MAX_REQUEST_ID_CHARS)
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()

# the id of the request the running task serves; "-" outside a request (start-up, engine events)
current_request_id: ContextVar[str] = ContextVar("pcgpt_request_id", default="-")


def is_valid_request_id(value: str) -> bool:
    return _VALID_REQUEST_ID.fullmatch(value) is not None


class RequestIdMiddleware:
    """ASGI middleware: validates or makes the request id, sets `current_request_id` for the
    request's task (and the tasks it starts), and adds the X-Request-Id response header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((value for key, value in scope.get("headers") or () if key == _HEADER_KEY), None)
        if given is None:
            request_id = uuid.uuid4().hex
        else:
            request_id = given.decode("latin-1")
            if not is_valid_request_id(request_id):
                return await _invalid_request_id(send)
        encoded = request_id.encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (_HEADER_KEY, encoded)]
            await send(message)

        token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


async def _invalid_request_id(send) -> None:
    body = orjson.dumps({"error": {
        "message": f"{REQUEST_ID_HEADER} must be 1-{MAX_REQUEST_ID_CHARS} characters of letters, digits and '._:-'",
        "type": "invalid_request_error", "param": REQUEST_ID_HEADER, "code": "invalid_request_id"}})
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class LogContext(logging.Filter):
    """Adds `replica` and `request_id` to every record a handler writes (format fields
    %(replica)s and %(request_id)s), so each line of a replica's log says whose and for what."""

    def __init__(self, replica: str):
        super().__init__()
        self.replica = replica

    def filter(self, record: logging.LogRecord) -> bool:
        record.replica = self.replica
        record.request_id = current_request_id.get()
        return True
