"""Where the store is: one Redis server, the master a Sentinel group names, or a Redis Cluster.

``--redis`` takes (SPEC §2):

* ``redis://``, ``rediss://``, ``unix://``: one server.
* ``redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]`` (``rediss+sentinel``
  for TLS to the master): the master the sentinels name for ``service``. A ``sentinel_password``
  query parameter authenticates to the sentinels themselves.
* ``redis://host:port[,host:port…]?cluster=true`` (or ``rediss://``; ``--redis-cluster`` adds the
  query): a Redis Cluster, the hosts being startup nodes; the cluster itself tells the rest.

Each form gives two things: a redis-py client for the store's occasional commands (billing,
grants, the journal, stored customers), and a locator that tells the script batcher which server
takes a hot-path call. Every key of one customer carries the hash tag ``{c:<id>}`` (keys.py), so
each script call lives in one cluster slot and goes to that slot's master.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import RedisSSLContext, SSLConnection, UnixDomainSocketConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS
from redis.exceptions import RedisError

from sidecar.config.redis_url import RedisTarget
from sidecar.errors import StoreUnavailable

# The occasional commands' clients: a plain one for a server or a Sentinel master, or a cluster's.
StoreClient = aioredis.Redis | RedisCluster
Arg = str | int | float | bytes


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server and how to open a connection to it (auth, db, TLS), as the batcher needs it."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    @classmethod
    def of_url(cls, url: str) -> Endpoint:
        """From a one-server URL, with the settings redis-py would take from it."""
        kwargs: dict[str, Any] = dict(parse_url(url))
        kind = kwargs.get("connection_class")
        return cls(
            host=kwargs.get("host") or "127.0.0.1",
            port=int(kwargs.get("port") or 6379),
            path=kwargs.get("path") if kind is UnixDomainSocketConnection else None,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=_tls_context(kwargs) if kind is SSLConnection else None,
        )

    def at(self, host: str, port: int) -> Endpoint:
        """The same settings for another server (a cluster node, the current Sentinel master)."""
        return dataclasses.replace(self, host=host, port=port, path=None)

    @property
    def address(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    def handshake(self, client_name: str) -> list[tuple[Arg, ...]]:
        """The commands a new connection sends before any script call."""
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            user = (self.username,) if self.username else ()
            commands.append(("AUTH", *user, self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        commands.append(("CLIENT", "SETNAME", client_name))
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


# -- which server takes a call -------------------------------------------------------------------

# Sends one command to one server over the batcher's connection to it and returns the raw reply.
Ask = Callable[[Endpoint, tuple[Arg, ...]], Awaitable[Any]]


class Locator(Protocol):
    """Tells the batcher which server takes a script call, and learns when that changes."""

    @property
    def sharded(self) -> bool:
        """True when calls are routed by their keys' cluster slot."""
        ...

    def endpoint(self, slot: int) -> Endpoint | None:
        """The server for a call on ``slot``; None until ``learn`` has found out."""
        ...

    async def learn(self, ask: Ask) -> None:
        """Find out where calls go now; raises StoreUnavailable when nobody can say."""
        ...

    def forget(self) -> None:
        """What was learnt may be stale (a connection was lost, a server refused a write)."""
        ...

    def moved(self, slot: int, host: str, port: int) -> Endpoint:
        """A server answered MOVED: the slot is served at host:port from now on."""
        ...

    async def close(self) -> None:
        """Close any connection of the locator's own (to the sentinels)."""
        ...


@dataclass
class OneServer:
    """Every call goes to the one server."""

    server: Endpoint
    sharded: bool = False

    def endpoint(self, slot: int) -> Endpoint | None:
        return self.server

    async def learn(self, ask: Ask) -> None:
        return None

    def forget(self) -> None:
        return None

    def moved(self, slot: int, host: str, port: int) -> Endpoint:
        raise StoreUnavailable("a single Redis server answered MOVED: use --redis-cluster")

    async def close(self) -> None:
        return None


