"""What one client connection may make the HTTP process hold, or wait for.

uvicorn's own knobs cover idle keep-alive connections (timeout_keep_alive) and requests beyond a
concurrency limit (limit_concurrency: 503). Its httptools protocol, the fast parser kept here,
bounds nothing else: a request's headers may grow without limit (httptools concatenates a header
value as it arrives, so a long one also stalls the event loop), and a request whose headers or
body never finish holds its connection forever. `limited_protocol` returns a small subclass of
uvicorn's HttpToolsProtocol that adds, per connection:

- a bound on the bytes of a request's head (request line and header fields) and on the number of
  header fields: 431 and the connection closed;
- a deadline for a request's head, from the connection's opening or the request's first byte,
  and one for its body, from the end of its head: 408 and the connection closed;
- a cap on open connections: one beyond it is answered 503 and closed at once, so a crowd of
  stalled connections holds no more file descriptors than the cap (raise_file_limit makes room
  for the cap under the process's limit on open files).
"""

from __future__ import annotations

import http
import json
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pcgpt.serve.config import ConnectionLimits


LINGER_S = 1.0  # after a refusal, how long what the client still sends is read and dropped
FILES_BESIDES_CONNECTIONS = 256  # engine pipes, checkpoint files, the listening socket, logs


def raise_file_limit(max_connections: int) -> str | None:
    """Raises this process's soft limit on open files (never above the hard limit, never down) so
    that --max-connections, not the file limit, decides when a connection is refused: past the
    file limit a new connection fails at accept, unanswered. Returns a warning when the hard limit
    is too low for the cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FILES_BESIDES_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None
    if hard != resource.RLIM_INFINITY and hard < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return (f"--max-connections {max_connections} needs about {want} open files; the hard limit is {hard} "
                f"(raise it, e.g. ulimit -Hn, or lower --max-connections)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return None


def uvicorn_options(limits: ConnectionLimits) -> dict:
    """Keyword arguments for uvicorn.run / uvicorn.Config that apply `limits`."""
    # uvicorn answers 503 to a request when connections or running requests reach
    # limit_concurrency; connections beyond max_connections are closed before that check
    # matters, so its limit here bounds running requests (a stream whose client left runs
    # until it notices) at the same number
    return {"http": limited_protocol(limits), "limit_concurrency": limits.max_connections + 1,
            "timeout_keep_alive": limits.keep_alive_timeout}


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing; answered 431 (see send_400_response)."""


def limited_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `limits` (pass as uvicorn.Config(http=...))."""
    return type("LimitedHttpToolsProtocol", (_LimitedHttpToolsProtocol,), {"limits": limits})


class _LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ConnectionLimits

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # between one request's end (or the connection's start) and the next head's end
        self._head_bytes_received = 0  # bytes received while reading the head (with any body bytes in the same read)
        self._refusal: tuple[int, str] | None = None  # the answer to send instead of uvicorn's 400
        self._deadline = None  # TimerHandle of the head's or the body's deadline
        self._lingering = None  # TimerHandle of the close after a refusal

    # --- connections ------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, f"the server holds {self.limits.max_connections} connections already; retry later")
            return
        self._arm("head", self.limits.header_timeout)

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    # --- bytes in ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None or self.transport.is_closing():  # refused: the rest is dropped
            return
        if self._reading_head:
            self._head_bytes_received += len(data)
        super().data_received(data)
        # a field still incomplete (a header value streamed without end) is buffered by the parser:
        # counted here, from the bytes received, as the parser reports only finished fields
        if self._reading_head and self._head_bytes_received > self.limits.max_header_bytes \
                and self._lingering is None and not self.transport.is_closing():
            self._refuse(431, f"request headers are larger than {self.limits.max_header_bytes} bytes")

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        if self._deadline is None:  # a new connection's deadline runs from its opening
            self._arm("head", self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        # checked once per request, not per field: the bytes received bound what a head can hold
        # (data_received refuses an unfinished one), so only a head that arrived whole with more
        # than the limit in one read is measured exactly here
        if self._head_bytes_received > self.limits.max_header_bytes or len(self.headers) > self.limits.max_headers:
            self._check_head()
        self._reading_head = False
        self._arm("body", self.limits.body_timeout)
        super().on_headers_complete()

    def _check_head(self) -> None:
        if len(self.headers) > self.limits.max_headers:
            self._refusal = (431, f"a request may have at most {self.limits.max_headers} header fields")
            raise _HeadTooLarge
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)  # ": " and CRLF
        if size > self.limits.max_header_bytes:
            self._refusal = (431, f"request headers are larger than {self.limits.max_header_bytes} bytes")
            raise _HeadTooLarge

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading_head = True
        self._head_bytes_received = 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a parser error with 400; a callback above stopped the parser on purpose
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            super().send_400_response(msg)

    # --- deadlines -----------------------------------------------------------------------------

    def _arm(self, part: str, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._timed_out, part, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self, part: str, seconds: float) -> None:
        self._deadline = None
        if self._lingering is not None or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # the app waits for the rest of the body (or answers an earlier request of a pipeline):
            # it hears a disconnect; an answer it began already is cut short, not mixed with ours
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        elif cycle is not None and part == "body":  # answered already (a 413 before the body was read)
            self.transport.close()
            return
        self._refuse(408, f"the request's {'headers' if part == 'head' else 'body'} did not arrive within {seconds:g} s")

    # --- answers -------------------------------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        """Answers `status` with an OpenAI-shaped error body and closes the connection; nothing of
        the request reaches the app."""
        self._disarm()
        type_ = "server_error" if status >= 500 else "invalid_request_error"
        code = http.HTTPStatus(status).phrase.lower().replace(" ", "_")
        body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        # a client still sending would get a reset for the bytes left unread, and lose this answer
        # with it: end our side, read and drop what comes for a moment, then close (nginx's
        # lingering close)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._lingering = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
