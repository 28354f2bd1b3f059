"""`python -m bench.hotpath`: µs per call of each piece of the sidecar's own per-request Python.

No I/O and no server: each piece is called on the benchmark's policy (one customer, a month and a
per-second limit, so every admitted request checks two limits) with what a request from wrk
carries, and timed with timeit (the best of 9 repeats of 5,000 calls; the best, because on a
shared machine every other figure measures the neighbours too). `admit` runs the whole admission
against a store stub that builds the script's arguments and reads a canned reply, as the Redis
store does around its round trip. Names on the command line select the pieces whose name contains
one of them.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import timeit
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from bench.policy import api_key, write_policy
from sidecar.admission.gate import admit
from sidecar.admission.identity import identify
from sidecar.admission.plan import meter_request
from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Customer, Policy
from sidecar.config.policy.routes import has_dot_segments
from sidecar.http import headers as forwarding
from sidecar.http import problems, proxy
from sidecar.metrics import Metrics
from sidecar.store.port import Admission, MeterRequest, Store
from sidecar.store.redis import codec as replies
from sidecar.store.redis.store import script_arguments

CALLS, REPEATS = 5_000, 9
NOW = 1_795_000_000.0  # a fixed store time: the calendar windows are those of one month
# check_and_meter's reply for two admitted limits: outcome, time, then (used, reset µs, over) each.
REPLY = [1, int(NOW), 250_000, 5, 2_000_000_000_000, 0, 3, 999_000, 0]
WRK_HEADERS = {"Host": "127.0.0.1:8000", "X-API-Key": api_key(0)}
CLIENT_HEADERS = {
    **WRK_HEADERS,
    "User-Agent": "curl/8.5.0",
    "Accept": "*/*",
    "Accept-Encoding": "gzip",
    "Content-Type": "application/json",
    "X-Request-Id": "4bf92f3577b34da6",
    "Connection": "keep-alive",
}
UPSTREAM_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "Content-Length": "41",
    "Date": "Mon, 23 Nov 2026 15:11:00 GMT",
    "Server": "Python/3.11 aiohttp/3.14.5",
}


class StoreStub:
    """The Redis store's work around its round trip, without the round trip."""

    def time(self) -> float:
        return NOW

    async def check_and_meter(self, request: MeterRequest) -> Admission:
        script_arguments(request, deadline=NOW + 0.025)
        return replies.admission(REPLY, request)


T = TypeVar("T")


class Directory:
    """A directory whose every key is in its cache: identify's lookup without I/O."""

    async def by_key_hash(self, key_hash: str, policy: Policy) -> Customer | None:
        customer_id = policy.customer_by_key_hash.get(key_hash)
        return None if customer_id is None else policy.customers[customer_id]


def run_once(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (the stub answers at once) without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    raise RuntimeError("the coroutine waited")


def pieces(policy: Policy) -> dict[str, Callable[[], object]]:
    customer = policy.customers["customer-0"]
    feature = policy.routes.feature_for("GET", "/hello")
    assert feature is not None
    plan = policy.plans[customer.plan]
    spec = policy.charges[(plan.name, feature.name)]
    request = meter_request(policy, customer, feature.name, spec, NOW)
    admission = replies.admission(REPLY, request)
    verdict = Verdict(
        decision=Decision.ADMITTED,
        feature=feature,
        customer=customer,
        plan=plan,
        limits=admission.limits,
        store_time=admission.store_time,
        spec=spec,
    )
    headers = CIMultiDict(WRK_HEADERS)
    from_wrk = make_mocked_request("GET", "/hello", headers=headers)
    from_client = make_mocked_request("GET", "/hello", headers=CIMultiDict(CLIENT_HEADERS))
    upstream = CIMultiDictProxy(CIMultiDict(UPSTREAM_HEADERS))
    metrics, directory = Metrics(), Directory()
    store = cast(Store, StoreStub())  # admission calls only these two of the Store's operations

    def response_headers() -> web.StreamResponse:
        response = web.StreamResponse(status=200, reason="OK")
        response.headers.extend(forwarding.without_hop_by_hop(upstream))
        fields = problems.ratelimit_headers(verdict.limits, verdict.credits, policy.meters)
        forwarding.ours_first(response, fields, upstream)
        return response

    return {
        "route: dot segments and the route table": lambda: (
            has_dot_segments("/hello"),
            policy.routes.feature_for("GET", "/hello"),
        ),
        "identify (the key hashed and looked up)": lambda: run_once(identify(headers, policy, directory)),
        "meter_request (the windows and charges)": lambda: meter_request(
            policy, customer, feature.name, spec, NOW
        ),
        "script_arguments (KEYS and ARGV)": lambda: script_arguments(request, deadline=NOW + 0.025),
        "replies.admission (the reply read)": lambda: replies.admission(REPLY, request),
        "admit, no I/O (all of the above, the Verdict)": lambda: run_once(
            admit(policy, directory, store, "GET", "/hello", headers)
        ),
        "record_verdict": lambda: proxy.record_verdict(metrics, verdict),
        "overhead histogram observe": lambda: metrics.overhead.observe(0.001),
        "upstream_request_headers, wrk's 2 headers": lambda: forwarding.upstream_request_headers(
            from_wrk, verdict, policy.identity
        ),
        "upstream_request_headers, a client's 8 headers": lambda: forwarding.upstream_request_headers(
            from_client, verdict, policy.identity
        ),
        "ratelimit_headers (two limits)": lambda: problems.ratelimit_headers(
            verdict.limits, (), policy.meters
        ),
        "response headers: upstream's 4 copied, RateLimit added": response_headers,
    }


def main() -> None:
    wanted = sys.argv[1:]
    with tempfile.TemporaryDirectory() as directory:
        policy = load_policy(write_policy(Path(directory), 1))
    asyncio.set_event_loop(asyncio.new_event_loop())  # make_mocked_request wants a current loop
    print("| piece | µs per call |\n|---|---:|")
    for name, piece in pieces(policy).items():
        if wanted and not any(word in name for word in wanted):
            continue
        best = min(timeit.repeat(piece, number=CALLS, repeat=REPEATS)) / CALLS
        print(f"| {name} | {best * 1e6:.2f} |")


if __name__ == "__main__":
    main()
