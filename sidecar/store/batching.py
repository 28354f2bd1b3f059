"""Coalesced script calls: the EVALSHAs issued in one event-loop turn travel as one round trip.

Why: every admitted request makes one EVALSHA, and at 50 requests in flight redis-py's own round
trip (pool checkout and release, packing, three timers, a task wake-up per reply) cost the sidecar
about 147 µs of CPU per call against 33 µs when 50 calls share one pipeline (BENCHMARKS.md, "The
store call alone"). Redis was never the limit; the client was. So the calls a loop turn produces
are written together to one connection, and their replies are read back from one buffer.

What does not change:

* Each call is still its own EVALSHA of its own atomic script. Redis runs the scripts of a
  pipeline one after another, exactly as it would run them from separate connections, so every
  guarantee of a script (all-or-nothing, exact counts) holds call by call.
* Nothing is retried, except a call whose reply is NOSCRIPT: that reply says the script did not
  run, so the script is loaded (SCRIPT LOAD, on the same connection, ahead of the resend) and
  only that call is sent again, once. Any other error reply fails that call alone.
* Every batch gets one deadline (the store timeout) from the moment it is flushed. When it passes,
  each of the batch's calls still waiting raises StoreUnavailable, and the connection is closed:
  a reply that late says nothing about whether a script ran, and a connection that is behind
  must not answer later calls with earlier replies. A lost connection fails every call waiting on
  it the same way. Calls are never left waiting past their deadline.

The connection is opened once and kept (``connect()`` opens it at startup, so the first burst of
requests does not meet a cold pool); when it is lost, the next batch opens another, one attempt
at a time, under its own connect timeout. A batch that waits for that connection keeps its own
deadline; a connect slower than one batch's deadline still completes for the batches after it.
Replies are parsed by hiredis.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import RedisSSLContext, SSLConnection, UnixDomainSocketConnection

from sidecar.errors import StoreUnavailable

log = logging.getLogger("sidecar.store")

# Opening a connection may take longer than one call's bound (a TLS handshake on a busy core): the
# attempt is not cancelled when a batch's deadline passes, only by this.
CONNECT_TIMEOUT = 2.0
CLIENT_NAME = "sidecar-batch"
Arg = str | int | float | bytes


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script known to a batcher; calling it queues one EVALSHA for this loop turn.

    ``script(keys, args)`` returns a future for the script's reply; it raises StoreUnavailable
    when the store does not answer within the batch's deadline or answers with an error.
    """

    batcher: ScriptBatcher
    source: str
    sha: str

    def __call__(self, keys: Sequence[str] = (), args: Sequence[Arg] = ()) -> asyncio.Future[Any]:
        return self.batcher.call(self, keys, args)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the store is and how to open a connection to it (from a redis-py pool's settings)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    @classmethod
    def of_pool(cls, pool: aioredis.ConnectionPool) -> Endpoint:
        kwargs = pool.connection_kwargs
        kind = pool.connection_class
        return cls(
            host=kwargs.get("host") or "127.0.0.1",
            port=int(kwargs.get("port") or 6379),
            path=kwargs.get("path") if issubclass(kind, UnixDomainSocketConnection) else None,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=_tls_context(kwargs) if issubclass(kind, SSLConnection) else None,
        )

    def handshake(self) -> list[tuple[Arg, ...]]:
        """The commands a new connection sends before any script call."""
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            user = (self.username,) if self.username else ()
            commands.append(("AUTH", *user, self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        commands.append(("CLIENT", "SETNAME", CLIENT_NAME))
        return commands


def _tls_context(kwargs: dict[str, Any]) -> ssl.SSLContext:
    """The same TLS settings redis-py's own SSLConnection would use for this URL."""
    context = RedisSSLContext(
        keyfile=kwargs.get("ssl_keyfile"),
        certfile=kwargs.get("ssl_certfile"),
        cert_reqs=kwargs.get("ssl_cert_reqs", "required"),
        ca_certs=kwargs.get("ssl_ca_certs"),
        ca_data=kwargs.get("ssl_ca_data"),
        check_hostname=kwargs.get("ssl_check_hostname", True),
        min_version=kwargs.get("ssl_min_version"),
        ciphers=kwargs.get("ssl_ciphers"),
    )
    return context.get()


class ScriptBatcher:
    """Queues script calls and writes each loop turn's calls to one connection as one pipeline.

    ``round_trips`` counts the pipelines written (a NOSCRIPT resend is not one: it rides on the
    connection's next read) and ``calls`` the script calls queued; the ratio is the batching.
    """

    def __init__(self, endpoint: Endpoint, *, timeout: float, connect_timeout: float = CONNECT_TIMEOUT):
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.scripts: dict[str, Script] = {}
        self.round_trips = 0
        self.calls = 0
        self._queue: list[_Call] = []
        self._link: _Link | None = None
        self._opening: asyncio.Task[_Link] | None = None
        self._waiting: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def of_client(cls, client: aioredis.Redis, *, timeout: float) -> ScriptBatcher:
        """A batcher for the server a redis-py client talks to (it opens its own connection)."""
        return cls(Endpoint.of_pool(client.connection_pool), timeout=timeout)

    @classmethod
    def of_url(cls, url: str, *, timeout: float) -> ScriptBatcher:
        return cls(Endpoint.of_pool(aioredis.ConnectionPool.from_url(url)), timeout=timeout)

    def register(self, source: str) -> Script:
        sha = hashlib.sha1(source.encode()).hexdigest()
        script = self.scripts.setdefault(sha, Script(self, source, sha))
        return script

    def call(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Queue one EVALSHA for this loop turn's pipeline; the future holds its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(StoreUnavailable("the store client is closed"))
            return future
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append(_Call(future, script, _evalsha(script.sha, keys, args)))
        self.calls += 1
        return future

    async def connect(self) -> None:
        """Open the connection now (at startup), so the first requests find it open."""
        await self._connected()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._waiting):
            task.cancel()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self._link is not None:
            self._link.close("the store client was closed", quiet=True)
            self._link = None
        _fail(self._queue, "the store client was closed")
        self._queue = []

    # -- one batch ------------------------------------------------------------------------------

    def _flush(self) -> None:
        calls, self._queue = self._queue, []
        if not calls:
            return
        loop = asyncio.get_running_loop()
        batch = _Batch(calls)
        batch.timer = loop.call_at(loop.time() + self.timeout, self._expire, batch)
        link = self._link
        if link is not None and link.open:
            self._send(link, batch)
            return
        task = loop.create_task(self._send_when_connected(batch))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    def _send(self, link: _Link, batch: _Batch) -> None:
        calls = [call for call in batch.calls if not call.future.done()]  # expired, or caller gone
        batch.sent(link, len(calls))
        if calls:
            link.send(calls, b"".join(call.command for call in calls))
            self.round_trips += 1

    async def _send_when_connected(self, batch: _Batch) -> None:
        try:
            link = await asyncio.shield(self._connected())
        except StoreUnavailable as error:
            batch.fail(str(error))
            return
        self._send(link, batch)

    def _expire(self, batch: _Batch) -> None:
        if batch.settled:
            return
        batch.fail(f"the store did not answer within {self.timeout:g}s")
        link = batch.link
        if link is not None:
            link.close("a reply was late; the connection is behind")  # later replies would mismatch
            if self._link is link:
                self._link = None

    # -- the connection -------------------------------------------------------------------------

    async def _connected(self) -> _Link:
        if self._link is not None and self._link.open:
            return self._link
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(self._open())
        return await asyncio.shield(self._opening)

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        link: _Link | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if endpoint.path is not None:
                    _, link = await loop.create_unix_connection(_Link, endpoint.path)
                else:
                    _, link = await loop.create_connection(
                        _Link, endpoint.host, endpoint.port, ssl=endpoint.tls
                    )
                await link.prepare(endpoint.handshake(), self.scripts.values())
        except (OSError, TimeoutError, StoreUnavailable) as error:
            if link is not None:
                link.close("the connection could not be prepared")
            raise StoreUnavailable(f"cannot open a store connection: {_describe(error)}") from error
        self._link = link
        return link


class _Call:
    __slots__ = ("batch", "command", "future", "resent", "script")

    def __init__(self, future: asyncio.Future[Any], script: Script, command: bytes) -> None:
        self.future = future
        self.script = script
        self.command = command
        self.resent = False
        self.batch: _Batch | None = None

    def settle(self, reply: Any, link: _Link) -> None:
        future = self.future
        if not future.done():  # else its batch expired, or its caller went away
            if isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith("NOSCRIPT") and not self.resent:
                    self.resent = True  # the script did not run: load it and send this call again
                    link.resend(self)
                    return
                future.set_exception(StoreUnavailable(f"the store refused a script call: {reply}"))
            else:
                future.set_result(reply)
        if self.batch is not None:
            self.batch.one_settled()


class _Control:
    """A reply the connection itself waits for (handshake, SCRIPT LOAD)."""

    __slots__ = ("future", "on_reply")

    def __init__(self, future: asyncio.Future[Any] | None = None, on_reply: Any = None) -> None:
        self.future = future
        self.on_reply = on_reply

    def settle(self, reply: Any, link: _Link) -> None:
        if self.on_reply is not None:
            self.on_reply(reply)
        if self.future is None or self.future.done():
            return
        if isinstance(reply, hiredis.ReplyError):
            self.future.set_exception(StoreUnavailable(f"the store refused: {reply}"))
        else:
            self.future.set_result(reply)


class _Batch:
    """The calls of one loop turn, their deadline, and how many of those sent await a reply."""

    __slots__ = ("calls", "link", "open_calls", "timer")

    def __init__(self, calls: list[_Call]) -> None:
        self.calls = calls
        self.open_calls = len(calls)
        self.link: _Link | None = None
        self.timer: asyncio.TimerHandle | None = None
        for call in calls:
            call.batch = self

    @property
    def settled(self) -> bool:
        return self.open_calls <= 0

    def sent(self, link: _Link, count: int) -> None:
        self.link = link
        self.open_calls = count
        if count == 0 and self.timer is not None:
            self.timer.cancel()

    def one_settled(self) -> None:
        self.open_calls -= 1
        if self.open_calls <= 0 and self.timer is not None:
            self.timer.cancel()

    def fail(self, reason: str) -> None:
        self.open_calls = 0
        if self.timer is not None:
            self.timer.cancel()
        _fail(self.calls, reason)


class _Link(asyncio.Protocol):
    """One connection: writes pipelines, and hands each reply to the entry waiting first."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.reader = hiredis.Reader()
        self.pending: collections.deque[_Call | _Control] = collections.deque()
        self.loading: set[str] = set()  # SCRIPT LOADs sent whose reply has not come yet
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is no asyncio.Transport
        self.open = True

    async def prepare(self, handshake: list[tuple[Arg, ...]], scripts: Iterable[Script]) -> None:
        """Send the handshake and load every known script; wait for every reply to be OK."""
        loop = asyncio.get_running_loop()
        replies: list[asyncio.Future[Any]] = []
        for command in [*handshake, *(("SCRIPT", "LOAD", s.source) for s in scripts)]:
            future: asyncio.Future[Any] = loop.create_future()
            replies.append(future)
            self._write(_command(command), _Control(future))
        await asyncio.gather(*replies)

    def send(self, calls: list[_Call], data: bytes) -> None:
        if self.transport is None:
            raise AssertionError("send before the connection was made")
        self.pending.extend(calls)
        self.transport.write(data)

    def resend(self, call: _Call) -> None:
        """Send a call again after NOSCRIPT, behind a SCRIPT LOAD unless one is on its way."""
        sha = call.script.sha
        if sha not in self.loading:
            self.loading.add(sha)
            load = _command(("SCRIPT", "LOAD", call.script.source))
            self._write(load, _Control(on_reply=self._loaded(sha)))
        self._write(call.command, call)

    def _loaded(self, sha: str) -> Any:
        return lambda reply: self.loading.discard(sha)

    def _write(self, data: bytes, entry: _Call | _Control) -> None:
        if self.transport is None or not self.open:
            raise StoreUnavailable("the store connection is closed")
        self.pending.append(entry)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if not self.pending:
                    self.close("a reply came that nothing waited for")
                    return
                self.pending.popleft().settle(reply, self)
        except hiredis.ProtocolError:
            self.close("the store's reply could not be parsed")

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail_pending("the store connection was lost" + (f" ({_describe(exc)})" if exc else ""))

    def close(self, reason: str, *, quiet: bool = False) -> None:
        if self.open and not quiet:
            log.warning("closing the store connection: %s", reason)
        self.open = False
        if self.transport is not None:
            self.transport.abort()
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        pending, self.pending = self.pending, collections.deque()
        for entry in pending:
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(StoreUnavailable(reason))
            if isinstance(entry, _Call) and entry.batch is not None:
                entry.batch.one_settled()


def _fail(calls: Iterable[_Call], reason: str) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(StoreUnavailable(reason))


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


# -- RESP ---------------------------------------------------------------------------------------


def _encode(value: Arg | None) -> bytes:
    """An argument as redis-py would send it: str as UTF-8, numbers in decimal, bytes as they are."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode()
    raise TypeError(f"a script argument must be str, int, float or bytes, not {type(value).__name__}")


def _bulk(value: Arg | None) -> bytes:
    data = _encode(value)
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _command(parts: Sequence[Arg | None]) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)


def _evalsha(sha: str, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
    """EVALSHA sha numkeys key... arg... in RESP, in one pass (the common types inline: this runs
    once per request, and a call per argument costs more than the encoding)."""
    out = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + len(args), sha.encode())]
    out.append(_bulk(len(keys)))
    for key in keys:
        data = key.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    for value in args:
        if type(value) is str:
            data = value.encode()
        elif type(value) is int:
            data = b"%d" % value
        else:
            data = _encode(value)
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
