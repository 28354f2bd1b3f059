"""How requests come in: aiohttp's connection protocol with a head deadline and a head size cap,
parser refusals answered as problem+json, and the middleware that screens every parsed head.

* `GuardedConnection` is aiohttp's RequestHandler (one per connection) plus a watch on each
  request head while it arrives: a head that is not complete ``header_timeout`` seconds after
  its first byte (or, on a new connection, after the accept) gets 408 and the connection is
  closed, so a client trickling a head byte by byte (slowloris) cannot hold a connection; a head
  that grows past ``max_header_size`` gets 431 before more of it is buffered. A request aiohttp's
  parser refuses gets 400 or 431 as problem+json and one DEBUG log line that quotes none of the
  request's bytes, instead of aiohttp's text answer and ERROR traceback.
* `GuardedSite` listens with that protocol; `sidecar run` serves both ports through it.
* `screen_requests` is the proxy app's middleware: `guard.screen` on every parsed head.
* `expect_after_admission` and `Continuation`: ``Expect: 100-continue`` is answered only once the
  request is admitted (or its body is needed to admit it), so a refused client never uploads.

Idle keep-alive connections are not timed here: aiohttp's keep-alive timeout governs them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from aiohttp import StreamReader, http, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from sidecar.config.settings import Settings
from sidecar.errors import SettingsInvalid
from sidecar.http import guard, problems
from sidecar.http.components import COMPONENTS
from sidecar.http.guard import Fault, Refusal
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.http.intake")

_HEAD_END = b"\r\n\r\n"
_CONTINUE = "100-continue"


def require_c_parser() -> None:
    """Refuse to serve on aiohttp's pure-Python parser: its framing rules are laxer than llhttp's,
    and the smuggling defences (guard.py) count on llhttp's strict request parsing."""
    if http.HttpRequestParser.__module__ == "aiohttp._http_parser":
        return
    why = (
        "AIOHTTP_NO_EXTENSIONS is set"
        if os.environ.get("AIOHTTP_NO_EXTENSIONS")
        else "its compiled extension is missing"
    )
    raise SettingsInvalid(
        f"aiohttp's C HTTP parser (llhttp) is not active because {why}; the sidecar refuses to serve "
        "with the pure-Python parser. Unset AIOHTTP_NO_EXTENSIONS, or install aiohttp from a binary wheel"
    )


def handler_args(settings: Settings) -> dict[str, Any]:
    """aiohttp's own parser limits for the proxy port; request bodies pass through undecoded."""
    return {
        "max_line_size": settings.max_header_size,
        "max_field_size": settings.max_header_size,
        "max_headers": settings.max_headers,
        "auto_decompress": False,
    }


@web.middleware
async def screen_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    components = request.app[COMPONENTS]
    settings = components.settings
    head = guard.Head(
        version=(request.version.major, request.version.minor),
        method=request.method,
        target=request.raw_path,
        raw_headers=request.raw_headers,
        headers=request.headers,
    )
    key_headers = components.holder.current.identity.api_key_headers
    refusal = guard.screen(head, key_headers, settings.max_header_size, settings.max_body_size)
    if refusal is None:
        return await handler(request)
    _count(components.metrics, refusal, request.remote)
    return problems.refused_input(refusal)


async def expect_after_admission(request: web.Request) -> web.StreamResponse | None:
    """The proxy route's Expect handler. aiohttp's default writes 100 Continue before any handler
    runs, so a client that will be refused would upload its body first; this one sends nothing
    and leaves 100 Continue to `Continuation`. An expectation other than 100-continue is 417."""
    expect = request.headers.get("Expect", "")
    if request.version != http.HttpVersion11 or expect.lower() == _CONTINUE:
        return None
    response = problems.problem(417, "Expectation Failed", "the only expectation accepted is 100-continue")
    response.force_close()  # whether the client sends its body now is anybody's guess
    return response


class Continuation:
    """The 100 Continue an ``Expect: 100-continue`` client waits for before it sends its body."""

    __slots__ = ("_request", "pending")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        expect = request.headers.get("Expect")
        self.pending = (
            expect is not None and expect.lower() == _CONTINUE and request.version == http.HttpVersion11
        )

    async def send(self) -> None:
        """Ask for the body: once admitted, or when admission must read it (a request.json reserve)."""
        if self.pending:
            self.pending = False
            writer = self._request.writer
            await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.output_size = 0  # the interim response is not part of the final one's size

    def final(self, response: web.Response) -> web.Response:
        """A final answer sent without asking for the body: the connection closes after it, since
        the client may or may not send the body it held back (RFC 9110 §10.1.1)."""
        if self.pending:
            response.force_close()
        return response


def _count(metrics: Metrics, refusal: Refusal, peer: object) -> None:
    """Every refused input is counted by its fault and logged at DEBUG only: it is the client's
    mistake, and a louder line would let any client fill the operator's log."""
    metrics.refused_input.labels(refusal.fault.value).inc()
    log.debug("refused a request from %s: %s", peer, refusal.detail)


