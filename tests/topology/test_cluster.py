"""The store on a real 3-master Redis Cluster: the exactness and billing tests, run again against
the cluster, and what only a cluster does (keys spread over masters, slots that move)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from redis.crc import key_slot

from sidecar.store.port import LimitCharge, MeterRequest, Outcome, UsageCharge
from sidecar.store.redis.store import RedisStore, script_arguments
from tests.e2e.test_admission import test_quota_of_n_admits_exactly_n_across_two_replicas_under_concurrency
from tests.e2e.test_billing import (
    policy,
    receiver,
    replicas,
    test_a_permanent_refusal_is_dead_lettered_and_a_redrive_delivers_it,
    test_billing_failures_are_retried_until_delivered_with_the_same_ids_and_values,
    test_every_admitted_unit_reaches_billing_once_per_customer_and_meter,
    test_three_replicas_on_one_redis_deliver_each_unit_once,
)
from tests.e2e.test_prepaid import (
    llm,
    test_concurrent_requests_that_use_less_than_they_hold_are_charged_exactly_what_they_used,
    test_concurrent_reserved_requests_on_two_replicas_never_overdraw,
)
from tests.store.test_check_and_meter import (
    month_charge,
    test_calendar_quota_admits_exactly_its_limit,
    test_concurrent_calls_admit_exactly_the_quota,
    test_one_refusing_limit_charges_no_other_limit,
    test_weighted_cost_is_all_or_nothing,
)
from tests.store.test_prepaid_credit import test_concurrent_reservations_never_overdraw
from tests.topologies import Cluster, node_client

# Run here against the cluster, through the redis_url fixture below (imported names are collected).
__all__ = [
    "llm",
    "policy",
    "receiver",
    "replicas",
    "test_a_permanent_refusal_is_dead_lettered_and_a_redrive_delivers_it",
    "test_billing_failures_are_retried_until_delivered_with_the_same_ids_and_values",
    "test_calendar_quota_admits_exactly_its_limit",
    "test_concurrent_calls_admit_exactly_the_quota",
    "test_concurrent_requests_that_use_less_than_they_hold_are_charged_exactly_what_they_used",
    "test_concurrent_reservations_never_overdraw",
    "test_concurrent_reserved_requests_on_two_replicas_never_overdraw",
    "test_every_admitted_unit_reaches_billing_once_per_customer_and_meter",
    "test_one_refusing_limit_charges_no_other_limit",
    "test_quota_of_n_admits_exactly_n_across_two_replicas_under_concurrency",
    "test_three_replicas_on_one_redis_deliver_each_unit_once",
    "test_weighted_cost_is_all_or_nothing",
]


@pytest.fixture
def redis_url(cluster: Cluster) -> str:
    cluster.flush()
    return cluster.url


def customers_on_every_master(cluster: Cluster, per_master: int) -> dict[int, list[str]]:
    """Customer ids whose keys live on each master (port → ids)."""
    found: dict[int, list[str]] = {port: [] for port in cluster.ports}
    n = 0
    while any(len(ids) < per_master for ids in found.values()):
        customer = f"cust-{n}"
        n += 1
        ids = found[cluster.master_of(_quota_key(customer, month_charge(1, now=0)))]
        if len(ids) < per_master:
            ids.append(customer)
    return found


async def test_customers_on_every_master_each_get_exactly_their_quota_under_concurrency(
    cluster: Cluster, store: RedisStore
) -> None:
    spread = customers_on_every_master(cluster, per_master=3)
    customers = [customer for ids in spread.values() for customer in ids]
    now = store.time()

    async def one(customer: str) -> tuple[str, Outcome]:
        admission = await store.check_and_meter(_request(customer, month_charge(25, now=now)))
        return customer, admission.outcome

    outcomes = await asyncio.gather(*(one(customer) for customer in customers for _ in range(60)))
    admitted = Counter(customer for customer, outcome in outcomes if outcome is Outcome.ADMITTED)
    assert admitted == dict.fromkeys(customers, 25)
    for port, ids in spread.items():  # each customer's counter is on the master of its slot
        with node_client(port) as node:
            for customer in ids:
                assert int(node.get(_quota_key(customer, month_charge(25, now=now))) or 0) == 25


async def test_one_loop_turns_calls_travel_as_one_pipeline_per_master(
    cluster: Cluster, store: RedisStore
) -> None:
    spread = customers_on_every_master(cluster, per_master=2)
    await store.connect()
    before = store.traffic()
    now = store.time()
    calls = [
        store.check_and_meter(_request(customer, month_charge(100, now=now)))
        for ids in spread.values()
        for customer in ids
        for _ in range(10)
    ]
    await asyncio.gather(*calls)
    sent, trips = (after - earlier for after, earlier in zip(store.traffic(), before, strict=True))
    assert (sent, trips) == (60, 3)


async def test_calls_follow_a_slot_that_moves_to_another_master_exactly(
    cluster: Cluster, store: RedisStore
) -> None:
    """While a slot migrates a master answers ASK, once it has moved MOVED: both say the script did
    not run, so the call is sent where the reply points and counted once."""
    customer = "mover"
    charge = month_charge(1000, now=store.time())
    key = _quota_key(customer, charge)
    for _ in range(10):
        assert (await store.check_and_meter(_request(customer, charge))).outcome is Outcome.ADMITTED
    source = cluster.master_of(key)
    target = next(port for port in cluster.ports if port != source)
    slot = key_slot(key.encode())
    ids = {port: _node_id(port) for port in cluster.ports}
    with node_client(source) as origin, node_client(target) as destination:
        destination.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        origin.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        for moving in origin.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            origin.migrate("127.0.0.1", target, moving, 0, 5000)
        asked = await asyncio.gather(*(store.check_and_meter(_request(customer, charge)) for _ in range(10)))
        assert {admission.outcome for admission in asked} == {Outcome.ADMITTED}
        for port in cluster.ports:
            with node_client(port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        moved = await asyncio.gather(*(store.check_and_meter(_request(customer, charge)) for _ in range(10)))
        assert {admission.outcome for admission in moved} == {Outcome.ADMITTED}
        assert int(destination.get(key) or 0) == 30
        assert origin.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    try:
        assert store.batcher.locator.endpoint(slot).port == target  # type: ignore[union-attr]
    finally:
        with node_client(target) as destination:  # give the slot back, as the cluster was created
            destination.delete(*destination.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000))
        for port in cluster.ports:
            with node_client(port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[source])


def _node_id(port: int) -> str:
    with node_client(port) as node:
        return str(node.execute_command("CLUSTER", "MYID").decode())


def _request(customer: str, charge: LimitCharge) -> MeterRequest:
    """One admission that writes every key it names (so that, mid-migration, all are on one side:
    Redis refuses a multi-key script whose keys are split, TRYAGAIN)."""
    return MeterRequest(customer, (charge,), (UsageCharge("requests", "api", 1, "+"),), 60)


def _quota_key(customer: str, charge: LimitCharge) -> str:
    keys, _ = script_arguments(_request(customer, charge))
    return keys[0]
