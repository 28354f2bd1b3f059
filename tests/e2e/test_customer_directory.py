"""The customer calls of SPEC §7 through the admin API, on replicas sharing a real Redis (one
server and a 3-master Cluster): list, get, put, delete and purge, add and revoke a key, the
NDJSON import and `sidecar customers import`; every bad input answered 4xx, naming the field
and the line, with nothing half-written; changes seen by another replica within the bound; two
replicas racing for one key; a flood of one unknown key costing one store lookup."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar import cli
from sidecar.config.policy.holder import PolicyHolder
from sidecar.http.app import build_admin_app, build_proxy_app
from sidecar.http.components import Components, open_components
from sidecar.store.redis import keys
from tests.conftest import Upstream, key_hash, settings_for, write_policy
from tests.topologies import on_topologies

Client = TestClient[web.Request, web.Application]
pytestmark = on_topologies("single", "cluster")
BOUND = 1.0  # seconds: a change is served by every replica within this (README)


class Replica:
    def __init__(self, proxy: Client, admin: Client, components: Components) -> None:
        self.proxy, self.admin, self.components = proxy, admin, components

    async def status(self, key: str, path: str = "/v1/search") -> int:
        response = await self.proxy.get(path, headers={"X-API-Key": key})
        await response.read()
        return response.status

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        response = await self.admin.request(method, path, **kwargs)
        text = await response.text()
        return response.status, json.loads(text) if text else None


MakeReplica = Callable[[], Awaitable[Replica]]


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(
        tmp_path,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features:
          - {{name: search, match: {{path: /v1/search}}}}
          - {{name: export, match: {{path: /v1/export}}}}
        plans:
          free: {{features: [search], limits: [{{meter: requests, limit: 1000, period: day}}]}}
          pro: {{features: [search, export]}}
        customers:
          acme: {{plan: free, api_keys: ["{key_hash("acme-key")}"]}}
        """,
    )


@pytest.fixture
def replica(
    aiohttp_client: Callable[..., Awaitable[Client]], redis_url: str, upstream: Upstream, policy: Path
) -> MakeReplica:
    """A replica as `sidecar run` composes one: a proxy and an admin app on one set of components."""

    async def make() -> Replica:
        opened = AsyncExitStack()
        components = await opened.enter_async_context(
            open_components(settings_for(upstream.url), PolicyHolder.load(policy), redis_url)
        )
        proxy = await aiohttp_client(build_proxy_app(components), server_kwargs={"host": "127.0.0.1"})
        admin_app = build_admin_app(components)
        admin_app.on_cleanup.append(lambda _: opened.aclose())
        admin = await aiohttp_client(admin_app, server_kwargs={"host": "127.0.0.1"})
        return Replica(proxy, admin, components)

    return make


def doc(plan: str, *keys_: str, **extra: Any) -> dict[str, Any]:
    return {"plan": plan, "api_keys": [key_hash(k) for k in keys_], **extra}