class HeadWatch:
    """Counts the bytes of one request head as they arrive, up to its blank line."""

    __slots__ = ("ended", "limit", "size", "tail", "timer")

    def __init__(self, limit: int, timer: asyncio.TimerHandle) -> None:
        self.limit = limit
        self.timer = timer
        self.size = 0
        self.tail = b""
        self.ended = False

    def feed(self, data: bytes) -> bool:
        """False once the head is larger than the limit; bytes after its blank line are not counted."""
        if self.ended:
            return True
        if not self.size and data[:1] in (b"\r", b"\n"):
            data = data.lstrip(b"\r\n")  # empty lines before a request line are allowed and skipped
        used = self._through_end(data)
        self.ended = used >= 0
        self.size += used if self.ended else len(data)
        self.tail = (self.tail + data[-3:])[-3:]
        return self.size <= self.limit

    def _through_end(self, data: bytes) -> int:
        """How many bytes of `data` belong to the head if its blank line is in them, else -1."""
        spanning = (self.tail + data[:3]).find(_HEAD_END)
        if spanning >= 0:
            return spanning + len(_HEAD_END) - len(self.tail)
        end = data.find(_HEAD_END)
        return end + len(_HEAD_END) if end >= 0 else -1


class GuardedConnection(web.RequestHandler):
    """aiohttp's connection protocol with a head deadline, a head size cap and problem+json refusals.

    It relies on two attributes of aiohttp's RequestHandler (pinned to aiohttp 3.x, and covered by
    tests/e2e/test_hostile_input.py): ``_waiter`` is pending while the connection waits for its next
    request, and ``_messages`` holds the heads parsed but not yet handled, each with its body
    reader, or a parser refusal. aiohttp's own keep-alive timer reads the same two.
    """

    def __init__(self, manager: web.Server, *, settings: Settings, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._settings = settings
        self._metrics = metrics
        self._head: HeadWatch | None = None
        self._feeding: StreamReader | None = None  # the body of the last head parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        watch = self._head
        if watch is None and self._awaiting_request() and not self._whole_head(data):
            watch = self._watch_head()
        if watch is not None and not watch.feed(data):
            limit = self._settings.max_header_size
            detail = f"the request line and header fields together are larger than {limit} bytes"
            self._refuse(Refusal(Fault.HEADERS_TOO_LARGE, detail))
            return
        super().data_received(data)
        if self._messages:
            self._parsed(watch)

    def _parsed(self, watch: HeadWatch | None) -> None:
        """A head (or a parser refusal) was just queued. aiohttp drops the body it was feeding
        when the parser refuses what follows (a bad chunk mid-body), and that body's reader would
        wait for ever: it gets the parser's error instead, so the upload fails as the client's."""
        if watch is not None:
            self._end_watch()
        message, payload = self._messages[-1]
        error = getattr(message, "exc", None)  # aiohttp queues a refusal as an _ErrInfo
        if error is None:
            self._feeding = payload
        elif self._feeding is not None:
            if not self._feeding.is_eof():
                self._feeding.set_exception(error)
                self._feeding.feed_eof()  # ended, so aiohttp does not read on after the answer
            self._feeding = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._end_watch()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request the parser refused is the client's mistake: say why, log one line, no traceback."""
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        settings = self._settings
        refusal = guard.parser_refusal(exc, settings.max_header_size, settings.max_headers)
        _count(self._metrics, refusal, request.remote)
        return problems.refused_input(refusal)

    def _whole_head(self, data: bytes) -> bool:
        """True when ``data`` starts with a whole request head within the size limit, as a kept-alive
        client's next request usually arrives: then there is nothing to watch, and no timer is
        set and cancelled for it (a cost every request paid). Anything else is watched."""
        if data[:1] in (b"\r", b"\n"):
            return False
        end = data.find(_HEAD_END)
        return end >= 0 and end + len(_HEAD_END) <= self._settings.max_header_size

    def _awaiting_request(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _watch_head(self) -> HeadWatch:
        timer = asyncio.get_running_loop().call_later(self._settings.header_timeout, self._head_timed_out)
        self._head = HeadWatch(self._settings.max_header_size, timer)
        return self._head

    def _end_watch(self) -> None:
        if self._head is not None:
            self._head.timer.cancel()
            self._head = None

    def _head_timed_out(self) -> None:
        watch = self._head
        if watch is None or self.transport is None:
            return
        self._head = None
        if not watch.size:  # nothing sent: an idle new connection, closed without an answer
            self.force_close()
            return
        detail = f"the request head did not arrive within {self._settings.header_timeout:g} seconds"
        self._refuse(Refusal(Fault.HEAD_TIMEOUT, detail))

    def _refuse(self, refusal: Refusal) -> None:
        """Answer on the wire and close: no request is in progress while a head is being watched."""
        self._end_watch()
        peer = self.peername[0] if isinstance(self.peername, tuple) else self.peername
        _count(self._metrics, refusal, peer)
        if self.transport is not None:
            self.transport.write(problems.raw_refused_input(refusal))
        self.force_close()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections are GuardedConnections (aiohttp's TCPSite, with our protocol)."""

    __slots__ = ("_bound", "_host", "_metrics", "_port", "_reuse_port", "_settings")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        settings: Settings,
        metrics: Metrics,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._settings, self._metrics = settings, metrics
        self._bound = 0

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (useful after binding port 0)."""
        return self._bound or self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # set by runner.setup(), which BaseSite's constructor checked
        loop = asyncio.get_running_loop()
        options = {"loop": loop, "access_log": None, **handler_args(self._settings)}

        def connection() -> GuardedConnection:
            return GuardedConnection(server, settings=self._settings, metrics=self._metrics, **options)

        listening = await loop.create_server(
            connection, self._host, self._port, reuse_address=True, reuse_port=self._reuse_port or None
        )
        self._server = listening
        self._bound = int(listening.sockets[0].getsockname()[1])
