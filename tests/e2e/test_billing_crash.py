"""Usage to billing across the death of a replica (SPEC §6), with real `sidecar run` processes.

Two sidecars share one external Redis. Sidecar A takes the traffic and dies — SIGKILLed right
after its last answer, or SIGTERMed while billing is failing — before its pusher can have
delivered everything. Sidecar B, started afterwards on the same Redis, must find what A left
(usage not yet closed, closed summaries not yet acknowledged) and deliver it, so that a receiver
deduplicating on the summary id counts exactly the units clients were answered 200 for: nothing
missing, nothing counted twice, no id ever sent with two different values.

The figures (units sent, units received, duplicate deliveries, drain time) are printed; run with
-s or -rP to see them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from sidecar.billing.pusher import LEASE_MS
from tests.e2e.conftest import Launcher, Sidecar, store_args, timing
from tests.helpers import Receiver, Upstream, key_hash, write_policy

pytestmark = pytest.mark.slow

KEYS = {"acme": "acme-key-1", "bob": "bob-key-1"}
METER = "requests"
REQUESTS = 300
CONCURRENCY = 20
TRAFFIC_SECONDS = 3.0  # spread over several 1 s billing windows, so A pushes some before it dies
TRAFFIC_PHASE = 0.2  # seconds past a whole second at which traffic starts
DRAIN_TIMEOUT = 30.0
STRAGGLER_SECONDS = 2.0
SIGTERM_EXIT_SECONDS = 5.0
FAILED_PUSHES = 3
HELD_PUSH_TIMEOUT = 10.0
# A replica that dies mid-push leaves its customers leased (claim.lua) for LEASE_MS: another
# replica takes them only after that, so the drain bound for that case is the lease plus margin.
LEASED_DRAIN_TIMEOUT = LEASE_MS / 1000 + 15.0


@pytest.fixture
def policy(tmp_path: Path, receiver: Receiver) -> Path:
    customers = "\n".join(
        f'  {name}: {{plan: pro, api_keys: ["{key_hash(key)}"]}}' for name, key in KEYS.items()
    )
    return write_policy(
        tmp_path,
        f"""