async def seen_within(replica: Replica, key: str, status: int) -> float:
    """Seconds until the replica answers ``status`` for the key (fails past twice the bound)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await replica.status(key) != status:
        assert loop.time() - started < 2 * BOUND, f"not {status} within {2 * BOUND}s"
        await asyncio.sleep(0.01)
    return loop.time() - started


# -- get, put, list --------------------------------------------------------------------------------


async def test_get_shows_key_hashes_only_and_where_the_customer_comes_from(replica: MakeReplica) -> None:
    a = await replica()
    assert (
        await a.call(
            "PUT", "/admin/customers/carol", json=doc("pro", "carol-key", billing_anchor="2026-01-31")
        )
    )[0] == 200
    status, body = await a.call("GET", "/admin/customers/carol")
    assert (status, body) == (
        200,
        {
            "id": "carol",
            "plan": "pro",
            "api_keys": [key_hash("carol-key")],
            "billing_anchor": "2026-01-31",
            "stripe_customer_id": None,
            "lago_subscription_id": None,
            "source": "store",
        },
    )
    assert (await a.call("GET", "/admin/customers/acme"))[1]["source"] == "policy"
    assert (await a.call("GET", "/admin/customers/nobody"))[0] == 404


async def test_the_listing_pages_with_a_cursor_and_filters_by_prefix_and_plan(replica: MakeReplica) -> None:
    a = await replica()
    for i in range(25):
        await a.call("PUT", f"/admin/customers/team-{i:02d}", json=doc("pro" if i % 2 else "free"))
    ids, cursor = [], ""
    while cursor is not None:
        status, page = await a.call("GET", f"/admin/customers?limit=4&cursor={cursor}")
        assert status == 200 and len(page["customers"]) <= 4
        ids += [row["id"] for row in page["customers"]]
        cursor = page["cursor"]
    assert ids == ["acme", *[f"team-{i:02d}" for i in range(25)]]
    status, page = await a.call("GET", "/admin/customers?prefix=team-1&plan=pro")
    assert [row["id"] for row in page["customers"]] == ["team-11", "team-13", "team-15", "team-17", "team-19"]
    assert page["customers"][0] == {"id": "team-11", "plan": "pro", "keys": 0, "source": "store"}
    _, page = await a.call("GET", "/admin/customers?plan=free&prefix=a")
    assert page == {
        "customers": [{"id": "acme", "plan": "free", "keys": 1, "source": "policy"}],
        "cursor": None,
    }


@pytest.mark.parametrize(
    "query, problem",
    [
        ("limit=0", "limit must be a whole number from 1 to 1000"),
        ("limit=1001", "limit must be a whole number from 1 to 1000"),
        ("limit=ten", "limit must be a whole number from 1 to 1000"),
        ("prefix=a%20b", "prefix must be the start of a customer id"),
        ("cursor=%7Bx%7D", "cursor must be a cursor this API returned"),
        ("plan=Gold!", "plan must be a plan name"),
    ],
)
async def test_a_bad_listing_query_is_400_naming_the_parameter(
    replica: MakeReplica, query: str, problem: str
) -> None:
    status, body = await (await replica()).call("GET", f"/admin/customers?{query}")
    assert status == 400 and problem in body["detail"]


async def test_a_put_names_every_problem_and_writes_nothing(replica: MakeReplica) -> None:
    a = await replica()
    body = {"plan": "gold", "api_keys": ["my-clear-secret", key_hash("acme-key")], "colour": "red"}
    status, problem = await a.call("PUT", "/admin/customers/carol", json=body)
    assert status == 422
    assert problem["errors"] == [
        "unknown field 'colour'",
        "plan must be one of free, pro",
        "api_keys[0] is not a sha256: hash (the value is not shown); use `sidecar hash-key`",
    ]
    assert "my-clear-secret" not in json.dumps(problem)
    status, problem = await a.call("PUT", "/admin/customers/carol", json=doc("pro", "acme-key"))
    assert (status, problem["errors"]) == (422, ["api_keys[0] already belongs to customer 'acme'"])
    assert (await a.call("GET", "/admin/customers/carol"))[0] == 404


# -- changes reach every replica -------------------------------------------------------------------


async def test_a_change_a_revoked_key_and_a_delete_reach_another_replica_within_the_bound(
    replica: MakeReplica,
) -> None:
    a, b = await replica(), await replica()
    assert await b.status("carol-key") == 401  # cached as unknown on B
    await a.call("PUT", "/admin/customers/carol", json=doc("pro", "carol-key", "carol-key-2"))
    assert await a.status("carol-key") == 200, "served at once by the replica that took the change"
    added = await seen_within(b, "carol-key", 200)
    assert await b.status("carol-key-2") == 200
    status, _ = await a.call("DELETE", f"/admin/customers/carol/keys/{key_hash('carol-key')}")
    assert status == 200 and await a.status("carol-key") == 401
    revoked = await seen_within(b, "carol-key", 401)
    assert await b.status("carol-key-2") == 200
    assert (await a.call("DELETE", "/admin/customers/carol"))[0] == 200
    deleted = await seen_within(b, "carol-key-2", 401)
    assert max(added, revoked, deleted) < BOUND, (added, revoked, deleted)


async def test_two_replicas_racing_for_one_key_cannot_both_win(replica: MakeReplica) -> None:
    a, b = await replica(), await replica()
    for round_ in range(10):
        key = f"contested-{round_}"
        answers = await asyncio.gather(
            a.call("PUT", f"/admin/customers/left-{round_}", json=doc("pro", key)),
            b.call("PUT", f"/admin/customers/right-{round_}", json=doc("pro", key)),
        )
        assert sorted(status for status, _ in answers) == [200, 422]
        winner = f"left-{round_}" if answers[0][0] == 200 else f"right-{round_}"
        loser = f"right-{round_}" if winner.startswith("left") else f"left-{round_}"
        assert answers[0 if loser.startswith("left") else 1][1]["errors"] == [
            f"api_keys[0] already belongs to customer '{winner}'"
        ]
        assert (await a.call("GET", f"/admin/customers/{loser}"))[0] == 404
        response = await b.proxy.get("/v1/export", headers={"X-API-Key": key})
        assert (response.status, response.headers.get("X-Customer-Id", winner)) == (200, winner)


async def test_policy_customers_work_are_overridden_and_come_back_after_a_delete(
    replica: MakeReplica,
) -> None:
    a = await replica()
    assert await a.status("acme-key", "/v1/export") == 403
    await a.call("PUT", "/admin/customers/acme", json=doc("pro", "acme-key-2"))
    assert await a.status("acme-key-2", "/v1/export") == 200
    assert await a.status("acme-key", "/v1/export") == 401, "the stored entry replaced the file's keys"
    status, body = await a.call("DELETE", "/admin/customers/acme")
    assert status == 200 and "policy files" in body["policy_customer"]
    assert await a.status("acme-key", "/v1/export") == 403
    assert await a.status("acme-key-2") == 401


async def test_a_flood_of_one_unknown_key_costs_one_lookup(replica: MakeReplica) -> None:
    a = await replica()
    store: Any = a.components.store
    before = store.traffic()[0]
    statuses = [await a.status("not-a-key") for _ in range(50)]
    assert statuses == [401] * 50
    assert store.traffic()[0] - before <= 2  # the owner entry (and nothing else: no such owner)


# -- keys, deletes and purges ----------------------------------------------------------------------


async def test_keys_are_added_and_revoked_with_their_answers(replica: MakeReplica) -> None:
    a = await replica()
    await a.call("PUT", "/admin/customers/carol", json=doc("pro"))
    path = "/admin/customers/carol/keys"
    assert (await a.call("POST", path, json={"api_key": key_hash("k1")}))[0] == 201
    assert (await a.call("POST", path, json={"api_key": key_hash("k1")}))[1]["status"] == "repeated"
    status, body = await a.call("POST", path, json={"api_key": key_hash("acme-key")})
    assert (status, body["detail"]) == (409, "api_key already belongs to customer 'acme'")
    status, body = await a.call("POST", path, json={"api_key": "clear-secret", "note": 1})
    assert status == 422 and body["errors"] == [
        "unknown field 'note'",
        "api_key is not a sha256: hash (the value is not shown); use `sidecar hash-key`",
    ]
    assert "clear-secret" not in json.dumps(body)
    assert (await a.call("POST", "/admin/customers/nobody/keys", json={"api_key": key_hash("k9")}))[0] == 404
    assert (await a.call("DELETE", f"{path}/sha256:xyz"))[0] == 422
    assert (await a.call("DELETE", f"{path}/{key_hash('k2')}"))[0] == 404
    assert (await a.call("DELETE", f"{path}/{key_hash('k1')}"))[0] == 200
    assert (await a.call("GET", "/admin/customers/carol"))[1]["api_keys"] == []


async def test_delete_answers_and_a_purge_erases_the_customers_data_without_key_material(
    replica: MakeReplica, caplog: pytest.LogCaptureFixture
) -> None:
    a = await replica()
    await a.call("PUT", "/admin/customers/carol", json=doc("free", "carol-key"))
    assert await a.status("carol-key") == 200  # a day quota counter now exists
    assert (await a.call("DELETE", "/admin/customers/carol?purge=maybe"))[0] == 400
    status, body = await a.call("DELETE", "/admin/customers/carol?purge=true")
    assert (status, body) == (202, {"customer": "carol", "deleted": True, "purge": "scheduled"})
    assert (await a.call("DELETE", "/admin/customers/nobody"))[0] == 404
    client: Any = a.components.store.client  # type: ignore[attr-defined]
    assert await client.zscore(keys.PURGES, "carol") is not None
    with caplog.at_level(logging.INFO, logger="sidecar.admission.customers"):
        await a.components.directory.purge_due()
    assert "purged customer 'carol'" in caplog.text
    assert hash_of("carol-key") not in caplog.text
    assert (await a.call("GET", "/admin/customers/carol"))[0] == 404
    assert await client.zscore(keys.PURGES, "carol") is None


def hash_of(key: str) -> str:
    return key_hash(key).removeprefix("sha256:")


# -- import ----------------------------------------------------------------------------------------


def ndjson(*lines: Any) -> bytes:
    return (
        b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines) + b"\n"
    )


async def test_an_import_writes_the_good_lines_and_names_every_bad_one(replica: MakeReplica) -> None:
    a, b = await replica(), await replica()
    body = ndjson(
        {"id": "imp-1", **doc("pro", "imp-key-1")},
        {"id": "imp-2", **doc("gold", "imp-key-2")},
        {"id": "imp-3", "plan": "pro", "api_keys": ["sha256:nothex"]},
        {"id": "imp-4", **doc("pro"), "colour": "red"},
        {"id": "imp-5", **doc("pro", "imp-key-5", "imp-key-1")},
        {"id": "imp-6", **doc("pro", "acme-key")},
        b'{"id": "imp-7", "plan": ',
        b"x" * (70 * 1024),
        {"id": "imp-9", **doc("free", "imp-key-9")},
        b"",
        {"plan": "pro"},
    )
    response = await a.admin.post(
        "/admin/customers/import", data=body, headers={"Content-Type": "application/x-ndjson"}
    )
    report = await response.json()
    assert response.status == 200
    assert (report["lines"], report["imported"], report["bad"]) == (11, 2, 8)
    assert [(e["line"], e["errors"]) for e in report["errors"]] == [
        (2, ["plan must be one of free, pro"]),
        (3, ["api_keys[0] is not a sha256: hash (the value is not shown); use `sidecar hash-key`"]),
        (4, ["unknown field 'colour'"]),
        (5, ["api_keys[1] already belongs to customer 'imp-1'"]),
        (6, ["api_keys[0] already belongs to customer 'acme'"]),
        (7, ["not JSON: Expecting value at column 25"]),
        (8, ["line longer than 65536 bytes"]),
        (11, ["id must be a customer id string"]),
    ]
    assert await seen_within(b, "imp-key-9", 200) < BOUND
    assert await b.status("imp-key-5") == 401, "nothing of a bad line is written"
    _, page = await a.call("GET", "/admin/customers?prefix=imp")
    assert [row["id"] for row in page["customers"]] == ["imp-1", "imp-9"]
    again = await a.admin.post(
        "/admin/customers/import", data=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert (await again.json())["imported"] == 2, "idempotent"


async def test_an_import_needs_ndjson(replica: MakeReplica) -> None:
    status, body = await (await replica()).call("POST", "/admin/customers/import", json=[{"id": "x"}])
    assert status == 415 and "application/x-ndjson" in body["detail"]


async def test_the_cli_imports_a_file_through_the_admin_api(
    replica: MakeReplica, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = await replica()
    path = tmp_path / "customers.ndjson"
    path.write_bytes(ndjson({"id": "cli-1", **doc("pro", "cli-key")}, {"id": "cli-2", **doc("gold")}))
    admin = f"{a.admin.host}:{a.admin.port}"
    code = await asyncio.to_thread(cli.main, ["customers", "import", str(path), "--admin", admin])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{path}:2: plan must be one of free, pro" in err
    assert f"1 customers imported from {path} (2 lines, 1 refused)" in out
    assert await a.status("cli-key") == 200
