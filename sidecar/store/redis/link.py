"""One connection of the script batcher (pipeline.py), and what waits on it.

A ``Link`` is an asyncio Protocol: it writes a batch's calls as one pipeline and hands each reply
hiredis parses to the entry that has waited longest (replies come in the order the commands were
written). An entry is a ``Call`` (one script call of a ``Batch``, the calls of one loop turn
under one deadline) or a ``Control`` (a command of the connection's own: the handshake, SCRIPT
LOAD, CLUSTER SLOTS, ASKING). The link names each call of a named script as it writes it (the
connection's token, the call's sequence number, the last reply read); pipeline.py's docstring
says why. What to do with a lost connection or a redirect is the batcher's (``Owner``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Iterable
from typing import Any, Protocol, cast

import hiredis

from sidecar.errors import OutcomeUnknown, StoreUnavailable, UnansweredCall
from sidecar.store.redis import resp
from sidecar.store.redis.topology import Arg, Endpoint

log = logging.getLogger("sidecar.store")


class ScriptSource(Protocol):
    """What a connection needs of a script (pipeline.Script): to load it, and to name its calls."""

    @property
    def source(self) -> str: ...

    @property
    def sha(self) -> str: ...

    @property
    def named(self) -> bool: ...


class Owner(Protocol):
    """The batcher a connection reports to (pipeline.ScriptBatcher)."""

    def lost(self, link: Link, *, stale: bool) -> None:
        """The connection closed; ``stale`` when where calls go may have changed."""

    def redirect(self, call: Call, link: Link, reply: str) -> None:
        """Send a call once more where a MOVED or ASK reply points."""


class Call:
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

    def __init__(self, future: asyncio.Future[Any], script: ScriptSource, command: bytes, slot: int) -> None:
        self.future = future
        self.script = script
        self.command = command
        self.slot = slot
        self.resent = False
        self.redirected = False
        self.finished = False
        self.batch: Batch | None = None
        self.token = ""
        self.seq = 0

    def settle(self, reply: Any, link: Link) -> None:
        future = self.future
        if not future.done():  # else its batch expired, or its caller went away
            if isinstance(reply, hiredis.ReplyError):
                if self._retried(str(reply), link):
                    return
                future.set_exception(StoreUnavailable(f"the store refused a script call: {reply}"))
            else:
                future.set_result(reply)
        self.finish()

    def _retried(self, error: str, link: Link) -> bool:
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


class Control:
    """A reply the connection itself waits for (handshake, SCRIPT LOAD, CLUSTER SLOTS, ASKING)."""

    __slots__ = ("future", "on_reply")

    def __init__(self, future: asyncio.Future[Any] | None = None, on_reply: Any = None) -> None:
        self.future = future
        self.on_reply = on_reply

    def settle(self, reply: Any, link: Link) -> None:
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


class Batch:
    """The calls of one loop turn, their deadline, the connections they went out on, and how many
    have not ended yet."""

    __slots__ = ("calls", "links", "open_calls", "timer")

    def __init__(self, calls: list[Call]) -> None:
        self.calls = calls
        self.open_calls = len(calls)
        self.links: list[Link] = []
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
        fail_all(self.calls, reason)


class Link(asyncio.Protocol):
    """One connection to one server: writes pipelines, and hands each reply to the entry waiting
    first."""

    def __init__(self, owner: Owner, endpoint: Endpoint) -> None:
        self.owner = owner
        self.endpoint = endpoint
        self.transport: asyncio.WriteTransport | None = None
        self.reader = hiredis.Reader()
        self.pending: collections.deque[Call | Control] = collections.deque()
        self.loading: set[str] = set()  # SCRIPT LOADs sent whose reply has not come yet
        self.open = False
        # The names of the named calls written here: a token no other connection has, the last
        # sequence number given, and the last one whose reply was read.
        self.token = secrets.token_hex(8)
        self._token_arg = resp.bulk(self.token)
        self.seq = 0
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is no asyncio.Transport
        self.open = True

    async def prepare(self, handshake: list[tuple[Arg, ...]], scripts: Iterable[ScriptSource]) -> None:
        """Send the handshake and load every known script; wait for every reply to be OK."""
        commands = [*handshake, *(("SCRIPT", "LOAD", s.source) for s in scripts)]
        await asyncio.gather(*(self.control(command) for command in commands))

    def control(self, command: tuple[Arg, ...]) -> asyncio.Future[Any]:
        """Send one command of the connection's own; the future holds its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._write(resp.command(command), Control(future))
        return future

    def send(self, calls: list[Call]) -> None:
        if self.transport is None:
            raise AssertionError("send before the connection was made")
        self.pending.extend(calls)
        self.transport.write(b"".join([self._named(call) for call in calls]))

    def _named(self, call: Call) -> bytes:
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

    def resend(self, call: Call) -> None:
        """Send a call again after NOSCRIPT, behind a SCRIPT LOAD unless one is on its way."""
        sha = call.script.sha
        if sha not in self.loading:
            self.loading.add(sha)
            load = resp.command(("SCRIPT", "LOAD", call.script.source))
            self._write(load, Control(on_reply=self._loaded(sha)))
        self._write(self._named(call), call)

    def redirected(self, call: Call, asking: bool) -> None:
        """Take a call another server redirected here; ASK: only for this one call."""
        if call.batch is not None:
            call.batch.links.append(self)
        if asking:
            self._write(resp.command(("ASKING",)), Control())
        self._write(self._named(call), call)

    def waits_for(self, batch: Batch) -> bool:
        return any(isinstance(entry, Call) and entry.batch is batch for entry in self.pending)

    def _loaded(self, sha: str) -> Any:
        return lambda reply: self.loading.discard(sha)

    def _write(self, data: bytes, entry: Call | Control) -> None:
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
                if type(entry) is Call and entry.seq:
                    self.answered = entry.seq  # replies come in the order the calls were written
                entry.settle(reply, self)
        except hiredis.ProtocolError:
            self.close("the store's reply could not be parsed")

    def connection_lost(self, exc: Exception | None) -> None:
        lost_by_the_server = self.open  # not closed by us: the server went away, or a failover began
        self.open = False
        self.owner.lost(self, stale=lost_by_the_server)
        self._fail_pending("the store connection was lost" + (f" ({describe(exc)})" if exc else ""))

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


def fail_all(calls: Iterable[Call], reason: str) -> None:
    for call in calls:
        call.fail(reason)


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
