"""The upstream client: requests to the sidecar's one upstream, over a pool of kept-alive HTTP/1.1
connections (each an UpstreamConnection, upstream_connection.py).

Why not aiohttp's ClientSession: it serves any URL for any caller (URL objects, cookie jars,
middlewares, traces, redirects, a timer context, request and response objects), which cost a
proxied request about 92 µs, more than all of the sidecar's metering. A proxy talks to one origin
and forwards what it was sent, so this client does only that; ``python -m bench.forward``
measures the two (issue 14).

* At most ``limit`` connections, opened on demand (``upstream_timeout`` to connect, TLS for an
  https:// upstream); a request beyond them waits for one. Idle connections are reused last in,
  first out, so the warmest is used and the others may time out at the upstream; one the
  upstream closed while idle has seen its close (connection_lost) and is dropped, never reused.
* A request goes out in one write, head and body, when the body is absent or already in memory
  (most are: a small body arrives with its head); a body still arriving is relayed as it comes,
  with the framing the client used (Content-Length, else chunked).
* A request sent on a reused connection that closes before any byte of the answer came is sent
  again, once, on a new connection, when that is safe: an idempotent method (RFC 9110 §9.2.2)
  and a body still in hand (none, or one in memory), as aiohttp and other proxies do.
* ``close`` closes every connection, idle or not.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.errors import StaleConnection, UpstreamFailed
from sidecar.http.upstream_connection import UpstreamConnection, chunk

if TYPE_CHECKING:
    from aiohttp.streams import StreamReader

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose requests mean nothing by a body: one without gets no Content-Length: 0 (as aiohttp).
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


@dataclass(frozen=True, slots=True)
class Outbound:
    """One request for the upstream. ``headers`` are what it receives (headers.py); the client
    adds Host when they have none, and the body's framing. ``body`` is None (no body), the whole
    body, or its parts as they come."""

    method: str
    target: str  # path and query exactly as the client sent them
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] | None = None

    @property
    def chunked(self) -> bool:
        """A body framed by chunked coding: the client sent it without Content-Length."""
        return self.body is not None and "Content-Length" not in self.headers

    @property
    def replayable(self) -> bool:
        """Safe to send again: an idempotent method, and a body still in hand."""
        return self.method in IDEMPOTENT and self.streamed is None

    @property
    def streamed(self) -> AsyncIterator[bytes] | None:
        """The body when it is still arriving (a bytes check: an ABC isinstance costs more)."""
        body = self.body
        return None if body is None or isinstance(body, bytes) else body


class Answer:
    """The upstream's answer: status and fields at once, the body as it comes. ``release`` (always
    call it) hands the connection back, or closes it when the exchange did not end cleanly."""

    __slots__ = ("_body", "_connection", "_pool", "headers", "reason", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        connection: UpstreamConnection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        body: StreamReader,
    ) -> None:
        self._pool = pool
        self._connection: UpstreamConnection | None = connection
        self.status = status
        self.reason = reason
        self.headers = headers
        self._body = body

    def whole(self, limit: int) -> bytes | None:
        """The whole body when it has all arrived already and is at most ``limit`` bytes, else None
        (then ``read`` it)."""
        body = self._body
        if body.is_eof() and body.total_bytes <= limit and body.exception() is None:
            return body.read_nowait(-1)
        return None

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body; b"" at its end. UpstreamFailed when the upstream broke
        off, TimeoutError when it fell silent."""
        return await self._body.read(size)

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if not self._body.is_eof() or (connection.upload is not None and not connection.upload.done()):
            connection.drop()  # bytes of this exchange would still come, or still be owed
        connection.upload = None
        self._pool.put_back(connection)


