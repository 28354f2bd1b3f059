"""Session tokens for Stripe's v2 meter event stream (formats/stripe_v2.py).

POST /v2/billing/meter_event_session with the API key answers
``{"id", "object": "v2.billing.meter_event_session", "authentication_token", "created",
"expires_at", "livemode"}`` (times RFC 3339; tokens live 15 minutes). The token is kept and
renewed RENEW_BEFORE_SECONDS before it expires, so a push never starts with a token about to
lapse; a 401 from the stream drops it, and the next push gets a new one. Its lifetime is read as
``expires_at - created`` and counted on our own monotonic clock, so a skewed clock here cannot
make us use a token Stripe thinks expired. One renewal at a time: pushes waiting meanwhile share
its token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime

import aiohttp

from sidecar.billing.formats.stripe_v2 import STRIPE_VERSION

RENEW_BEFORE_SECONDS = 60.0
SESSION_TIMEOUT = aiohttp.ClientTimeout(total=10)


class SessionRefused(Exception):
    """Stripe did not give a session (an answer other than a session, or no answer)."""


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    renew_at: float  # monotonic


class MeterEventSessions:
    """The current session token of each session endpoint, renewed before it expires."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._http = session
        self._tokens: dict[str, _Token] = {}
        self._renewing = asyncio.Lock()

    async def token(self, url: str, api_key: str | None) -> str:
        """A token valid for at least RENEW_BEFORE_SECONDS more; SessionRefused when Stripe
        gives none."""
        async with self._renewing:
            current = self._tokens.get(url)
            if current is None or time.monotonic() >= current.renew_at:
                current = self._tokens[url] = await self._create(url, api_key)
            return current.value

    def expired(self, url: str, token: str) -> None:
        """The stream refused ``token`` (401): the next push creates a new session."""
        current = self._tokens.get(url)
        if current is not None and current.value == token:
            del self._tokens[url]

    async def _create(self, url: str, api_key: str | None) -> _Token:
        headers = {"Stripe-Version": STRIPE_VERSION}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        started = time.monotonic()
        try:
            async with self._http.post(url, headers=headers, timeout=SESSION_TIMEOUT) as answer:
                body = await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise SessionRefused(f"meter event session: {type(error).__name__}") from error
        if status != 200:
            raise SessionRefused(f"meter event session: {status}: {body[:300].decode(errors='replace')}")
        value, lifetime = _read(body)
        return _Token(value, started + lifetime - RENEW_BEFORE_SECONDS)


def _read(body: bytes) -> tuple[str, float]:
    """The token and its lifetime in seconds, from a session object."""
    try:
        session = json.loads(body)
        token = session["authentication_token"]
        lifetime = _instant(session["expires_at"]) - _instant(session.get("created", time.time()))
    except (ValueError, KeyError, TypeError) as error:
        raise SessionRefused(f"meter event session: unreadable answer ({error})") from error
    if not isinstance(token, str) or not token:
        raise SessionRefused("meter event session: no authentication_token")
    return token, lifetime


def _instant(value: object) -> float:
    """An RFC 3339 date-time (v2) or unix seconds, as unix seconds."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return datetime.fromisoformat(value).timestamp()
    raise TypeError(f"not a time: {value!r}")
