"""The tests' shared harness, one copy of each: keys and policy files; servers and clients on
loopback (the recording upstream, the billing receiver); usage as an admin reads it; raw HTTP;
and the store requests that store tests send. Fixtures built on these are in tests/conftest.py
and tests/e2e/conftest.py; nothing here imports a conftest.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.admission.identity import hash_key
from sidecar.billing.signing import verify
from sidecar.config.policy.model import Customer, Limit, OnExceed, Policy
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.store.port import LimitCharge, MeterRequest, Store, UsageCharge

# Generous for a loaded 2-core CI machine; outage tests set their own.
TEST_STORE_TIMEOUT = 2.0
BILLING_SECRET = "whsec-test"
ACME = "acme-key-1"  # the API key of customer acme in the policies below

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
ServerFactory = Callable[..., Awaitable[TestServer]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- keys and policy files ------------------------------------------------------------------------


def key_hash(clear_key: str) -> str:
    """A key as a policy file holds it: ``sha256:<hex>``."""
    return f"sha256:{hash_key(clear_key)}"


def write_policy(directory: Path, text: str, name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def quota_policy(directory: Path, limit: int, period: str = "month", *, extra: str = "") -> Path:
    """acme (key ACME) on a plan whose one limit is ``limit`` requests a ``period`` on /v1/search;
    ``extra`` is more top-level YAML (e.g. ``store_failure: open``)."""
    return write_policy(
        directory,
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features: [{{name: search, match: {{path: /v1/search}}}}]
        plans: {{p: {{features: [search], limits: [{{meter: requests, limit: {limit}, period: {period}}}]}}}}
        customers: {{acme: {{plan: p, api_keys: ["{key_hash(ACME)}"]}}}}
        {extra}
        """,
    )


class PolicyCustomers:
    """Customers looked up in the policy alone (admission's CustomerLookup, no stored customers)."""

    async def by_key_hash(self, key_hash: str, policy: Policy) -> Customer | None:
        customer_id = policy.customer_by_key_hash.get(key_hash)
        return None if customer_id is None else policy.customers[customer_id]


class ManualClock:
    """A clock that moves only when told (``now += seconds``); 2026-01-01T00:00:00Z to begin with."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- servers and clients on loopback --------------------------------------------------------------


async def serve(aiohttp_server: ServerFactory, app: web.Application, *, port: int | None = None) -> str:
    """Serve ``app`` on 127.0.0.1 (on ``port``, else a free one); its base URL, without a slash."""
    server = await aiohttp_server(app, host="127.0.0.1", port=port)
    return str(server.make_url("")).rstrip("/")


def answering(handler: Handler, **options: object) -> web.Application:
    """An app that answers every method and path with ``handler``; it takes bodies up to 1 GiB."""
    app = web.Application(**{"client_max_size": 1024**3, **options})  # type: ignore[arg-type]
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def loopback_client(
    aiohttp_client: ClientFactory, app: web.Application, *, closing: Store | None = None
) -> Client:
    """A test client of ``app`` served on 127.0.0.1; ``closing`` is a store the app closes at cleanup."""
    if closing is not None:
        app.on_cleanup.append(lambda _: closing.close())
    return await aiohttp_client(app, server_kwargs={"host": "127.0.0.1"})


@dataclass
class Upstream:
    """A real aiohttp server on loopback that records what it received."""

    url: str = ""
    seen: list[dict[str, object]] = field(default_factory=list)


RECORDS = web.AppKey("records", list)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    record = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": request.query_string,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_length": len(body),
    }
    request.app[RECORDS].append(record)
    return web.json_response(record, headers={"X-Upstream": "yes"})


def upstream_app(extra: Callable[[web.Application], None] | None = None) -> web.Application:
    """The recording upstream: every method and path answered 200 with what it saw, recorded in
    ``app[RECORDS]``; ``extra`` adds routes of a test's own first."""
    app = web.Application(client_max_size=1024**3)
    app[RECORDS] = []
    if extra:
        extra(app)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def start_upstream(aiohttp_server: ServerFactory) -> Upstream:
    app = upstream_app()
    return Upstream(url=await serve(aiohttp_server, app), seen=app[RECORDS])


