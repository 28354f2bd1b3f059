"""How fast one replica drains a billing backlog (billing/pusher.py, billing/sender.py).

`--summaries` summaries (two meters for each of half as many customers) wait in the outboxes of a
redis-server of its own, as after a billing outage. A pusher drains them into a receiver on
127.0.0.1, in a process of its own, that answers every request `--delay-ms` late (a billing system
that far away) the way each system does: json and Lago 200, OpenMeter 204, Stripe v1 one meter
event, Stripe v2 a session and `{}` for the stream. It prints the summaries delivered per second
from the first push to the last answer, with the requests sent and the most in flight at once, and
checks every summary arrived exactly once. Nothing here changes the sidecar.

    python -m bench.billing [--summaries 10000] [--delay-ms 100] [--formats json lago ...]
                            [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.admission.customers import CustomerDirectory
from sidecar.billing.marks import DirtyMarks
from sidecar.billing.pusher import Pusher
from sidecar.billing.sender import http_session
from sidecar.config.policy.holder import PolicyHolder
from sidecar.metrics import Metrics
from sidecar.store.redis import keys
from sidecar.store.redis.embedded import EmbeddedRedis, free_port
from sidecar.store.redis.store import RedisStore
from sidecar.store.summaries import summary_id

STORE_TIMEOUT = 2.0
METERS = ("requests", "tokens")
# format name → (policy billing lines, path the receiver answers)
FORMATS = {
    "json": ("format: json", "/usage"),
    "lago": ("format: lago", "/api/v1/events/batch"),
    "openmeter": ("format: openmeter", "/api/v1/events"),
    "stripe": ("format: stripe", "/v1/billing/meter_events"),
    "stripe-v2": ("format: stripe, stripe_api: v2", "/v2/billing/meter_event_stream"),
}


# -- the receiver, in a process of its own -----------------------------------------------------


class Tally:
    """What the receiver saw: events by id, requests, and the most answered at once."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.requests = 0
        self.in_flight = 0
        self.most_in_flight = 0


def _events(path: str, body: bytes) -> list[str]:
    """The summary ids one request carries, read as each system reads them."""
    if path == "/v1/billing/meter_events":
        fields = body.decode().split("&")
        return [field.split("=", 1)[1] for field in fields if field.startswith("identifier=")]
    document = json.loads(body)
    if path == "/usage":
        return [summary["id"] for summary in document["summaries"]]
    if path == "/api/v1/events/batch":
        return [event["transaction_id"] for event in document["events"]]
    if path == "/v2/billing/meter_event_stream":
        return [event["identifier"] for event in document["events"]]
    return [event["id"] for event in document]


