"""What only a Redis Cluster does: keys spread over masters, calls pipelined per master, slots
that move. The exactness and billing tests run on the cluster too, as parameters of their own
suites (tests/topologies.py, on_topologies): tests/store/test_contract.py, tests/e2e/test_admission.py,
test_billing.py and test_prepaid.py."""

from __future__ import annotations

import asyncio
from collections import Counter

from redis.crc import key_slot

from sidecar.store.port import LimitCharge, MeterRequest, Outcome, UsageCharge
from sidecar.store.redis.store import RedisStore, script_arguments
from tests.helpers import month_charge
from tests.topologies import Cluster, node_client, on_topologies

pytestmark = on_topologies("cluster")  # the store fixture is on the cluster


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
