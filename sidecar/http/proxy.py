"""The single catch-all handler: admit, then forward over the upstream pool (upstream.py) and answer.

Bodies are streamed both ways in chunks, never buffered whole; a small one that has all arrived
already goes on in one write with its head (a request's, and an answer's). Which header fields
cross, and what is added to them (Via, X-Customer-*, RateLimit), is headers.py. ``Expect:
100-continue`` is answered after admission (intake.Continuation); a WebSocket upgrade is relayed
by websocket.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.admission.gate import admit
from sidecar.admission.verdict import Decision, Verdict
from sidecar.config.policy.routes import has_dot_segments
from sidecar.errors import BodyStalled, UploadFailed, UpstreamFailed
from sidecar.http import problems, websocket
from sidecar.http.bodies import RequestBody
from sidecar.http.components import COMPONENTS, UPSTREAM, Components
from sidecar.http.guard import Refusal, body_refusal, capped, stalled
from sidecar.http.headers import ours_first, upstream_request_headers, without_hop_by_hop
from sidecar.http.intake import Continuation
from sidecar.http.metering import Tally, charge_response, reads_json
from sidecar.http.upstream import Answer, Outbound
from sidecar.ledger.journal import keep_in_journal, void_in_journal
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.http.proxy")

CHUNK_SIZE = 64 * 1024
SMALL_ANSWER = 64 * 1024  # an answer up to this size that has all arrived is written back in one go
SMALL_BODY = 64 * 1024  # a request body up to this size that has all arrived goes with its head


async def handle(request: web.Request) -> web.StreamResponse:
    components = request.app[COMPONENTS]
    tally = Tally()
    continuation = Continuation(request)
    if has_dot_segments(request.path):
        detail = "a path with . or .. segments is not accepted; send the normalised path"
        return continuation.final(problems.bad_request(detail))
    upgrading = websocket.wants_websocket(request)
    if upgrading and (bad := websocket.bad_handshake(request)) is not None:
        return bad
    policy = components.holder.current
    body = RequestBody(request.content, CHUNK_SIZE, components.settings.body_timeout)

    async def read_head() -> bytes | None:
        await continuation.send()  # admission needs the body (a request.json reserve): ask for it
        return await body.read_head()

    try:
        verdict = await admit(
            policy,
            components.directory,
            components.store,
            request.method,
            request.path,
            request.headers,
            read_head,
            denials=components.denials,
        )
    except BodyStalled as error:  # a body read ahead for a reserve stalled: before admission, free
        return _refused(components, stalled(error))
    record_verdict(components.metrics, verdict)
    if not verdict.forwards:
        if verdict.unanswered is not None and verdict.customer is not None:
            journal, metrics, clock = components.journal, components.metrics, components.store.time
            void_in_journal(journal, metrics, clock, verdict.customer.id, verdict.unanswered)
        return continuation.final(problems.refusal(verdict, policy, request.method, request.path))
    components.metrics.overhead.observe(time.perf_counter() - tally.started)
    if verdict.unrecorded is not None:
        journal, metrics, clock = components.journal, components.metrics, components.store.time
        keep_in_journal(journal, metrics, clock, verdict.unrecorded, "admission", verdict.unanswered)
    if policy.billing and verdict.recorded_usage and verdict.customer:
        components.marks.note(verdict.customer.id, verdict.store_time, policy.billing)
    shadowed = _shadow_names(verdict)
    if shadowed and verdict.customer is not None:
        customer_id = verdict.customer.id
        log.info("shadow: %s on %s would have been refused by %s", customer_id, request.path, shadowed)
    if reads_json(verdict.spec):
        tally.capture = bytearray()
    outbound = upstream_request_headers(request, verdict, policy.identity)
    fields = problems.ratelimit_headers(verdict.limits, verdict.credits, policy.meters)
    if shadowed:
        fields["Sidecar-Shadow-Refusal"] = shadowed
    if upgrading:
        return await websocket.relay(request, components, (policy, verdict), tally, outbound, fields)
    await continuation.send()
    try:
        response, upstream_headers = await forward(request, components, tally, body, outbound, fields)
    except asyncio.CancelledError:
        # The server cancels handlers of clients that left when run with handler_cancellation
        # (aiohttp's test server does): a reservation must still be released, not left to expire.
        if verdict.hold_id:
            await asyncio.shield(charge_response(components, policy, verdict, None))
        raise
    if verdict.spec is None or not verdict.spec.measured:
        return response  # nothing is measured from the exchange: charge_response would do nothing
    exchange = None
    if upstream_headers is not None:
        exchange = tally.exchange(request.headers, upstream_headers, response.status)
    await charge_response(components, policy, verdict, exchange)
    return response


def record_verdict(metrics: Metrics, verdict: Verdict) -> None:
    """Count one decision by (decision, feature, plan), its shadow refusals, and a store error."""
    feature = verdict.feature.name if verdict.feature else ""
    plan = verdict.plan.name if verdict.plan else ""
    metrics.requests.labels(verdict.decision.value, feature, plan).inc()
    for state in verdict.shadow_refusals:
        metrics.shadow_refusals.labels(plan, state.charge.limit.name).inc()
    if verdict.decision in (Decision.UNAVAILABLE, Decision.ADMITTED_UNMETERED):
        metrics.store_errors.labels("check_and_meter").inc()


def _shadow_names(verdict: Verdict) -> str:
    """The shadow limits that would have refused, for the log and Sidecar-Shadow-Refusal ("" for none)."""
    shadowed = verdict.shadow_refusals
    return ", ".join([state.charge.limit.name for state in shadowed]) if shadowed else ""


async def forward(
    request: web.Request,
    components: Components,
    tally: Tally,
    body: RequestBody,
    outbound: CIMultiDict[str],
    fields: dict[str, str],
) -> tuple[web.StreamResponse, CIMultiDictProxy[str] | None]:
    """The response, and the upstream's headers when it answered (None when it did not).
    ``outbound`` is the upstream's request headers; ``fields`` what the sidecar adds to its answer."""
    # Path and query exactly as sent; rel_url, not raw_path, because raw_path is the whole target of
    # an absolute-form request line (RFC 9112 §3.2.2), whose scheme and host are not ours to follow.
    target = request.rel_url.raw_path_qs
    data = _request_body(request, components, tally, body)
    try:
        answer = await request.app[UPSTREAM].send(Outbound(request.method, target, outbound, data))
    except TimeoutError:
        components.metrics.upstream_errors.labels("timeout").inc()
        return problems.gateway_timeout("the upstream did not answer in time"), None
    except UploadFailed as error:
        return _upload_failed(request, components, error), None
    except UpstreamFailed as error:
        components.metrics.upstream_errors.labels("refused").inc()
        return _unreachable(error), None
    try:
        return await _answer_back(request, answer, components, tally, fields), answer.headers
    finally:
        answer.release()