def _receiver_app(delay: float) -> web.Application:
    tally = Tally()

    async def receive(request: web.Request) -> web.Response:
        tally.requests += 1
        tally.in_flight += 1
        tally.most_in_flight = max(tally.most_in_flight, tally.in_flight)
        try:
            body = await request.read()
            await asyncio.sleep(delay)
            for summary in _events(request.path, body):
                tally.ids[summary] = tally.ids.get(summary, 0) + 1
        finally:
            tally.in_flight -= 1
        if request.path == "/api/v1/events":
            return web.Response(status=204)
        return web.json_response({})

    async def session(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        now = time.time()
        return web.json_response(
            {
                "id": "mes_bench",
                "object": "v2.billing.meter_event_session",
                "authentication_token": f"token_{now}",
                "created": _rfc3339(now),
                "expires_at": _rfc3339(now + 900),
                "livemode": True,
            }
        )

    async def count(request: web.Request) -> web.Response:
        answer = {"distinct": len(tally.ids), "events": sum(tally.ids.values())}
        answer |= {"requests": tally.requests, "most_in_flight": tally.most_in_flight}
        return web.json_response(answer)

    async def reset(request: web.Request) -> web.Response:
        tally.__init__()  # type: ignore[misc]
        return web.json_response({})

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/v2/billing/meter_event_session", session)
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    app.router.add_post("/{tail:.*}", receive)
    return app


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


def _serve(port: int, delay: float) -> None:
    web.run_app(_receiver_app(delay), host="127.0.0.1", port=port, print=None, access_log=None)


# -- the backlog and the pusher -----------------------------------------------------------------


def write_policy(directory: Path, customers: int, billing: str, url: str) -> Path:
    lines = [
        "version: 1",
        "meters: {requests: {aggregation: count}, tokens: {aggregation: sum, source: 'response.bytes'}}",
        "features: [{name: search, match: {path: /v1/search}}]",
        "plans: {p: {features: [search]}}",
        "customers:",
        *(
            f"  c{n}: {{plan: p, stripe_customer_id: cus_{n}, lago_subscription_id: sub_{n}}}"
            for n in range(customers)
        ),
        f"billing: {{url: '{url}', {billing}, interval: 60, grace: 0, batch_size: 100}}",
    ]
    path = directory / "policy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def fill(store: RedisStore, customers: int, window: int) -> None:
    """Two summaries (one per meter) in each customer's outbox, and the customer due for pushing."""
    pipe = store.client.pipeline(transaction=False)
    for n in range(customers):
        customer = f"c{n}"
        for meter in METERS:
            summary = _summary(customer, meter, window)
            pipe.hset(keys.outbox(customer), summary["id"], json.dumps(summary))
        pipe.zadd(keys.PENDING, {customer: 0})
        if len(pipe) >= 2000:
            await pipe.execute()
    await pipe.execute()


def _summary(customer: str, meter: str, window: int) -> dict[str, Any]:
    return {
        "id": summary_id(customer, meter, "search", window, 1),
        "customer": customer,
        "plan": "p",
        "meter": meter,
        "aggregation": "sum",
        "feature": "search",
        "value": 7,
        "window_start": window,
        "window_end": window + 60,
    }


async def drain(store: RedisStore, policy: Path, session: aiohttp.ClientSession) -> float:
    """Seconds from starting the pusher (as `sidecar run` runs it) until no customer is due."""
    pusher = Pusher(
        holder=PolicyHolder.load(policy),
        outbox=store.outbox,
        marks=DirtyMarks(),
        session=session,
        metrics=Metrics(),
        clock=store.time,
        directory=CustomerDirectory(store.customers),
    )
    stopping = asyncio.Event()
    started = time.perf_counter()
    running = asyncio.create_task(pusher.run(stopping))
    while await store.client.zcard(keys.PENDING):
        await asyncio.sleep(0.01)
    took = time.perf_counter() - started
    stopping.set()
    await running
    return took


async def run_one(
    store: RedisStore, name: str, summaries: int, receiver: str, directory: Path
) -> dict[str, Any]:
    billing, path = FORMATS[name]
    customers = summaries // len(METERS)
    policy = write_policy(directory, customers, billing, receiver + path)
    await store.client.flushdb()
    await fill(store, customers, int(store.time()) // 60 * 60 - 3600)
    async with http_session() as session:
        await _post(session, receiver + "/reset")
        took = await drain(store, policy, session)
        seen = await _get(session, receiver + "/count")
    if seen["distinct"] != summaries:
        raise RuntimeError(f"{name}: {seen['distinct']} of {summaries} summaries arrived")
    return {"format": name, "seconds": took, "rate": summaries / took} | seen


async def _post(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url) as answer:
        answer.raise_for_status()


async def _get(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as answer:
        return dict(await answer.json())


async def bench(url: str, options: argparse.Namespace, receiver: str) -> list[dict[str, Any]]:
    store = RedisStore.open(url, STORE_TIMEOUT)
    await store.connect()
    try:
        directory = Path(tempfile.mkdtemp(prefix="bench-billing-"))
        return [
            await run_one(store, name, options.summaries, receiver, directory) for name in options.formats
        ]
    finally:
        await store.close()


def _run(loop: str, work: Coroutine[object, object, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run the pusher's side on the event loop `sidecar run --loop` would use."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(work)
    return asyncio.run(work)


def _wait_listening(port: int, ready: Callable[[], Coroutine[object, object, None]]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            asyncio.run(ready())
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"receiver on port {port} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--summaries", type=int, default=10_000)
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(FORMATS))
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the pusher's")
    options = parser.parse_args()
    port = free_port()
    receiver = multiprocessing.Process(target=_serve, args=(port, options.delay_ms / 1000), daemon=True)
    receiver.start()
    base = f"http://127.0.0.1:{port}"

    async def ready() -> None:
        async with aiohttp.ClientSession() as session:
            await _get(session, base + "/count")

    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-billing-redis-")), persistent=False)
    server.start()
    try:
        _wait_listening(port, ready)
        rows = _run(options.loop, bench(server.url, options, base))
    finally:
        server.stop()
        receiver.kill()
        receiver.join(5)
    print(f"{options.summaries:,} summaries, receiver {options.delay_ms:g} ms away, {options.loop} loop:")
    print("| format | seconds | summaries/s | requests | most in flight |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['format']} | {row['seconds']:.2f} | {row['rate']:,.0f} | {row['requests']:,} "
            f"| {row['most_in_flight']} |"
        )


if __name__ == "__main__":
    main()
