"""Sidecar-Signature: an HMAC over the exact bytes pushed, so a receiver can tell our pushes from forgeries.

The layout follows Stripe's webhook signatures (SPEC §6): ``t=<unix seconds>,v1=<hex>``, where v1 is
HMAC-SHA256, keyed with the shared secret, of ``b"<t>." + body``. The timestamp is inside the MAC so a
receiver can refuse old replays; ``verify`` checks only the MAC because this module reads no clock,
and a receiver that wants a replay window compares ``t`` with its own clock.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "Sidecar-Signature"


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """'t=<timestamp>,v1=<hex HMAC-SHA256 of b"<timestamp>." + body with secret>'"""
    return f"t={timestamp},v1={_mac(secret, body, str(timestamp))}"


def verify(secret: str, header: str, body: bytes) -> bool:
    """True when some v1 in `header` is the MAC of `body` at the header's own `t`.

    Comparison is constant-time. A malformed header is simply not valid (False), never an error,
    so a receiver can feed it untrusted input. Several v1 values are allowed, as during a secret
    rotation; unknown keys (a future v2) are ignored.
    """
    parsed = _parse(header)
    if parsed is None:
        return False
    timestamp, candidates = parsed
    expected = _mac(secret, body, timestamp).encode()
    return any(hmac.compare_digest(expected, candidate.encode()) for candidate in candidates)


def _mac(secret: str, body: bytes, timestamp: str) -> str:
    # The literal `t` text is signed, so a rewritten-but-equal timestamp ("t=007") does not verify.
    message = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _parse(header: str) -> tuple[str, list[str]] | None:
    timestamps, candidates = [], []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return None
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            candidates.append(value)
    if len(timestamps) != 1 or not candidates or not _is_unix_seconds(timestamps[0]):
        return None
    return timestamps[0], candidates


def _is_unix_seconds(value: str) -> bool:
    return value.isascii() and value.isdigit()
