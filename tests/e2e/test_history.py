"""Usage history end to end (SPEC §7): requests through a replica, its pusher closing 1-second
windows and delivering them to a real billing receiver, then the history read back from the admin
port and, by each customer with its own key, from the proxy port."""

from __future__ import annotations

from typing import Any

from sidecar.http.app import build_admin_app
from tests.e2e.conftest import BILLING_KEYS, drain, send
from tests.helpers import ClientFactory, Receiver, loopback_client


async def history(
    client: Any, path: str, headers: dict[str, str] | None = None, **params: str
) -> tuple[int, Any]:
    response = await client.get(path, params=params, headers=headers or {})
    return response.status, await response.json(content_type=None)


async def test_the_summaries_billing_was_sent_are_the_customers_history_per_window(
    replicas: Any, receiver: Receiver, aiohttp_client: ClientFactory
) -> None:
    (replica,) = await replicas(1)
    admitted = await send([replica], 12)
    await drain([replica], receiver, admitted)
    assert await replica.components.outbox.pending_summaries() == 0  # delivered: billing has them all
    admin = await loopback_client(aiohttp_client, build_admin_app(replica.components))

    status, document = await history(admin, "/admin/customers/acme/history")
    assert status == 200 and document["customer"] == "acme" and document["history_days"] == 35
    windows = document["windows"]
    assert sum(w["value"] for w in windows) == admitted["acme"] == 12
    assert {(w["meter"], w["feature"]) for w in windows} == {("requests", "search")}
    assert all(w["window_start"] < w["window_end"] for w in windows)
    assert [w["window_start"] for w in windows] == sorted(w["window_start"] for w in windows)
    ids = {
        str(receipt.summary["window_start"])
        for receipt in receiver.unique().values()
        if receipt.key[0] == "acme"
    }
    assert {w["window_start"] for w in windows} == ids  # one history window per summary window

    status, daily = await history(admin, "/admin/customers/acme/history", step="86400")
    assert status == 200 and daily["step"] == 86400 and sum(w["value"] for w in daily["windows"]) == 12
    assert len(daily["windows"]) <= 2 and all(
        w["window_start"].endswith("T00:00:00Z") for w in daily["windows"]
    )
    _, other_meter = await history(admin, "/admin/customers/acme/history", meter="tokens")
    assert other_meter["windows"] == []
    _, later = await history(admin, "/admin/customers/acme/history", **{"from": windows[-1]["window_end"]})
    assert later["windows"] == []
    status, refused = await history(
        admin, "/admin/customers/acme/history", **{"from": "yesterday", "step": "0"}
    )
    assert status == 400 and len(refused["errors"]) == 2


async def test_a_customer_reads_its_own_history_with_its_own_key(replicas: Any, receiver: Receiver) -> None:
    (replica,) = await replicas(1)
    admitted = await send([replica], 5)
    await drain([replica], receiver, admitted)
    for customer, key in BILLING_KEYS.items():
        status, own = await history(replica.client, "/_sidecar/history", headers={"X-API-Key": key})
        assert status == 200 and own["customer"] == customer
        assert sum(w["value"] for w in own["windows"]) == admitted[customer]
    status, _ = await history(replica.client, "/_sidecar/history")
    assert status == 401
    status, _ = await history(replica.client, "/_sidecar/history", headers={"X-API-Key": "not-a-key"})
    assert status == 401