version: 1
meters: {{{METER}: {{aggregation: count}}}}
features: [{{name: search, match: {{method: GET, path: /v1/search}}}}]
plans: {{pro: {{features: [search], limits: [{{meter: {METER}, limit: 10000000, period: month}}]}}}}
customers:
{customers}
billing: {{url: "{receiver.url}", format: json, interval: 1, grace: 0}}
""",
    )


def figure(name: str, value: object) -> None:
    """A figure for the record (shown with -s or -rP)."""
    print(f"figure: {name}: {value}")


async def send_traffic(session: aiohttp.ClientSession, sidecar: Sidecar, count: int) -> dict[str, int]:
    """`count` GET /v1/search alternating between the customers, paced evenly over TRAFFIC_SECONDS
    and at most CONCURRENCY at a time, all answered before this returns; the 200s per customer.

    Traffic starts TRAFFIC_PHASE after a whole second (the store's clock is this machine's), so it
    ends well inside a 1 s billing window: that window is still open when the caller acts on the
    sidecar right after, and cannot have been pushed yet."""
    await asyncio.sleep((TRAFFIC_PHASE - time.time()) % 1.0)
    gate = asyncio.Semaphore(CONCURRENCY)
    names = list(KEYS)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(index: int) -> tuple[str, int]:
        customer = names[index % len(names)]
        await asyncio.sleep(max(0.0, start + index * TRAFFIC_SECONDS / count - loop.time()))
        url, headers = f"{sidecar.proxy}/v1/search", {"X-API-Key": KEYS[customer]}
        async with gate, session.get(url, headers=headers) as response:
            await response.read()
            return customer, response.status

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return {c: sum(1 for name, status in results if name == c and status == 200) for c in KEYS}


async def drain(receiver: Receiver, units: int, since: float) -> float | None:
    """Seconds from `since` until the receiver holds `units` deduplicated units (None if it never
    does within DRAIN_TIMEOUT); then waits STRAGGLER_SECONDS more for late resends."""
    drained = None
    while time.monotonic() - since < DRAIN_TIMEOUT:
        if receiver.units() >= units:
            drained = time.monotonic() - since
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(STRAGGLER_SECONDS)
    return drained


def check_exactly_once(
    receiver: Receiver, admitted: dict[str, int], drained: float | None, a: Sidecar, b: Sidecar
) -> None:
    sent = sum(admitted.values())
    figure("units sent (200 answers)", f"{sent} {admitted}")
    figure("units received, deduplicated by id", f"{receiver.units()} {receiver.totals()}")
    figure("summaries received (all deliveries)", len(receiver.receipts))
    figure("unique summary ids", len(receiver.unique()))
    figure("duplicate deliveries (same id again)", receiver.duplicate_deliveries())
    figure("POSTs to billing (refused with 500)", f"{receiver.posts} ({len(receiver.refused)})")
    if drained is not None:
        timing("drain (every unit, every resend) after sidecar B started", drained)
    print(f"timeline (unix times):\n{receiver.timeline()}")
    context = (
        f"\nreceipts:\n{receiver.timeline()}\nsidecar A stderr:\n{a.stderr}\nsidecar B stderr:\n{b.stderr}"
    )
    assert receiver.conflicting() == {}, f"ids received with different values{context}"
    expected = {(customer, METER): units for customer, units in admitted.items() if units}
    assert receiver.totals() == expected, f"billed units differ from the 200 answers{context}"
    assert drained is not None, context


async def test_a_replica_killed_right_after_traffic_leaves_nothing_unbilled_and_nothing_twice(
    launch: Launcher,
    policy: Path,
    upstream: Upstream,
    receiver: Receiver,
    redis_url: str,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    a = await launch(policy, upstream.url, tmp_path / "data-a", *store_args(redis_url))
    await a.wait_ready(session)
    admitted = await send_traffic(session, a, REQUESTS)
    os.kill(a.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    figure("A killed at (unix time)", f"{time.time():.3f}")
    assert await a.wait_exit() == -signal.SIGKILL
    assert sum(admitted.values()) == REQUESTS, f"traffic was refused: {admitted}\n{a.stderr}"
    before_b = receiver.units()
    figure("units delivered by A before it was killed", before_b)
    assert before_b < REQUESTS, "A delivered everything before it died: the crash tested nothing"

    b = await launch(policy, upstream.url, tmp_path / "data-b", *store_args(redis_url))
    started = time.monotonic()
    figure("B started at (unix time)", f"{time.time():.3f}")
    timing("sidecar B startup after A was killed", await b.wait_ready(session))
    drained = await drain(receiver, REQUESTS, started)
    figure("seconds from the kill of A to the start of B", f"{started - killed:.2f}")
    check_exactly_once(receiver, admitted, drained, a, b)
    assert b.process.returncode is None, b.stderr


async def test_a_replica_stopped_while_billing_fails_exits_0_and_another_delivers_the_rest(
    launch: Launcher,
    policy: Path,
    upstream: Upstream,
    receiver: Receiver,
    redis_url: str,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    receiver.fail_first = FAILED_PUSHES
    a = await launch(policy, upstream.url, tmp_path / "data-a", *store_args(redis_url))
    await a.wait_ready(session)
    admitted = await send_traffic(session, a, REQUESTS)
    assert sum(admitted.values()) == REQUESTS, f"traffic was refused: {admitted}\n{a.stderr}"
    code, seconds = await a.terminate()
    timing("sidecar A exit after SIGTERM, billing failing", seconds)
    assert code == 0, a.stderr
    assert seconds < SIGTERM_EXIT_SECONDS, a.stderr
    before_b = receiver.units()
    figure("units delivered by A before it exited", before_b)
    figure("POSTs to billing by A (refused)", f"{receiver.posts} ({len(receiver.refused)})")
    assert before_b < REQUESTS, "A delivered everything before it exited: the hand-over tested nothing"

    b = await launch(policy, upstream.url, tmp_path / "data-b", *store_args(redis_url))
    started = time.monotonic()
    figure("B started at (unix time)", f"{time.time():.3f}")
    timing("sidecar B startup after A exited", await b.wait_ready(session))
    drained = await drain(receiver, REQUESTS, started)
    check_exactly_once(receiver, admitted, drained, a, b)
    assert len(receiver.refused) == FAILED_PUSHES
    assert b.process.returncode is None, b.stderr


async def test_a_replica_killed_while_billing_holds_its_last_push_is_resent_with_the_same_ids_and_values(
    launch: Launcher,
    policy: Path,
    upstream: Upstream,
    receiver: Receiver,
    redis_url: str,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The worst moment to die: billing has recorded A's last push but A never hears the 200, so
    those summaries stay in the outbox, leased to a dead replica. B must resend them once the lease
    ends — each with the id and value billing already has — and nothing else."""
    receiver.hold_at_units = REQUESTS
    a = await launch(policy, upstream.url, tmp_path / "data-a", *store_args(redis_url))
    try:
        await a.wait_ready(session)
        admitted = await send_traffic(session, a, REQUESTS)
        assert sum(admitted.values()) == REQUESTS, f"traffic was refused: {admitted}\n{a.stderr}"
        await asyncio.wait_for(receiver.held.wait(), HELD_PUSH_TIMEOUT)
        os.kill(a.process.pid, signal.SIGKILL)
        assert await a.wait_exit() == -signal.SIGKILL
    finally:
        receiver.release.set()
    figure("A killed at (unix time), its last push unanswered", f"{time.time():.3f}")
    held = [r for r in receiver.receipts if r.post == receiver.posts]
    figure("summaries in the push A never saw answered", len(held))

    b = await launch(policy, upstream.url, tmp_path / "data-b", *store_args(redis_url))
    started = time.monotonic()
    figure("B started at (unix time)", f"{time.time():.3f}")
    timing("sidecar B startup after A was killed", await b.wait_ready(session))
    resent = len(held) + len(receiver.receipts)
    deadline = started + LEASED_DRAIN_TIMEOUT
    while len(receiver.receipts) < resent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    drained = time.monotonic() - started if len(receiver.receipts) >= resent else None
    await asyncio.sleep(STRAGGLER_SECONDS)
    check_exactly_once(receiver, admitted, drained, a, b)
    assert {r.id for r in receiver.receipts[-len(held) :]} == {r.id for r in held}, receiver.timeline()
    assert receiver.duplicate_deliveries() == len(held)
