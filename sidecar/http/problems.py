"""RFC 9457 problem+json answers and the rate-limit headers: the only place a Verdict becomes a status.

Rate-limit headers follow draft-ietf-httpapi-ratelimit-headers-10 (structured fields):
``RateLimit-Policy: "requests-month";q=100000;w=2592000`` and
``RateLimit: "requests-month";r=98766;t=604800``.
A byte meter carries the draft's registered ``qu="content-bytes"``; other meters that do not
count requests carry ``sc-qu="<meter>"``. Soft limits (``on_exceed: allow``) are left out: the
draft tells a client not to exceed ``r`` before ``t``, and a soft limit never throttles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from aiohttp import web

from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.model import Meter, Policy, SourceKind
from sidecar.config.policy.windows import rfc3339
from sidecar.http.guard import Fault, Refusal
from sidecar.store.port import CreditState, LimitState

PROBLEM_JSON = "application/problem+json"
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
STORE_RETRY_AFTER = 1  # seconds: a store outage is usually a restart or a failover
# Seconds: waiting does not bring prepaid credit back (a grant does), so a retrying client is
# told to back off for a minute rather than hammer.
CREDIT_RETRY_AFTER = 60
NO_METERS: Mapping[str, Meter] = MappingProxyType({})
_BYTE_SOURCES = (SourceKind.REQUEST_BYTES, SourceKind.RESPONSE_BYTES)  # the draft's "content-bytes"


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
        return too_many_requests(verdict, policy.meters)
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


def too_many_requests(verdict: Verdict, meters: Mapping[str, Meter] = NO_METERS) -> web.Response:
    """429 naming the limit that keeps the request out the longest (credit used up keeps it out
    until a grant); every refusing limit and credit is listed."""
    refusing, credits = verdict.refusing, verdict.refusing_credits
    if credits:
        credit = credits[0]
        retry_after = max([CREDIT_RETRY_AFTER, *(math.ceil(s.reset_seconds) for s in refusing)])
        detail = f"prepaid {credit.charge.meter} credit is used up; it returns with a new grant"
        named: dict[str, Any] = {
            "meter": credit.charge.meter,
            "limit": credit.granted,
            "period": "prepaid",
            "remaining": credit.balance,
            "reset": None,
        }
    else:
        worst = max(refusing, key=lambda s: s.reset_seconds)
        limit = worst.charge.limit
        retry_after = max(1, math.ceil(worst.reset_seconds))
        detail = f"limit {limit.name} ({limit.ceiling} {limit.meter} per {limit.period.value}) is used up"
        # rounded first: a cached refusal, aged, must name the same second despite float noise
        reset = rfc3339(math.ceil(round(verdict.store_time + worst.reset_seconds, 3)))
        named = {
            "meter": limit.meter,
            "limit": limit.ceiling,
            "period": limit.period.value,
            "remaining": worst.remaining,
            "reset": reset,
        }
    headers = {"Retry-After": str(retry_after), **ratelimit_headers(verdict.limits, verdict.credits, meters)}
    policies = [s.charge.limit.name for s in refusing] + [c.charge.name for c in credits]
    return problem(
        429,
        "Quota exceeded",
        detail,
        headers=headers,
        **{"type": QUOTA_EXCEEDED, **named, "violated-policies": policies},
    )


def ratelimit_headers(
    states: tuple[LimitState, ...],
    credits: tuple[CreditState, ...] = (),
    meters: Mapping[str, Meter] = NO_METERS,
) -> dict[str, str]:
    """RateLimit-Policy and RateLimit for every limit that applied but the soft ones, tightest
    first, then each prepaid credit (no window: ``w`` and ``t`` are left out, as the draft allows).

    ``meters`` (the policy's) names each meter's unit; without it, every meter that does not count
    requests gets ``sc-qu``.
    """
    hard = [state for state in states if state.charge.limit.is_hard]
    if not hard and not credits:
        return {}
    policies: list[str] = []
    current: list[str] = []
    for state in sorted(hard, key=_tightness) if len(hard) > 1 else hard:
        charge = state.charge
        limit = charge.limit
        window = charge.window
        seconds = window[1] - window[0] if window else limit.period.seconds
        unit = "" if charge.counts_requests else _unit(limit.meter, meters)
        policies.append(f'"{limit.name}";q={limit.ceiling};w={seconds}{unit}')
        current.append(f'"{limit.name}";r={state.remaining};t={math.ceil(state.reset_seconds)}')
    for credit in credits:
        policies.append(_credit_item(credit, meters))
        current.append(f'"{credit.charge.name}";r={max(0, credit.balance)}')
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(current)}


def _tightness(state: LimitState) -> tuple[float, str]:
    """Units a limit allows per second of its period, fewest first; read from the policy alone, so
    a customer's items come in one order on every response to a route, whatever is left of each."""
    limit = state.charge.limit
    return limit.ceiling / limit.period.seconds, limit.name


def _unit(name: str, meters: Mapping[str, Meter]) -> str:
    meter = meters.get(name)
    if meter is not None and meter.source.kind in _BYTE_SOURCES:
        return ';qu="content-bytes"'
    return f';sc-qu="{name}"'


def _credit_item(credit: CreditState, meters: Mapping[str, Meter]) -> str:
    item = f'"{credit.charge.name}";q={credit.granted}'
    return item if credit.charge.counts_requests else item + _unit(credit.charge.meter, meters)


def _names(verdict: Verdict) -> tuple[str, str]:
    feature = verdict.feature.name if verdict.feature else ""
    plan = verdict.plan.name if verdict.plan else ""
    return feature, plan


# Hostile input (guard.py): refused before admission; the connection is closed after the answer,
# because a request whose framing or size was refused leaves its body unread on the wire.
_INPUT_FAULTS = {
    Fault.MALFORMED: (400, "Bad Request"),
    Fault.HEAD_TIMEOUT: (408, "Request Timeout"),
    Fault.BODY_TIMEOUT: (408, "Request Timeout"),
    Fault.BODY_TOO_LARGE: (413, "Content Too Large"),
    Fault.HEADERS_TOO_LARGE: (431, "Request Header Fields Too Large"),
}


def refused_input(refusal: Refusal) -> web.Response:
    status, title = _INPUT_FAULTS[refusal.fault]
    response = problem(status, title, refusal.detail)
    response.force_close()
    return response


def raw_refused_input(refusal: Refusal) -> bytes:
    """The same answer as a whole HTTP/1.1 message, for a connection that has no request object yet."""
    status, title = _INPUT_FAULTS[refusal.fault]
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": refusal.detail})
    head = (
        f"HTTP/1.1 {status} {title}\r\nContent-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return (head + body).encode()