# --- the billing receiver -------------------------------------------------------------------------


@dataclass(frozen=True)
class Post:
    """One POST billing received."""

    number: int  # 1-based
    at: float  # unix time
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Receipt:
    """One summary, as a POST delivered it."""

    post: int
    at: float
    summary: dict[str, object]

    @property
    def id(self) -> str:
        return str(self.summary["id"])

    @property
    def key(self) -> tuple[str, str]:
        """(customer, meter)"""
        return str(self.summary["customer"]), str(self.summary["meter"])

    @property
    def value(self) -> int:
        return int(str(self.summary["value"]))


@dataclass
class Receiver:
    """A ``json``-format billing endpoint that records every POST and every summary it accepts
    and answers 200. It fails on purpose when told: the first ``fail_first`` POSTs are answered
    ``status_when_failing`` (their summaries not recorded); the first ``stall_first`` are recorded
    and answered ``stall_seconds`` late; with ``hold_at_units``, the first POST that brings the
    deduplicated units to that many is recorded but not answered until ``release`` is set
    (``held`` tells it came), so its sender can die never learning billing has it."""

    url: str = ""
    fail_first: int = 0
    status_when_failing: int = 500
    stall_first: int = 0
    stall_seconds: float = 1.0
    hold_at_units: int | None = None
    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[Post] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)

    @property
    def posts(self) -> int:
        return len(self.requests)

    @property
    def refused(self) -> list[Post]:
        return self.requests[: self.fail_first]

    @property
    def received(self) -> list[dict[str, object]]:
        """Every summary received, resends included."""
        return [receipt.summary for receipt in self.receipts]

    async def handle(self, request: web.Request) -> web.Response:
        post = Post(self.posts + 1, time.time(), dict(request.headers), await request.read())
        self.requests.append(post)
        if post.number <= self.fail_first:
            return web.json_response({"error": "billing is down, try later"}, status=self.status_when_failing)
        self.receipts += [Receipt(post.number, post.at, s) for s in json.loads(post.body)["summaries"]]
        if post.number <= self.stall_first:
            await asyncio.sleep(self.stall_seconds)  # past the sender's push timeout
        elif self.hold_at_units is not None and self.units() >= self.hold_at_units and not self.held.is_set():
            self.held.set()
            await self.release.wait()
        return web.json_response({"ok": True})

    def signed_with(self, secret: str) -> bool:
        """Every POST accepted (there was one) carries a valid Sidecar-Signature for ``secret``."""
        accepted = self.requests[self.fail_first :]
        return bool(accepted) and all(
            verify(secret, post.headers.get("Sidecar-Signature", ""), post.body) for post in accepted
        )

    def unique(self) -> dict[str, Receipt]:
        """The first receipt of each summary id, as a receiver deduplicating on the id keeps it."""
        first: dict[str, Receipt] = {}
        for receipt in self.receipts:
            first.setdefault(receipt.id, receipt)
        return first

    def totals(self) -> dict[tuple[str, str], int]:
        """Units per (customer, meter) over unique summary ids."""
        totals: dict[tuple[str, str], int] = {}
        for receipt in self.unique().values():
            totals[receipt.key] = totals.get(receipt.key, 0) + receipt.value
        return totals

    def units(self) -> int:
        return sum(self.totals().values())

    def values_by_id(self) -> dict[str, set[int]]:
        values: dict[str, set[int]] = {}
        for receipt in self.receipts:
            values.setdefault(receipt.id, set()).add(receipt.value)
        return values

    def conflicting(self) -> dict[str, set[int]]:
        """Ids received more than once with different values: every value seen for each."""
        return {i: values for i, values in self.values_by_id().items() if len(values) > 1}

    def duplicate_deliveries(self) -> int:
        """Receipts of an id already received before (resends a deduplicating receiver drops)."""
        return len(self.receipts) - len(self.unique())

    def timeline(self) -> str:
        return "\n".join(
            f"  post {r.post} at {r.at:.3f}: {' '.join(r.key)} window {r.summary['window_start']} "
            f"value {r.value} id {r.id}"
            for r in self.receipts
        )


