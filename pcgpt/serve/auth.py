"""The API key, checked before anything of the request is read.

A FastAPI dependency runs after the body has been read and parsed: a client without the key could
still make the server buffer a body and would learn, from a 400 about its JSON, that the route
parses it. This ASGI middleware answers 401 from the headers alone.
"""

import hmac
from collections.abc import Callable

from starlette.responses import JSONResponse

API_KEY_ERROR = {"message": "invalid or missing API key: send 'Authorization: Bearer <key>'",
                 "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


class RequireAPIKey:
    """401 for a request to `prefix` or below it without 'Authorization: Bearer <key>'; CORS
    preflights (OPTIONS) pass, as browsers send them without credentials."""

    def __init__(self, app, api_key: str, prefix: str = "/v1", on_refused: Callable[[], None] = lambda: None):
        self.app = app
        self.key = api_key.encode()
        self.prefix = prefix
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] != "OPTIONS" \
                and (path == self.prefix or path.startswith(self.prefix + "/")) and not self._authorized(scope):
            self.on_refused()
            return await JSONResponse(status_code=401, content={"error": API_KEY_ERROR})(scope, receive, send)
        return await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