def _request_body(
    request: web.Request, components: Components, tally: Tally, body: RequestBody
) -> bytes | AsyncIterator[bytes] | None:
    """None for no body; the whole body when it is small and in memory already; else its parts
    as they come, counted and capped."""
    if not request.body_exists:
        return None
    limit = components.settings.max_body_size
    whole = body.buffered()
    if whole is not None and len(whole) <= min(limit, SMALL_BODY):
        tally.request_bytes += len(whole)
        return whole
    return tally.count_request(capped(body.chunks(), limit))


def _upload_failed(request: web.Request, components: Components, error: UploadFailed) -> web.Response:
    """The body being relayed failed: the client's fault (too large, stalled, bad framing: refused
    as such), or its sender left (nobody is left to read the answer)."""
    if (refusal := body_refusal(error)) is not None:
        return _refused(components, refusal)
    if _client_gone(request):
        log.debug("client left mid-request on %s %s", request.method, request.path)
        return problems.bad_gateway("the client went away")
    components.metrics.upstream_errors.labels("refused").inc()
    return _unreachable(error)


def _unreachable(error: BaseException) -> web.Response:
    return problems.bad_gateway(f"the upstream is unreachable ({type(error.__cause__ or error).__name__})")


def _refused(components: Components, refusal: Refusal) -> web.Response:
    """The client's input refused: counted, answered, the connection closed."""
    components.metrics.refused_input.labels(refusal.fault.value).inc()
    return problems.refused_input(refusal)


async def _answer_back(
    request: web.Request, answer: Answer, components: Components, tally: Tally, fields: dict[str, str]
) -> web.StreamResponse:
    """A small answer that has all arrived goes back in one write, head and body; the others stream."""
    whole = answer.whole(SMALL_ANSWER)
    if whole is None:
        return await _stream_back(request, answer, components, tally, fields)
    answer.release()  # the connection is free for the next request before this one is written back
    response = web.Response(status=answer.status, reason=answer.reason, body=whole)
    _copy_head(response, answer.headers, fields)
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        _left_before(request, tally)
        return response
    tally.saw_response(whole)
    return response


def _copy_head(response: web.StreamResponse, upstream: CIMultiDictProxy[str], fields: dict[str, str]) -> None:
    response.headers.extend(without_hop_by_hop(upstream))
    ours_first(response, fields, upstream)


def _left_before(request: web.Request, tally: Tally) -> None:
    # The client left before the status line could be written (wrk closing its connections
    # at the end of a run does it): not an error, and there is no one to send the body to.
    tally.cut = True
    log.debug("client left before the response on %s %s", request.method, request.path)


async def _stream_back(
    request: web.Request, answer: Answer, components: Components, tally: Tally, fields: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    _copy_head(response, answer.headers, fields)
    try:
        await response.prepare(request)
    except ConnectionError:
        _left_before(request, tally)
        return response
    await _relay_body(request, answer, response, components, tally)
    return response


async def _relay_body(
    request: web.Request, answer: Answer, response: web.StreamResponse, components: Components, tally: Tally
) -> None:
    """Copy the body chunk by chunk; reads and writes fail apart so the blame lands on the right side."""
    while True:
        try:
            chunk = await answer.read(CHUNK_SIZE)
        except (UpstreamFailed, TimeoutError) as error:
            tally.cut = True
            _upstream_broke(request, components, error)
            return
        tally.saw_response(chunk)
        if not await _deliver(request, response, chunk):
            tally.cut = bool(chunk)  # a client gone before the end
            return


def _upstream_broke(request: web.Request, components: Components, error: BaseException) -> None:
    """The status line is gone already: the only honest signal left is a cut connection."""
    components.metrics.upstream_errors.labels("broken").inc()
    log.warning(
        "upstream broke mid-response on %s %s: %s", request.method, request.path, type(error).__name__
    )
    if request.transport is not None:
        request.transport.abort()


async def _deliver(request: web.Request, response: web.StreamResponse, chunk: bytes) -> bool:
    """Write one chunk (b"" ends the body); False once the body is done or the client has gone.

    A client that leaves is not the upstream's failure, so nothing is counted; releasing the
    answer unfinished then drops the upstream connection, which stops the upstream too.
    """
    try:
        if chunk:
            await response.write(chunk)
        else:
            await response.write_eof()
    except ConnectionError:
        log.debug("client left mid-response on %s %s", request.method, request.path)
        return False
    return bool(chunk)


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()