class UpstreamPool:
    def __init__(
        self, upstream: str, timeout: float, limit: int, *, tls: ssl.SSLContext | None = None
    ) -> None:
        """``tls``: how an https:// upstream is verified; the system's roots and its host name by
        default, as aiohttp's ClientSession does."""
        url = URL(upstream)
        assert url.host is not None and url.port is not None  # settings.parse_http_url checked it
        self._address = (url.host, url.port)
        self._ssl = (tls or ssl.create_default_context()) if url.scheme == "https" else None
        self._prefix = url.raw_path.rstrip("/")  # a path the upstream URL names goes before every target
        self._host = url.host_port_subcomponent or url.host
        self._timeout = timeout
        self._limit = limit
        self._open: set[UpstreamConnection] = set()  # every connection, idle, busy or opening
        self._opening = 0
        self._idle: list[UpstreamConnection] = []
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def send(self, outbound: Outbound) -> Answer:
        """Send ``outbound`` and wait for the head of its answer. Raises UpstreamFailed (could not
        connect, or the connection broke before the answer), UploadFailed (the client's body
        failed), TimeoutError (the upstream took longer than the timeout)."""
        data = self._head(outbound)
        connection, reused = await self._acquire()
        try:
            return await self._exchange(connection, outbound, data)
        except StaleConnection:
            if not (reused and outbound.replayable):
                raise
        return await self._exchange(await self._connect(), outbound, data)  # once, on a new connection

    def put_back(self, connection: UpstreamConnection) -> None:
        """A connection done with its exchange: kept for the next if fit, else closed."""
        if connection.usable and not self._closed:
            self._idle.append(connection)
        else:
            self._forget(connection)
        self._wake()

    async def close(self) -> None:
        """Close every connection and wait until they are closed (bounded: a second at most)."""
        self._closed = True
        self._idle.clear()
        connections = list(self._open)
        for connection in connections:
            connection.drop()
        if connections:
            await asyncio.wait([connection.lost for connection in connections], timeout=1.0)
        self._open.clear()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def connections(self) -> int:
        return len(self._open) + self._opening

    # --- one exchange -------------------------------------------------------------------------------

    def _head(self, outbound: Outbound) -> bytes:
        """The request line and fields, and the whole body when it is in memory, as one bytes."""
        headers = outbound.headers
        if "Host" not in headers:
            headers = CIMultiDict([("Host", self._host), *headers.items()])
        body = outbound.body
        if body is None:
            if outbound.method not in _BODILESS and "Content-Length" not in headers:
                headers["Content-Length"] = "0"
        elif outbound.chunked:
            headers["Transfer-Encoding"] = "chunked"
            if isinstance(body, bytes):
                body = chunk(body) + b"0\r\n\r\n" if body else b"0\r\n\r\n"
        head = _serialize_headers(f"{outbound.method} {self._prefix}{outbound.target} HTTP/1.1", headers)
        return head + body if isinstance(body, bytes) else head

    async def _exchange(self, connection: UpstreamConnection, outbound: Outbound, data: bytes) -> Answer:
        streamed = outbound.streamed
        head = outbound.method == "HEAD"
        try:
            answer = connection.request(data, streamed, chunked=outbound.chunked, head=head)
            message, payload = await answer
        except BaseException:
            connection.drop()
            self.put_back(connection)
            raise
        return Answer(self, connection, message.code, message.reason, message.headers, payload)

    # --- the pool -----------------------------------------------------------------------------------

    async def _acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection, and whether it served before."""
        while True:
            while self._idle:
                connection = self._idle.pop()
                if connection.usable:
                    return connection, True
                self._forget(connection)
            if self.connections < self._limit:
                return await self._connect(), False
            await self._wait_turn()

    async def _wait_turn(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # the turn it was given goes to the next in line
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self) -> UpstreamConnection:
        if self._closed:
            raise UpstreamFailed("the sidecar is shutting down")
        loop = asyncio.get_running_loop()
        host, port = self._address
        self._opening += 1
        try:
            async with asyncio.timeout(self._timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self._timeout),
                    host,
                    port,
                    ssl=self._ssl,
                )
        except BaseException as error:
            self._opening -= 1
            self._wake()  # the place it held is free
            if isinstance(error, OSError) and not isinstance(error, TimeoutError):
                raise UpstreamFailed(f"cannot connect to the upstream: {error.strerror or error}") from error
            raise
        self._opening -= 1
        self._open.add(connection)
        return connection

    def _forget(self, connection: UpstreamConnection) -> None:
        self._open.discard(connection)
        connection.drop()