async def listen(aiohttp_server: ServerFactory, receiver: Receiver) -> Receiver:
    """Serve ``receiver`` at POST /usage: on the port its url names (one that was not listening
    yet), else on a free one, which its url then names."""
    app = web.Application()
    app.router.add_post("/usage", receiver.handle)
    port = urlsplit(receiver.url).port if receiver.url else None
    receiver.url = f"{await serve(aiohttp_server, app, port=port)}/usage"
    return receiver


# --- usage, as an admin reads it ------------------------------------------------------------------


async def used_today(session: aiohttp.ClientSession, admin: str, customer: str = "acme") -> int:
    """What the customer's first limit has used, from the admin API at ``admin`` (HOST:PORT)."""
    async with session.get(f"http://{admin}/admin/customers/{customer}/usage") as response:
        assert response.status == 200, await response.text()
        return int((await response.json())["limits"][0]["used"])


# --- raw HTTP -------------------------------------------------------------------------------------


async def raw_exchange(port: int, head: str) -> tuple[int, bytes]:
    """Send a request head exactly as written and read the answer to EOF (it must say Connection: close).

    aiohttp's client cannot send this: it keeps only the last of repeated names spelled differently.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# --- store requests -------------------------------------------------------------------------------


def month_charge(
    limit: int, amount: int = 1, *, now: float, enforced: bool = True, meter: str = "requests"
) -> LimitCharge:
    """A month quota's charge, in the month that holds ``now``."""
    return LimitCharge(
        Limit(meter=meter, limit=limit, period=Period.MONTH),
        amount,
        calendar_window(Period.MONTH, now),
        enforced,
    )


def day_charge(limit: int, *, now: float, soft: bool = False) -> LimitCharge:
    """A day quota's charge; ``soft`` (on_exceed: allow) is charged but never refuses."""
    on_exceed = OnExceed.ALLOW if soft else OnExceed.REJECT
    limit_ = Limit(meter="requests", limit=limit, period=Period.DAY, on_exceed=on_exceed)
    return LimitCharge(limit_, 1, calendar_window(Period.DAY, now), not soft)


def rate_charge(limit: int, period: Period = Period.SECOND, amount: int = 1, burst: int = 0) -> LimitCharge:
    """A moving window's charge (second, minute or hour)."""
    return LimitCharge(Limit(meter="requests", limit=limit, period=period, burst=burst), amount, None, True)


def without_windows(fields: dict[str, int]) -> dict[str, int]:
    """Billing usage fields ("<window>|<meter>|<feature>", a unique meter's value
    "u|<window>|<meter>|<feature>|<value>") summed over their windows: a test may straddle one's end."""
    summed: dict[str, int] = {}
    for name, value in fields.items():
        parts = name.split("|")
        del parts[1 if parts[0] == "u" else 0]
        summed["|".join(parts)] = summed.get("|".join(parts), 0) + value
    return summed


def request_for(
    *charges: LimitCharge, usage: tuple[UsageCharge, ...] = (), customer: str = "acme"
) -> MeterRequest:
    return MeterRequest(customer, charges, usage, 60)


def request_at(now: float, customer: str = "acme") -> MeterRequest:
    """One request of ``customer`` at ``now``: a month quota of 100, and one unit of usage."""
    return request_for(
        month_charge(100, now=now), usage=(UsageCharge("requests", "search", 1, "+"),), customer=customer
    )
