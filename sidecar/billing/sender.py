"""Sending encoded pushes: side by side, within what the billing system takes, and what each
answer means for every summary it carried.

``send`` runs a round's requests concurrently, at most ``Limits.in_flight`` at once, each
starting only when its endpoint's Pacer allows (the documented rate, and any Retry-After an
answer asked for); the requests of one lane (Stripe v1: one customer and meter) go one after
another. A request that cannot start before the round's deadline is not sent: its summaries are
DEFERRED (rescheduled now, no failure counted), so a round never outlives its lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from sidecar.billing.formats import Delivery, Format, PushRequest
from sidecar.billing.pacing import Pacer, retry_after
from sidecar.billing.signing import HEADER as SIGNATURE_HEADER
from sidecar.billing.signing import signature
from sidecar.billing.stripe_session import MeterEventSessions
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.billing")

PUSH_TIMEOUT = aiohttp.ClientTimeout(total=10)
# Connections the billing client may open: more than any format keeps in flight (Stripe v1: 128),
# with room for Stripe's session endpoint. aiohttp's default, 100, would hold pushes back.
CONNECTIONS = 256


def http_session() -> aiohttp.ClientSession:
    """The HTTP client for billing pushes (call it in the running loop; the caller closes it).
    Proxy settings are not read from the environment: billing goes where the policy says; no
    cookies are kept (no billing API sets one worth sending back)."""
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one summary in a round. ``not_before`` (unix seconds): the receiver asked
    for no retry before then. ``failed``: counts toward the customer's backoff (not for a request
    never sent, or a session that had expired)."""

    delivery: Delivery
    reason: str = ""
    not_before: float = 0.0
    failed: bool = True


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one request's answer (or its failure to come) means."""

    delivery: Delivery
    reason: str
    status: int = 0  # none came
    wait: float | None = None  # Retry-After, in seconds
    stored: frozenset[int] = frozenset()  # indexes a refusal says the receiver has already


DEFERRED = Outcome(Delivery.RETRY, "not sent before the round's deadline", failed=False)


class Sender:
    """Sends pushes for one pusher: its pacers (one per endpoint) and Stripe sessions persist
    across rounds, so the rate holds over the whole run."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        secret: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.http = session
        self.metrics = metrics
        self.secret = secret
        self.wall_clock = wall_clock
        self.sessions = MeterEventSessions(session)
        self._endpoints: dict[tuple[str, str | None], tuple[Pacer, asyncio.Semaphore]] = {}

    async def send(
        self, fmt: Format, requests: Sequence[PushRequest], token: str | None, deadline: float
    ) -> dict[str, Outcome]:
        """Each summary's outcome. ``token`` is the API key (it sets the pace: Stripe's test
        mode); ``deadline`` is monotonic."""
        outcomes: dict[str, Outcome] = {}
        if not requests:
            return outcomes
        pacer, slots = self._endpoint(requests[0].url, token, fmt)

        async def lane(queue: list[PushRequest]) -> None:
            for index, request in enumerate(queue):
                async with slots:
                    if not await pacer.acquire(len(request.summary_ids), deadline):
                        for rest in queue[index:]:
                            outcomes.update(dict.fromkeys(rest.summary_ids, DEFERRED))
                        return
                    outcomes.update(await self._post(fmt, request, pacer))

        async with asyncio.TaskGroup() as group:
            for queue in _lanes(requests):
                group.create_task(lane(queue))
        return outcomes

    def _endpoint(self, url: str, token: str | None, fmt: Format) -> tuple[Pacer, asyncio.Semaphore]:
        """The pacer and the in-flight bound of one endpoint and key, shared by every round."""
        key = (url, token)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            limits = fmt.limits(token)
            pacer = Pacer(
                requests_per_second=limits.requests_per_second, events_per_second=limits.events_per_second
            )
            endpoint = self._endpoints[key] = (pacer, asyncio.Semaphore(limits.in_flight))
        return endpoint

    async def _post(self, fmt: Format, request: PushRequest, pacer: Pacer) -> dict[str, Outcome]:
        answer = await self._exchange(fmt, request)
        self.metrics.billing_pushes.labels(answer.delivery.value).inc()
        if answer.delivery is not Delivery.DELIVERED:
            log.warning(
                "billing push of %d summaries: %s (%s)",
                len(request.summary_ids),
                answer.delivery.value,
                answer.reason,
            )
        if answer.wait is not None and answer.delivery is Delivery.RETRY:
            pacer.pause(answer.wait)
        return self._outcomes(fmt, request, answer)

    async def _exchange(self, fmt: Format, request: PushRequest) -> _Answer:
        """POST one request and read what its answer means."""
        headers = dict(request.headers)
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, request.body, int(self.wall_clock()))
        try:
            async with self.http.post(
                request.url, data=request.body, headers=headers, timeout=PUSH_TIMEOUT
            ) as response:
                body = await response.read()
                status = response.status
                wait = retry_after(status, response.headers)
        except (aiohttp.ClientError, TimeoutError) as error:
            return _Answer(Delivery.RETRY, type(error).__name__)
        delivery = fmt.classify(status, body, sent=len(request.summary_ids))
        reason = f"{status}: {body[:500].decode(errors='replace')}"
        stored = fmt.already_stored(body) if delivery is Delivery.REJECTED else frozenset()
        return _Answer(delivery, reason, status, wait, stored)

    def _outcomes(self, fmt: Format, request: PushRequest, answer: _Answer) -> dict[str, Outcome]:
        """Each summary's outcome. A refusal that names some summaries as stored already (Lago's
        duplicates, when a crash lost our ack of an earlier batch) splits: those count as
        delivered and the rest are retried in a batch without them. A 401 from a stream whose
        session expired drops the session and is no failure of the customer's."""
        session_url = fmt.session_url(request.url)
        expired = answer.status == 401 and session_url is not None
        if expired and session_url is not None:
            self.sessions.expired(session_url, _bearer(request))
        not_before = self.wall_clock() + (answer.wait or 0.0)
        outcome = Outcome(answer.delivery, answer.reason, not_before, failed=not expired)
        if answer.stored:
            delivered = Outcome(Delivery.DELIVERED, answer.reason)
            ids = request.summary_ids
            return {id_: delivered if n in answer.stored else outcome for n, id_ in enumerate(ids)}
        return dict.fromkeys(request.summary_ids, outcome)

    async def session_token(self, fmt: Format, url: str, api_key: str | None) -> str | None:
        """The token a push to ``url`` carries: a session's for Stripe's v2 stream, else the API
        key. Raises SessionRefused when Stripe gives no session."""
        session_url = fmt.session_url(url)
        if session_url is None:
            return api_key
        return await self.sessions.token(session_url, api_key)


def _lanes(requests: Sequence[PushRequest]) -> list[list[PushRequest]]:
    """The requests grouped by lane, in order; a request without a lane is a lane of its own."""
    lanes: dict[str, list[PushRequest]] = {}
    alone: list[list[PushRequest]] = []
    for request in requests:
        if request.lane is None:
            alone.append([request])
        else:
            lanes.setdefault(request.lane, []).append(request)
    return [*lanes.values(), *alone]


def _bearer(request: PushRequest) -> str:
    return request.headers.get("Authorization", "").removeprefix("Bearer ")