@dataclass
class SentinelMaster:
    """Every call goes to the master the sentinels name; asked again after a failure."""

    sentinel: Sentinel
    service: str
    template: Endpoint
    timeout: float
    sharded: bool = False
    master: Endpoint | None = None

    def endpoint(self, slot: int) -> Endpoint | None:
        return self.master

    async def learn(self, ask: Ask) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                host, port = await self.sentinel.discover_master(self.service)
        except (RedisError, OSError, TimeoutError) as error:
            raise StoreUnavailable(f"no sentinel names a master for {self.service!r}: {error}") from error
        self.master = self.template.at(str(host), int(port))

    def forget(self) -> None:
        self.master = None

    def moved(self, slot: int, host: str, port: int) -> Endpoint:
        raise StoreUnavailable("a Sentinel-managed master answered MOVED: use --redis-cluster")

    async def close(self) -> None:
        await _close_sentinels(self.sentinel)


@dataclass
class ClusterSlots:
    """Each call goes to the master of its slot, from the cluster's own slot table (CLUSTER
    SLOTS); MOVED replies correct the table one slot at a time, a lost node clears it."""

    startup: tuple[Endpoint, ...]
    sharded: bool = True
    table: list[Endpoint | None] = dataclasses.field(default_factory=list)

    def endpoint(self, slot: int) -> Endpoint | None:
        return self.table[slot] if self.table else None

    async def learn(self, ask: Ask) -> None:
        errors: list[str] = []
        for node in self.startup:
            try:
                reply = await ask(node, ("CLUSTER", "SLOTS"))
            except StoreUnavailable as error:
                errors.append(f"{node.address}: {error}")
                continue
            self.table = self._table(reply, node)
            return
        raise StoreUnavailable("no cluster node answered CLUSTER SLOTS (" + "; ".join(errors) + ")")

    def _table(self, reply: Sequence[Any], asked: Endpoint) -> list[Endpoint | None]:
        table: list[Endpoint | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for first, last, master, *_replicas in reply:
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            node = asked.at(host or asked.host, int(master[1]))  # an empty host: the node asked
            table[int(first) : int(last) + 1] = [node] * (int(last) - int(first) + 1)
        return table

    def forget(self) -> None:
        self.table = []

    def moved(self, slot: int, host: str, port: int) -> Endpoint:
        node = self.startup[0].at(host, port)
        if self.table:
            self.table[slot] = node
        return node

    async def close(self) -> None:
        return None


# -- connecting to what a --redis URL names ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topology(RedisTarget):
    """A parsed --redis URL (config/redis_url.py) and the clients that reach what it names."""

    def client(self, timeout: float, *, max_connections: int) -> StoreClient:
        """A redis-py client whose every wait is bounded by ``timeout`` and which never retries by
        itself (a retried script could charge twice)."""
        bounds: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.kind == "server":
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=max_connections, timeout=timeout, **bounds
            )
            return aioredis.Redis.from_pool(pool)
        settings = self._settings()
        if self.kind == "sentinel":
            manager = self._sentinel_manager(timeout)
            settings.update(bounds, max_connections=max_connections)
            master = manager.master_for(self.service, redis_class=aioredis.Redis, **settings)
            return cast(aioredis.Redis, master)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self.hosts],
            max_connections=max_connections,
            **settings,
            **bounds,
        )

    def locator(self, timeout: float) -> Locator:
        """Where the batcher sends each hot-path call."""
        template = Endpoint.of_url(self.url)
        if self.kind == "server":
            return OneServer(template)
        if self.kind == "sentinel":
            return SentinelMaster(self._sentinel_manager(timeout), self.service, template, timeout)
        return ClusterSlots(tuple(template.at(host, port) for host, port in self.hosts))

    def _settings(self) -> dict[str, Any]:
        """Auth, TLS and db from the URL, as redis-py's client and pool settings."""
        settings: dict[str, Any] = dict(parse_url(self.url))
        settings.pop("host", None)
        settings.pop("port", None)
        tls = settings.pop("connection_class", None) is SSLConnection
        if self.kind == "cluster":
            settings.pop("db", None)
            settings["ssl"] = tls  # RedisCluster takes a flag where a pool takes a connection class
        elif tls:
            settings["connection_class"] = SSLConnection
        return settings

    def _sentinel_manager(self, timeout: float) -> Sentinel:
        asked = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
        if self.sentinel_password:
            asked["password"] = self.sentinel_password
        return Sentinel(list(self.hosts), sentinel_kwargs=asked)  # type: ignore[no-untyped-call]


async def close_client(client: StoreClient) -> None:
    """Close a client from Topology.client, with the sentinel connections of a Sentinel one."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        await _close_sentinels(pool.sentinel_manager)


async def _close_sentinels(manager: Sentinel) -> None:
    for sentinel in manager.sentinels:
        await sentinel.aclose()
