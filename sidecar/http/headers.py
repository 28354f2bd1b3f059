"""Which header fields cross the proxy, in each direction (RFC 9110 §7.6), and what it adds.

* Hop-by-hop fields (RFC 9110 §7.6.1: Connection, every name Connection lists, Keep-Alive, TE,
  Trailer, Transfer-Encoding, Upgrade, plus the legacy Proxy-Connection) describe one connection,
  so they are dropped both ways. So is Expect: the sidecar answers it itself, after admission.
* ``Proxy-*``: the proxy credentials and challenges (RFC 9110 §11.7) are addressed to the next
  hop, the sidecar, never to the upstream or the client; no end-to-end field starts with
  ``Proxy-`` except ``Proxy-Status`` (RFC 9209), which intermediaries add to responses for the
  client to read. So every ``Proxy-*`` field but ``Proxy-Status`` is dropped both ways, and so
  is a bare ``Proxy`` field (httpoxy: CGI-style upstreams read it as their HTTP proxy).
* Identity: the client's ``X-Customer-*`` and ``Forwarded`` are claims it may not make; the
  upstream gets the sidecar's ``X-Customer-Id`` / ``-Plan``. The customer's API key (the fields
  the policy's ``identity.api_key_headers`` name; ``Authorization`` only when it says Bearer, the
  one form that carries a key) is removed unless ``identity.forward_key``, so keys stay out of the
  upstream's logs.
* ``X-Forwarded-For`` / ``-Proto`` and ``Via`` (RFC 9110 §7.6.3) are appended to, not replaced.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.model import Identity
from sidecar.http.guard import spoofable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-authentication-info",
        "proxy",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_HOP_BY_HOP_NAMES = tuple(HOP_BY_HOP)
IDENTITY_HEADERS = frozenset({"x-customer-id", "x-customer-plan"})
# Never passed on as the client sent them: the forwarding headers are appended to instead.
_NOT_FORWARDED = HOP_BY_HOP | IDENTITY_HEADERS | {"x-forwarded-for", "x-forwarded-proto", "via"}
VIA_NAME = "quota-sidecar"  # a pseudonym (RFC 9110 §7.6.3): the sidecar's host name is nobody's business
# The RateLimit fields an upstream may send too: the sidecar's items go first, the upstream's follow.
RATELIMIT_FIELDS = ("RateLimit-Policy", "RateLimit")


def proxy_field(lowered: str) -> bool:
    """A ``Proxy-*`` field for one hop only (every one but Proxy-Status), given its lower-cased name."""
    if not lowered.startswith("proxy"):
        return False
    return lowered == "proxy" or (lowered[5:6] == "-" and lowered != "proxy-status")


def connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Names a Connection header declares hop-by-hop, lower-cased."""
    return frozenset(
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    )


def without_hop_by_hop(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str] | list[tuple[str, str]]:
    """The headers themselves when none is hop-by-hop (the common answer), else the others."""
    if not any(name in headers for name in _HOP_BY_HOP_NAMES) and not any(  # lookups in C first
        proxy_field(name.lower()) for name in headers
    ):
        return headers
    dropped = HOP_BY_HOP | connection_listed(headers)
    return [
        (name, value)
        for name, value in headers.items()
        if (lowered := name.lower()) not in dropped and not proxy_field(lowered)
    ]


def upstream_request_headers(request: web.Request, verdict: Verdict, identity: Identity) -> CIMultiDict[str]:
    """What the upstream receives: the client's end-to-end fields, less the key and the identity
    claims, plus the sidecar's identity and forwarding fields."""
    incoming = request.headers
    dropped = _NOT_FORWARDED | connection_listed(incoming) if "Connection" in incoming else _NOT_FORWARDED
    if not identity.forward_key:
        dropped = dropped | key_fields(incoming, identity.api_key_headers)
    # Repeats of a name take its first spelling: aiohttp's ClientSession keeps only the last of
    # names that differ in case (X-Tag, x-tag) and would silently drop the others' values.
    spelling: dict[str, str] = {}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lowered = name.lower()
        if lowered not in dropped and not spoofable(name) and not proxy_field(lowered):
            headers.add(spelling.setdefault(lowered, name), value)
    headers["X-Forwarded-For"] = appended(incoming, "X-Forwarded-For", request.remote or "unknown")
    headers["X-Forwarded-Proto"] = appended(incoming, "X-Forwarded-Proto", request.scheme)
    version = request.version
    headers["Via"] = appended(incoming, "Via", f"{version.major}.{version.minor} {VIA_NAME}")
    if verdict.customer is not None and verdict.decision is not Decision.PUBLIC:
        headers["X-Customer-Id"] = verdict.customer.id
        headers["X-Customer-Plan"] = verdict.customer.plan
    return headers


def key_fields(incoming: CIMultiDictProxy[str], names: tuple[str, ...]) -> frozenset[str]:
    """The policy's key fields, lower-cased, that the client sent in a form that carries a key."""
    return frozenset(
        lowered
        for name in names
        if name in incoming
        and ((lowered := name.lower()) != "authorization" or _bearer(incoming.getone(name)))
    )


def _bearer(value: str) -> bool:
    return value.partition(" ")[0].lower() == "bearer"


def appended(headers: CIMultiDictProxy[str], name: str, value: str) -> str:
    previous = ", ".join(headers.getall(name, ()))
    return f"{previous}, {value}" if previous else value


def ours_first(
    response: web.StreamResponse, fields: Mapping[str, str], upstream: CIMultiDictProxy[str]
) -> None:
    """Set the sidecar's fields on a response that already carries the upstream's: a RateLimit
    field the upstream sent too keeps its items, after the sidecar's (RFC 9110 §5.3: one list)."""
    headers = response.headers
    for name, value in fields.items():
        if name in RATELIMIT_FIELDS and name in upstream:
            value = ", ".join([value, *(item for item in upstream.getall(name) if item.strip())])
        headers[name] = value
