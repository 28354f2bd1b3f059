"""The --redis URL, parsed and checked (SPEC §2); connecting to what it names is the store's.

* ``redis://``, ``rediss://``, ``unix://``: one server.
* ``redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]`` (``rediss+sentinel``
  for TLS to the master): the master the sentinels name for ``service``. A ``sentinel_password``
  query parameter authenticates to the sentinels themselves.
* ``redis://host:port[,host:port…]?cluster=true`` (or ``rediss://``; ``--redis-cluster`` adds the
  query): a Redis Cluster, the hosts being startup nodes; the cluster itself tells the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

Kind = Literal["server", "sentinel", "cluster"]


class TopologyInvalid(ValueError):
    """A --redis URL that names no store this sidecar can use; the message says why."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed --redis URL: the kind of store, and the one-server URL its settings come from."""

    kind: Kind
    url: str  # for a server the URL itself; else the settings (auth, TLS, db) on the first host
    hosts: tuple[tuple[str, int], ...] = ()  # the sentinels, or the cluster's startup nodes
    service: str = ""
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> Self:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        cluster = any(name == "cluster" and value.lower() == "true" for name, value in query)
        rest = [(name, value) for name, value in query if name not in ("cluster", "sentinel_password")]
        if parts.scheme in ("redis+sentinel", "rediss+sentinel"):
            if cluster:
                raise TopologyInvalid("a URL is either a Sentinel group or a cluster, not both")
            return cls._sentinel(parts, rest, dict(query).get("sentinel_password"))
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise TopologyInvalid(
                "expected a redis://, rediss://, unix:// or redis+sentinel:// URL "
                "(with cluster=true for a cluster)"
            )
        if not cluster:
            if "," in parts.netloc:
                raise TopologyInvalid("several hosts are a cluster (add cluster=true) or a Sentinel group")
            return cls("server", url)
        if parts.scheme == "unix":
            raise TopologyInvalid("a cluster is reached over TCP: use redis:// or rediss:// host:port lists")
        if parts.path.strip("/") not in ("", "0"):
            raise TopologyInvalid("a Redis Cluster has only database 0")
        hosts = _hosts(parts.netloc)
        return cls("cluster", _template(parts.scheme, parts.netloc, hosts[0], "", rest), hosts)

    @classmethod
    def _sentinel(cls, parts: Any, rest: list[tuple[str, str]], sentinel_password: str | None) -> Self:
        path = [part for part in parts.path.split("/") if part]
        if not path or len(path) > 2:
            raise TopologyInvalid("a Sentinel URL names the service: redis+sentinel://host:port/service[/db]")
        db = path[1] if len(path) == 2 else "0"
        if not db.isdigit():
            raise TopologyInvalid(f"database {db!r} is not a number")
        scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
        hosts = _hosts(parts.netloc, default_port=26379)
        url = _template(scheme, parts.netloc, hosts[0], db, rest)
        return cls("sentinel", url, hosts, service=path[0], sentinel_password=sentinel_password)


def _hosts(netloc: str, default_port: int = 6379) -> tuple[tuple[str, int], ...]:
    """host:port pairs of a netloc that may list several, after any user:password@."""
    listed = netloc.rpartition("@")[2]
    hosts: list[tuple[str, int]] = []
    for item in listed.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host or (port and not port.isdigit()):
            raise TopologyInvalid(f"{item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port) if port else default_port))
    return tuple(hosts)


def _template(scheme: str, netloc: str, first: tuple[str, int], db: str, query: list[tuple[str, str]]) -> str:
    """A one-server URL with the credentials of ``netloc``, on its first host."""
    credentials = netloc.rpartition("@")[0]
    location = f"{credentials}@" if credentials else ""
    location += f"{first[0]}:{first[1]}"
    return urlunsplit((scheme, location, f"/{db}" if db else "", urlencode(query), ""))
