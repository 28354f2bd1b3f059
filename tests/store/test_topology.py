"""Reading --redis URLs into a topology: which kind of store, which hosts, which settings."""

from __future__ import annotations

import pytest

from sidecar.store.redis.topology import ClusterSlots, Endpoint, OneServer, SentinelMaster, Topology


def test_a_plain_url_is_one_server_with_its_own_settings() -> None:
    topology = Topology.parse("redis://user:pw@r.test:6380/2")
    assert (topology.kind, topology.url) == ("server", "redis://user:pw@r.test:6380/2")
    locator = topology.locator(1.0)
    assert isinstance(locator, OneServer)
    assert locator.endpoint(0) == Endpoint(host="r.test", port=6380, db=2, username="user", password="pw")


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_masters_settings() -> None:
    topology = Topology.parse("redis+sentinel://:pw@s1.test:26379,s2.test/mymaster/3?sentinel_password=spw")
    assert topology.kind == "sentinel"
    assert topology.hosts == (("s1.test", 26379), ("s2.test", 26379))
    assert (topology.service, topology.sentinel_password) == ("mymaster", "spw")
    assert Endpoint.of_url(topology.url) == Endpoint(host="s1.test", port=26379, db=3, password="pw")
    assert isinstance(topology.locator(1.0), SentinelMaster)


def test_a_cluster_url_lists_its_startup_nodes() -> None:
    topology = Topology.parse("redis://:pw@n1.test:7000,n2.test:7001?cluster=true")
    assert (topology.kind, topology.hosts) == ("cluster", (("n1.test", 7000), ("n2.test", 7001)))
    locator = topology.locator(1.0)
    assert isinstance(locator, ClusterSlots)
    assert [node.port for node in locator.startup] == [7000, 7001]
    assert {node.password for node in locator.startup} == {"pw"}


def test_a_cluster_locator_knows_no_slot_before_it_has_asked_the_cluster() -> None:
    locator = Topology.parse("redis://n1.test:7000?cluster=true").locator(1.0)
    assert locator.endpoint(1234) is None


def test_a_moved_reply_points_one_slot_at_another_master() -> None:
    locator = ClusterSlots((Endpoint(host="n1.test", port=7000, password="pw"),))
    locator.table = [locator.startup[0]] * 16384
    moved = locator.moved(42, "n2.test", 7001)
    assert (locator.endpoint(42), locator.endpoint(43)) == (moved, locator.startup[0])
    assert (moved.host, moved.port, moved.password) == ("n2.test", 7001, "pw")


@pytest.mark.parametrize("url", ["redis+sentinel://s.test/mymaster", "rediss+sentinel://s.test:1/mymaster/0"])
def test_tls_to_a_sentinel_master_follows_the_scheme(url: str) -> None:
    tls = Endpoint.of_url(Topology.parse(url).url).tls is not None
    assert tls == url.startswith("rediss")
