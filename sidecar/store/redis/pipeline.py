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
* A call of a script registered ``named`` carries its name as its last three ARGV, stamped when it
  is written to a connection: the connection's random token, the call's sequence number on it,
  and the number of the last reply read on it. The metering scripts keep a record of each call
  that wrote until a later call says its reply was read (lib.lua remember_call); a named call
  whose reply never comes raises OutcomeUnknown with its name, so the journal can look it up.
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

Which server takes a call is the locator's answer (topology.py): the one server, the master the
sentinels name, or the master of the call's cluster slot. With a cluster, a loop turn's calls are
grouped by master, one pipeline and one connection per master, under the batch's one deadline. A
MOVED or ASK reply says the script did not run, so the call is sent once more, where the reply
points. A READONLY reply (a master demoted by a failover) fails the call and makes the locator
ask again, as a lost connection does.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import secrets
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from sidecar.errors import OutcomeUnknown, StoreUnavailable, UnansweredCall
from sidecar.store.redis.topology import Arg, Endpoint, Locator, Topology

log = logging.getLogger("sidecar.store")

# Opening a connection may take longer than one call's bound (a TLS handshake on a busy core): the
# attempt is not cancelled when a batch's deadline passes, only by this.
CONNECT_TIMEOUT = 2.0
CLIENT_NAME = "sidecar-batch"
NAME_ARGS = 3  # a named call's name: connection token, sequence number, last reply read


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script known to a batcher; calling it queues one EVALSHA for this loop turn.

    ``script(keys, args)`` returns a future for the script's reply; it raises StoreUnavailable
    when the store does not answer within the batch's deadline or answers with an error
    (OutcomeUnknown when the call was written and is ``named``: it may have run).
    """

    batcher: ScriptBatcher
    source: str
    sha: str
    named: bool = False  # each call carries its name as its last three ARGV (see the module's doc)

    def __call__(self, keys: Sequence[str] = (), args: Sequence[Arg] = ()) -> asyncio.Future[Any]:
        return self.batcher.call(self, keys, args)


class ScriptBatcher:
    """Queues script calls and writes each loop turn's calls as one pipeline per server.

    ``round_trips`` counts the pipelines written (a resend after NOSCRIPT, MOVED or ASK is not
    one: it rides on a connection's next read) and ``calls`` the script calls queued; the ratio
    is the batching.
    """

    def __init__(self, locator: Locator, *, timeout: float, connect_timeout: float = CONNECT_TIMEOUT):
        self.locator = locator
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.scripts: dict[str, Script] = {}
        self.round_trips = 0
        self.calls = 0
        self._queue: list[_Call] = []
        self._links: dict[Endpoint, _Link] = {}
        self._opening: dict[Endpoint, asyncio.Task[_Link]] = {}
        self._learning: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def of_url(cls, url: str, *, timeout: float) -> ScriptBatcher:
        """A batcher for the store a --redis URL names (it opens its own connections)."""
        return cls(Topology.parse(url).locator(timeout), timeout=timeout)

    def register(self, source: str, *, named: bool = False) -> Script:
        sha = hashlib.sha1(source.encode()).hexdigest()
        script = self.scripts.setdefault(sha, Script(self, source, sha, named))
        if script.named != named:
            raise ValueError("a script is registered either named or not, never both")
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
        slot = key_slot(keys[0].encode()) if keys and self.locator.sharded else 0
        command = _evalsha(script.sha, keys, args, NAME_ARGS if script.named else 0)
        self._queue.append(_Call(future, script, command, slot))
        self.calls += 1
        return future

    async def connect(self) -> None:
        """Find the servers and open a connection to each now (at startup), so the first
        requests find them open."""
        await self._learn()
        if not self.locator.sharded:
            await self._connected(self._endpoint(0))
            return
        masters = {self.locator.endpoint(slot) for slot in range(REDIS_CLUSTER_HASH_SLOTS)} - {None}
        await asyncio.gather(*(self._connected(cast(Endpoint, master)) for master in masters))

    async def close(self) -> None:
        self._closed = True
        for task in [*self._waiting, *self._opening.values(), *([self._learning] if self._learning else [])]:
            task.cancel()
        for link in list(self._links.values()):
            link.close("the store client was closed", quiet=True)
        self._links.clear()
        _fail(self._queue, "the store client was closed")
        self._queue = []
        await self.locator.close()

    # -- one batch ------------------------------------------------------------------------------

    def _flush(self) -> None:
        calls, self._queue = self._queue, []
        if not calls:
            return
        loop = asyncio.get_running_loop()
        batch = _Batch(calls)
        batch.timer = loop.call_at(loop.time() + self.timeout, self._expire, batch)
        if not self.locator.sharded:
            self._dispatch(self.locator.endpoint(0), batch, calls)
            return
        for endpoint, group in self._by_server(calls).items():
            self._dispatch(endpoint, batch, group)

    def _by_server(self, calls: list[_Call]) -> dict[Endpoint | None, list[_Call]]:
        groups: dict[Endpoint | None, list[_Call]] = {}
        endpoint = self.locator.endpoint
        for call in calls:
            groups.setdefault(endpoint(call.slot), []).append(call)
        return groups

    def _dispatch(self, endpoint: Endpoint | None, batch: _Batch, calls: list[_Call]) -> None:
        link = self._links.get(endpoint) if endpoint is not None else None
        if link is not None and link.open:
            self._send(link, batch, calls)
        else:
            self._later(self._send_when_ready(endpoint, batch, calls))

    def _send(self, link: _Link, batch: _Batch, calls: list[_Call]) -> None:
        live = []
        for call in calls:
            if call.future.done():  # expired, or its caller went away
                call.finish()
            else:
                live.append(call)
        if live:
            batch.links.append(link)
            link.send(live)
            self.round_trips += 1

    async def _send_when_ready(self, endpoint: Endpoint | None, batch: _Batch, calls: list[_Call]) -> None:
        try:
            if endpoint is None:
                await self._learn()
                for known, group in self._by_server(calls).items():
                    if known is None:
                        _fail(group, "no server of the store serves this key's slot")
                    else:
                        self._dispatch(known, batch, group)
                return
            link = await self._connected(endpoint)
        except StoreUnavailable as error:
            _fail(calls, str(error))
            return
        self._send(link, batch, calls)

    def _expire(self, batch: _Batch) -> None:
        if batch.settled:
            return
        behind = [link for link in batch.links if link.waits_for(batch)]
        batch.fail(f"the store did not answer within {self.timeout:g}s")
        for link in behind:
            link.close("a reply was late; the connection is behind")  # later replies would mismatch

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    # -- redirects --------------------------------------------------------------------------------

    def redirect(self, call: _Call, link: _Link, reply: str) -> None:
        """Send a call once more where a MOVED or ASK reply points (the script did not run)."""
        kind, slot, address = reply.split(" ", 2)
        host, _, port = address.rpartition(":")
        asking = kind == "ASK"
        if asking:
            target = link.endpoint.at(host, int(port))
        else:
            target = self.locator.moved(int(slot), host, int(port))
        self._later(self._redirect_when_connected(target, call, asking))

    async def _redirect_when_connected(self, target: Endpoint, call: _Call, asking: bool) -> None:
        try:
            link = await self._connected(target)
        except StoreUnavailable as error:
            call.fail(str(error))
            return
        if call.future.done():  # its batch expired meanwhile: it was answered "did not run"
            call.finish()
            return
        try:
            link.redirected(call, asking)
        except StoreUnavailable as error:  # the connection closed while this task waited
            call.fail(str(error))

    # -- the connections ------------------------------------------------------------------------

    def _endpoint(self, slot: int) -> Endpoint:
        endpoint = self.locator.endpoint(slot)
        if endpoint is None:
            raise StoreUnavailable("the store's topology is not known")
        return endpoint

    async def _learn(self) -> None:
        """Ask the topology where calls go (one question at a time, shared by every waiter)."""
        if self._learning is None or self._learning.done():
            self._learning = asyncio.get_running_loop().create_task(self.locator.learn(self._ask))
        await asyncio.shield(self._learning)

    async def _ask(self, endpoint: Endpoint, command: tuple[Arg, ...]) -> Any:
        link = await self._connected(endpoint)
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await link.control(command)
        except TimeoutError as error:
            raise StoreUnavailable(f"{endpoint.address} did not answer {command[0]!r}") from error

    async def _connected(self, endpoint: Endpoint) -> _Link:
        link = self._links.get(endpoint)
        if link is not None and link.open:
            return link
        opening = self._opening.get(endpoint)
        if opening is None or opening.done():
            opening = self._opening[endpoint] = asyncio.get_running_loop().create_task(self._open(endpoint))
        return await asyncio.shield(opening)

    async def _open(self, endpoint: Endpoint) -> _Link:
        loop = asyncio.get_running_loop()
        link: _Link | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if endpoint.path is not None:
                    _, link = await loop.create_unix_connection(lambda: _Link(self, endpoint), endpoint.path)
                else:
                    _, link = await loop.create_connection(
                        lambda: _Link(self, endpoint), endpoint.host, endpoint.port, ssl=endpoint.tls
                    )
                await link.prepare(endpoint.handshake(CLIENT_NAME), self.scripts.values())
        except (OSError, TimeoutError, StoreUnavailable) as error:
            if link is not None:
                link.close("the connection could not be prepared")
            self.locator.forget()
            reason = f"cannot open a store connection to {endpoint.address}: {_describe(error)}"
            raise StoreUnavailable(reason) from error
        self._links[endpoint] = link
        return link

    def lost(self, link: _Link, *, stale: bool) -> None:
        """A connection closed: forget it; ``stale`` when where calls go may have changed."""
        if self._links.get(link.endpoint) is link:
            del self._links[link.endpoint]
        if stale:
            self.locator.forget()


class _Call:
    """One script call; ``command`` is its EVALSHA without its name, which ``token`` and ``seq``
    hold once a named call has been written (seq 0: not written, or answered that it did not run)."""

    __slots__ = (
        "batch",
        "command",
        "finished",
        "future",
        "redirected",
        "resent",
        "script",
        "seq",
        "slot",
        "token",
    )

    def __init__(self, future: asyncio.Future[Any], script: Script, command: bytes, slot: int) -> None:
        self.future = future
        self.script = script
        self.command = command
        self.slot = slot
        self.resent = False
        self.redirected = False
        self.finished = False
        self.batch: _Batch | None = None
        self.token = ""
        self.seq = 0

    def settle(self, reply: Any, link: _Link) -> None:
        future = self.future
        if not future.done():  # else its batch expired, or its caller went away
            if isinstance(reply, hiredis.ReplyError):
                if self._retried(str(reply), link):
                    return
                future.set_exception(StoreUnavailable(f"the store refused a script call: {reply}"))
            else:
                future.set_result(reply)
        self.finish()

    def _retried(self, error: str, link: _Link) -> bool:
        """Send the call once more if the reply says its script did not run and where to go."""
        if error.startswith("NOSCRIPT") and not self.resent:
            self.resent = True  # load the script and send this call again
            self.seq = 0  # this attempt did not run; the resend is named anew
            link.resend(self)
            return True
        if error.startswith(("MOVED ", "ASK ")) and not self.redirected:
            self.redirected = True
            self.seq = 0
            try:
                link.owner.redirect(self, link, error)
            except StoreUnavailable as refused:
                self.fail(str(refused))
            return True
        # A master a failover demoted: ask where the master is now. Redis 6 wraps the error of a
        # script's write ("ERR Error running script ... -READONLY ..."), Redis 7 passes it as is.
        if error.startswith("READONLY") or "-READONLY " in error:
            link.close("the server is a replica now (READONLY)", stale=True)
        return False

    def fail(self, reason: str) -> None:
        if self.finished:  # answered already (a batch fails all of its calls that are not)
            return
        if not self.future.done():
            if self.seq:  # written, and no reply read: the script may have run
                error: StoreUnavailable = OutcomeUnknown(reason, UnansweredCall(self.token, self.seq))
            else:
                error = StoreUnavailable(reason)
            self.future.set_exception(error)
        self.finish()

    def finish(self) -> None:
        """Counted once, however the call ends: its batch's deadline ends when every call has."""
        if not self.finished:
            self.finished = True
            if self.batch is not None:
                self.batch.one_settled()


class _Control:
    """A reply the connection itself waits for (handshake, SCRIPT LOAD, CLUSTER SLOTS, ASKING)."""

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

    def fail(self, reason: str) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(StoreUnavailable(reason))


class _Batch:
    """The calls of one loop turn, their deadline, the connections they went out on, and how many
    have not ended yet."""

    __slots__ = ("calls", "links", "open_calls", "timer")

    def __init__(self, calls: list[_Call]) -> None:
        self.calls = calls
        self.open_calls = len(calls)
        self.links: list[_Link] = []
        self.timer: asyncio.TimerHandle | None = None
        for call in calls:
            call.batch = self

    @property
    def settled(self) -> bool:
        return self.open_calls <= 0

    def one_settled(self) -> None:
        self.open_calls -= 1
        if self.open_calls <= 0 and self.timer is not None:
            self.timer.cancel()

    def fail(self, reason: str) -> None:
        _fail(self.calls, reason)


class _Link(asyncio.Protocol):
    """One connection to one server: writes pipelines, and hands each reply to the entry waiting
    first."""

    def __init__(self, owner: ScriptBatcher, endpoint: Endpoint) -> None:
        self.owner = owner
        self.endpoint = endpoint
        self.transport: asyncio.WriteTransport | None = None
        self.reader = hiredis.Reader()
        self.pending: collections.deque[_Call | _Control] = collections.deque()
        self.loading: set[str] = set()  # SCRIPT LOADs sent whose reply has not come yet
        self.open = False
        # The names of the named calls written here: a token no other connection has, the last
        # sequence number given, and the last one whose reply was read.
        self.token = secrets.token_hex(8)
        self._token_arg = _bulk(self.token)
        self.seq = 0
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is no asyncio.Transport
        self.open = True

    async def prepare(self, handshake: list[tuple[Arg, ...]], scripts: Iterable[Script]) -> None:
        """Send the handshake and load every known script; wait for every reply to be OK."""
        commands = [*handshake, *(("SCRIPT", "LOAD", s.source) for s in scripts)]
        await asyncio.gather(*(self.control(command) for command in commands))

    def control(self, command: tuple[Arg, ...]) -> asyncio.Future[Any]:
        """Send one command of the connection's own; the future holds its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._write(_command(command), _Control(future))
        return future

    def send(self, calls: list[_Call]) -> None:
        if self.transport is None:
            raise AssertionError("send before the connection was made")
        self.pending.extend(calls)
        self.transport.write(b"".join([self._named(call) for call in calls]))

    def _named(self, call: _Call) -> bytes:
        """The call's command as written here: a named call gets its name appended."""
        if not call.script.named:
            return call.command
        self.seq = seq = self.seq + 1
        call.token, call.seq = self.token, seq
        seq_digits, answered_digits = b"%d" % seq, b"%d" % self.answered
        return b"%s%s$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            call.command,
            self._token_arg,
            len(seq_digits),
            seq_digits,
            len(answered_digits),
            answered_digits,
        )

    def resend(self, call: _Call) -> None:
        """Send a call again after NOSCRIPT, behind a SCRIPT LOAD unless one is on its way."""
        sha = call.script.sha
        if sha not in self.loading:
            self.loading.add(sha)
            load = _command(("SCRIPT", "LOAD", call.script.source))
            self._write(load, _Control(on_reply=self._loaded(sha)))
        self._write(self._named(call), call)

    def redirected(self, call: _Call, asking: bool) -> None:
        """Take a call another server redirected here; ASK: only for this one call."""
        if call.batch is not None:
            call.batch.links.append(self)
        if asking:
            self._write(_command(("ASKING",)), _Control())
        self._write(self._named(call), call)

    def waits_for(self, batch: _Batch) -> bool:
        return any(isinstance(entry, _Call) and entry.batch is batch for entry in self.pending)

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
            while self.open and (reply := reader.gets()) is not False:
                if not self.pending:
                    self.close("a reply came that nothing waited for")
                    return
                entry = self.pending.popleft()
                if type(entry) is _Call and entry.seq:
                    self.answered = entry.seq  # replies come in the order the calls were written
                entry.settle(reply, self)
        except hiredis.ProtocolError:
            self.close("the store's reply could not be parsed")

    def connection_lost(self, exc: Exception | None) -> None:
        lost_by_the_server = self.open  # not closed by us: the server went away, or a failover began
        self.open = False
        self.owner.lost(self, stale=lost_by_the_server)
        self._fail_pending("the store connection was lost" + (f" ({_describe(exc)})" if exc else ""))

    def close(self, reason: str, *, quiet: bool = False, stale: bool = False) -> None:
        """Close from our side; ``stale`` when where calls go may have changed with it."""
        if self.open and not quiet:
            log.warning("closing the store connection to %s: %s", self.endpoint.address, reason)
        self.open = False
        self.owner.lost(self, stale=stale)
        if self.transport is not None:
            self.transport.abort()
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        pending, self.pending = self.pending, collections.deque()
        for entry in pending:
            entry.fail(reason)


def _fail(calls: Iterable[_Call], reason: str) -> None:
    for call in calls:
        call.fail(reason)


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


def _evalsha(sha: str, keys: Sequence[str], args: Sequence[Arg], appended: int = 0) -> bytes:
    """EVALSHA sha numkeys key... arg... in RESP, in one pass (the common types inline: this runs
    once per request, and a call per argument costs more than the encoding); the array's length
    counts ``appended`` more arguments, written after these (a named call's name)."""
    length = 3 + len(keys) + len(args) + appended
    out = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (length, sha.encode())]
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
