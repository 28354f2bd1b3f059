"""Coalesced script calls: the EVALSHAs issued in one event-loop turn travel as one round trip.
A call made while nothing is in flight on the connection is written at once instead (see
``_idle_link``): at a light load there is nothing to share the round trip with.

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
A connection and the calls waiting on it are link.py's (replies parsed by hiredis); the commands
are written in RESP by resp.py.

Which server takes a call is the locator's answer (topology.py): the one server, the master the
sentinels name, or the master of the call's cluster slot. With a cluster, a loop turn's calls are
grouped by master, one pipeline and one connection per master, under the batch's one deadline. A
MOVED or ASK reply says the script did not run, so the call is sent once more, where the reply
points. A READONLY reply (a master demoted by a failover) fails the call and makes the locator
ask again, as a lost connection does.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from sidecar.errors import StoreUnavailable
from sidecar.store.redis import resp
from sidecar.store.redis.link import Batch, Call, Link, describe, fail_all
from sidecar.store.redis.topology import Arg, Endpoint, Locator, Topology

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
        self._queue: list[Call] = []
        self._links: dict[Endpoint, Link] = {}
        self._opening: dict[Endpoint, asyncio.Task[Link]] = {}
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
        command = resp.evalsha(script.sha, keys, args, NAME_ARGS if script.named else 0)
        return self.send(script, command, keys[0] if keys else None)

    def send(self, script: Script, command: bytes, first_key: str | None) -> asyncio.Future[Any]:
        """Queue one EVALSHA encoded already (RESP; for a named script, its array length counts
        the name the connection appends); ``first_key`` places it in a cluster. For calls that
        share much of their encoding (store/redis/records.py)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(StoreUnavailable("the store client is closed"))
            return future
        slot = key_slot(first_key.encode()) if first_key and self.locator.sharded else 0
        call = Call(future, script, command, slot)
        self.calls += 1
        if not self._queue and (link := self._idle_link()) is not None:
            self._send(link, self._batch(loop, [call]), [call])
            return future
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append(call)
        return future

    def _idle_link(self) -> Link | None:
        """The one server's connection when nothing is waiting on it: then a call is written at
        once. Batching pays when calls are in flight (they share the next round trip); when none
        is, waiting for the rest of the loop turn only adds that turn's work to this call's
        latency (at a paced load, every other request handled in the same turn)."""
        if self.locator.sharded:
            return None
        endpoint = self.locator.endpoint(0)
        link = self._links.get(endpoint) if endpoint is not None else None
        return link if link is not None and link.open and not link.pending else None

    def _batch(self, loop: asyncio.AbstractEventLoop, calls: list[Call]) -> Batch:
        """A batch of calls, with its one deadline (the store timeout) starting now."""
        batch = Batch(calls)
        batch.timer = loop.call_at(loop.time() + self.timeout, self._expire, batch)
        return batch

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
        fail_all(self._queue, "the store client was closed")
        self._queue = []
        await self.locator.close()

    # -- one batch ------------------------------------------------------------------------------

    def _flush(self) -> None:
        calls, self._queue = self._queue, []
        if not calls:
            return
        batch = self._batch(asyncio.get_running_loop(), calls)
        if not self.locator.sharded:
            self._dispatch(self.locator.endpoint(0), batch, calls)
            return
        for endpoint, group in self._by_server(calls).items():
            self._dispatch(endpoint, batch, group)

    def _by_server(self, calls: list[Call]) -> dict[Endpoint | None, list[Call]]:
        groups: dict[Endpoint | None, list[Call]] = {}
        endpoint = self.locator.endpoint
        for call in calls:
            groups.setdefault(endpoint(call.slot), []).append(call)
        return groups

    def _dispatch(self, endpoint: Endpoint | None, batch: Batch, calls: list[Call]) -> None:
        link = self._links.get(endpoint) if endpoint is not None else None
        if link is not None and link.open:
            self._send(link, batch, calls)
        else:
            self._later(self._send_when_ready(endpoint, batch, calls))

    def _send(self, link: Link, batch: Batch, calls: list[Call]) -> None:
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

    async def _send_when_ready(self, endpoint: Endpoint | None, batch: Batch, calls: list[Call]) -> None:
        try:
            if endpoint is None:
                await self._learn()
                for known, group in self._by_server(calls).items():
                    if known is None:
                        fail_all(group, "no server of the store serves this key's slot")
                    else:
                        self._dispatch(known, batch, group)
                return
            link = await self._connected(endpoint)
        except StoreUnavailable as error:
            fail_all(calls, str(error))
            return
        self._send(link, batch, calls)

    def _expire(self, batch: Batch) -> None:
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

    def redirect(self, call: Call, link: Link, reply: str) -> None:
        """Send a call once more where a MOVED or ASK reply points (the script did not run)."""
        kind, slot, address = reply.split(" ", 2)
        host, _, port = address.rpartition(":")
        asking = kind == "ASK"
        if asking:
            target = link.endpoint.at(host, int(port))
        else:
            target = self.locator.moved(int(slot), host, int(port))
        self._later(self._redirect_when_connected(target, call, asking))

    async def _redirect_when_connected(self, target: Endpoint, call: Call, asking: bool) -> None:
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

    async def _connected(self, endpoint: Endpoint) -> Link:
        link = self._links.get(endpoint)
        if link is not None and link.open:
            return link
        opening = self._opening.get(endpoint)
        if opening is None or opening.done():
            opening = self._opening[endpoint] = asyncio.get_running_loop().create_task(self._open(endpoint))
        return await asyncio.shield(opening)

    async def _open(self, endpoint: Endpoint) -> Link:
        loop = asyncio.get_running_loop()
        link: Link | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if endpoint.path is not None:
                    _, link = await loop.create_unix_connection(lambda: Link(self, endpoint), endpoint.path)
                else:
                    _, link = await loop.create_connection(
                        lambda: Link(self, endpoint), endpoint.host, endpoint.port, ssl=endpoint.tls
                    )
                await link.prepare(endpoint.handshake(CLIENT_NAME), self.scripts.values())
        except (OSError, TimeoutError, StoreUnavailable) as error:
            if link is not None:
                link.close("the connection could not be prepared")
            self.locator.forget()
            reason = f"cannot open a store connection to {endpoint.address}: {describe(error)}"
            raise StoreUnavailable(reason) from error
        self._links[endpoint] = link
        return link

    def lost(self, link: Link, *, stale: bool) -> None:
        """A connection closed: forget it; ``stale`` when where calls go may have changed."""
        if self._links.get(link.endpoint) is link:
            del self._links[link.endpoint]
        if stale:
            self.locator.forget()
