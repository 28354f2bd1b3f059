"""RFC 9457 problem+json answers and the rate-limit headers: the only place a Verdict becomes a status.

Rate-limit headers follow draft-ietf-httpapi-ratelimit-headers-10 (structured fields):
``RateLimit-Policy: "requests-month";q=100000;w=2592000`` and
``RateLimit: "requests-month";r=98766;t=604800``.
Meters that do not count requests carry ``sc-qu="<meter>"``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from sidecar.gate import Decision, Verdict
from sidecar.policy.model import Policy
from sidecar.policy.windows import rfc3339
from sidecar.store.base import LimitState

PROBLEM_JSON = "application/problem+json"
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
STORE_RETRY_AFTER = 1  # seconds: a store outage is usually a restart or a failover


def refusal(verdict: Verdict, policy: Policy, method: str, path: str) -> web.Response:
    """The answer for every verdict that does not forward."""
    decision = verdict.decision
    if decision is Decision.NOT_FOUND:
        return not_found(method, path)
    if decision is Decision.UNAUTHORIZED:
        return unauthorized(policy.identity.api_key_headers)
    if decision is Decision.FORBIDDEN:
        return forbidden(verdict)
    if decision is Decision.REFUSED:
        return too_many_requests(verdict)
    return unavailable(STORE_RETRY_AFTER)


def problem(
    status: int, title: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def bad_request(detail: str) -> web.Response:
    return problem(400, "Bad Request", detail)


def unauthorized(header_names: tuple[str, ...]) -> web.Response:
    return problem(
        401,
        "Unauthorized",
        f"a valid API key is required in {' or '.join(_key_header_hint(n) for n in header_names)}",
        headers={"WWW-Authenticate": 'Bearer realm="api"'},
    )


def _key_header_hint(name: str) -> str:
    return "Authorization: Bearer <key>" if name.lower() == "authorization" else name


def forbidden(verdict: Verdict) -> web.Response:
    feature, plan = _names(verdict)
    return problem(
        403,
        "Forbidden",
        f"plan '{plan}' does not include feature '{feature}'",
        feature=feature,
        plan=plan,
    )


def not_found(method: str, path: str) -> web.Response:
    return problem(404, "Not Found", f"no feature matches {method} {path}")


def unavailable(retry_after: int) -> web.Response:
    return problem(
        503,
        "Service Unavailable",
        "the quota store is unreachable; retry shortly",
        headers={"Retry-After": str(retry_after)},
    )


def bad_gateway(detail: str) -> web.Response:
    return problem(502, "Bad Gateway", detail)


def gateway_timeout(detail: str) -> web.Response:
    return problem(504, "Gateway Timeout", detail)


def too_many_requests(verdict: Verdict) -> web.Response:
    """429 naming the limit that keeps the request out the longest; every refusing limit is listed."""
    refusing = verdict.refusing
    worst = max(refusing, key=lambda s: s.reset_seconds)
    limit = worst.charge.limit
    retry_after = max(1, math.ceil(worst.reset_seconds))
    body = {
        "type": QUOTA_EXCEEDED,
        "title": "Quota exceeded",
        "status": 429,
        "detail": f"limit {limit.name} ({limit.ceiling} {limit.meter} per {limit.period.value}) is used up",
        "meter": limit.meter,
        "limit": limit.ceiling,
        "period": limit.period.value,
        "remaining": worst.remaining,
        "reset": rfc3339(math.ceil(verdict.store_time + worst.reset_seconds)),
        "violated-policies": [s.charge.limit.name for s in refusing],
    }
    headers = {"Retry-After": str(retry_after), **ratelimit_headers(verdict.limits)}
    return web.Response(
        status=429, body=json.dumps(body).encode(), content_type=PROBLEM_JSON, headers=headers
    )


def ratelimit_headers(states: tuple[LimitState, ...]) -> dict[str, str]:
    """RateLimit-Policy and RateLimit for every limit that applied, tightest first."""
    if not states:
        return {}
    ordered = sorted(states, key=_tightness)
    return {
        "RateLimit-Policy": ", ".join(_policy_item(s) for s in ordered),
        "RateLimit": ", ".join(
            f'"{s.charge.limit.name}";r={s.remaining};t={math.ceil(s.reset_seconds)}' for s in ordered
        ),
    }


def _tightness(state: LimitState) -> float:
    ceiling = state.charge.limit.ceiling
    return state.remaining / ceiling if ceiling else 0.0


def _policy_item(state: LimitState) -> str:
    limit, window = state.charge.limit, state.charge.window
    seconds = window[1] - window[0] if window else limit.period.seconds
    item = f'"{limit.name}";q={limit.ceiling};w={seconds}'
    return item if state.charge.counts_requests else f'{item};sc-qu="{limit.meter}"'


def _names(verdict: Verdict) -> tuple[str, str]:
    feature = verdict.feature.name if verdict.feature else ""
    plan = verdict.plan.name if verdict.plan else ""
    return feature, plan
