"""POST /admin/events: usage records from the rest of the stack, as CloudEvents (SPEC §8); also
at OPENMETER_PATH, so an OpenMeter SDK pointed at the admin port works unchanged.

The body is one record (``application/cloudevents+json``) or a batch (``application/
cloudevents-batch+json``, a JSON array of at most MAX_RECORDS, in at most MAX_BODY_BYTES). Each
record gets its own result, in order: ``accepted``, ``duplicate`` (its source and id were counted
within events.dedupe_hours), ``refused`` (enforced, with ``violated-policies``) or ``invalid``
(with the field and the reason). The whole body is answered 400 only when it cannot be read as
that JSON, 413 past the limits and 415 for another content type.

The store takes a batch in one round trip (store/redis/records.py). When it does not answer for a
record, its customer's ``store_failure`` decides: ``closed`` answers that record ``unavailable``
and the whole response 503 with Retry-After, so an emitter sends the batch again, which counts
each record once (the ones counted come back ``duplicate``); ``open`` accepts it into the local
journal, which merges it once per its key when the store answers (ledger/journal.py).
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Sequence
from typing import Any

from aiohttp import StreamReader, web

from sidecar.admission.record_customers import RecentCustomers
from sidecar.admission.records import Event, Invalid, read_event, usage_record
from sidecar.config.policy.model import Customer, Policy, StoreFailure
from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.components import COMPONENTS, Components
from sidecar.ledger.journal import keep_record_in_journal
from sidecar.store.port import Recorded, RecordOutcome, UsageRecord

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
OPENMETER_PATH = "/api/v1/events"  # where OpenMeter's SDKs send events: served here too
MAX_RECORDS = 1000
MAX_BODY_BYTES = 4 * 1024 * 1024
_ENFORCE = {None: False, "true": True, "false": False}
RECENT = web.AppKey("recent_customers", RecentCustomers)  # the admin app's (admin.add_routes)
_UNRESOLVED = None  # a record whose customer could not be looked up (the store did not answer)
_UNAVAILABLE = {"result": "unavailable", "status": 503}


async def post_events(request: web.Request) -> web.Response:
    """Take one record or a batch; 200 with every result, 503 when the store missed some."""
    raws = await _records(request)
    if isinstance(raws, web.Response):
        return raws
    enforce = _ENFORCE.get(request.query.get("enforce"))
    if enforce is None:
        return problems.bad_request("enforce must be true or false")
    results = await take_records(request.app[COMPONENTS], raws, enforce=enforce, recent=request.app[RECENT])
    return _answer(results)


async def take_records(
    components: Components, raws: Sequence[object], *, enforce: bool, recent: RecentCustomers | None = None
) -> list[dict[str, Any]]:
    """Each record's result, in order: read, counted by the store in one round trip, and the
    ones it missed journaled or answered unavailable by their store_failure."""
    policy = components.holder.current
    known, unresolved = await _customers(components, policy, raws, recent or RecentCustomers(ttl=0))
    now = components.store.time()
    events = [
        _UNRESOLVED if _subject(raw) in unresolved else read_event(raw, policy, known.get, now)
        for raw in raws
    ]
    valid = [(i, e) for i, e in enumerate(events) if isinstance(e, Event)]
    records = [usage_record(policy, event, enforce=enforce) for _, event in valid]
    recorded = await components.store.record(records) if records else []
    results = [_invalid(i, raw, e) for i, (raw, e) in enumerate(zip(raws, events, strict=True))]
    for (index, event), record, outcome in zip(valid, records, recorded, strict=True):
        results[index] = _settled(components, policy, event, record, outcome) | {
            "index": index,
            "id": event.id,
        }
    _count(components, results)
    return results


async def _customers(
    components: Components, policy: Policy, raws: Sequence[object], recent: RecentCustomers
) -> tuple[dict[str, Customer], set[str]]:
    """The customers the records name (those of the last second remembered, the rest in one read
    of the directory); and the subjects it could not look up because the store did not answer (a
    stored customer cannot be told from an unknown one then: its records are unavailable, not
    invalid). The policy's own customers are known without the store, so their records still go
    by their store_failure. The read waits no longer than a request's store call
    (--store-timeout), so an outage is answered as fast."""
    subjects = {s for raw in raws if isinstance(s := _subject(raw), str)}
    found, missing = recent.split(subjects, policy)
    if not missing:
        return found, set()
    try:
        async with asyncio.timeout(components.settings.store_timeout):
            looked_up = await components.directory.customers(missing, policy)
    except (StoreUnavailable, TimeoutError):
        components.metrics.store_errors.labels("customers").inc()
        files = policy.customers
        return found | {s: files[s] for s in missing if s in files}, {s for s in missing if s not in files}
    recent.put(missing, looked_up)
    return found | looked_up, set()


def _subject(raw: object) -> object:
    return raw.get("subject") if isinstance(raw, dict) else None


def _invalid(index: int, raw: object, event: Event | Invalid | None) -> dict[str, Any]:
    if isinstance(event, Event):
        return {}  # filled in once the store has answered
    record_id = raw.get("id") if isinstance(raw, dict) else None
    if event is None:  # its customer could not be looked up: the store did not answer
        return {"index": index, "id": record_id if isinstance(record_id, str) else None, **_UNAVAILABLE}
    answer = {"index": index, "id": record_id if isinstance(record_id, str) else None, "result": "invalid"}
    return answer | {
        "field": event.field,
        "reason": f"{event.field}: {event.reason}" if event.field else event.reason,
    }


def _settled(
    components: Components, policy: Policy, event: Event, record: UsageRecord, recorded: Recorded
) -> dict[str, Any]:
    outcome = recorded.outcome
    if outcome is RecordOutcome.ACCEPTED:
        if policy.billing is not None and record.request.usage:
            components.marks.note(event.customer.id, event.at, policy.billing)
        return {"result": "accepted"}
    if outcome is RecordOutcome.DUPLICATE:
        return {"result": "duplicate"}
    if outcome is RecordOutcome.REFUSED:
        return _refused(recorded)
    return _missed(components, policy, event, record)


def _refused(recorded: Recorded) -> dict[str, Any]:
    limits = [s.charge.limit.name for s in recorded.limits if s.over and s.charge.enforced]
    credits = [c.charge.name for c in recorded.credits if c.over and c.charge.enforced]
    policies = limits + credits
    detail = f"enforced, and {', '.join(policies)} has no room for it; nothing was counted"
    return {"result": "refused", "violated-policies": policies, "detail": detail}


def _missed(components: Components, policy: Policy, event: Event, record: UsageRecord) -> dict[str, Any]:
    """The store did not answer for this record: journaled under open, 503 under closed."""
    failure = event.plan.store_failure or policy.store_failure
    if failure is StoreFailure.OPEN and keep_record_in_journal(
        components.journal, components.metrics, record
    ):
        return {"result": "accepted", "journaled": True}
    return dict(_UNAVAILABLE)


def _count(components: Components, results: list[dict[str, Any]]) -> None:
    tally = collections.Counter("journaled" if r.get("journaled") else r["result"] for r in results)
    for result, count in tally.items():
        components.metrics.records.labels(result).inc(count)
    if tally["unavailable"] or tally["journaled"]:
        components.metrics.store_errors.labels("record").inc()


def _answer(results: list[dict[str, Any]]) -> web.Response:
    tally = collections.Counter(r["result"] for r in results)
    body = {"results": results, **{name: tally[name] for name in _RESULTS}}
    if tally["unavailable"]:
        headers = {"Retry-After": str(problems.STORE_RETRY_AFTER)}
        return web.json_response(body, status=503, headers=headers)
    return web.json_response(body)


_RESULTS = ("accepted", "duplicate", "refused", "invalid", "unavailable")


async def _records(request: web.Request) -> list[object] | web.Response:
    """The records the body holds, or the answer for a body that cannot be taken."""
    kind = request.content_type
    if kind not in (SINGLE, BATCH):
        detail = f"send {SINGLE} (one record) or {BATCH} (an array of records), not {kind}"
        return problems.problem(415, "Unsupported Media Type", detail)
    declared = request.content_length
    data = None if declared is not None and declared > MAX_BODY_BYTES else await _capped(request.content)
    if data is None:
        return _too_large(f"a body of at most {MAX_BODY_BYTES} bytes")
    try:
        raw = json.loads(data)
    except ValueError:
        return problems.bad_request("the body is not JSON (UTF-8)")
    return _shaped(raw, single=kind == SINGLE)


def _shaped(raw: object, *, single: bool) -> list[object] | web.Response:
    if single:
        return [raw] if isinstance(raw, dict) else problems.bad_request(f"{SINGLE} is one JSON object")
    if not isinstance(raw, list):
        return problems.bad_request(f"{BATCH} is a JSON array of records")
    if len(raw) > MAX_RECORDS:
        return _too_large(f"at most {MAX_RECORDS} records a batch, got {len(raw)}")
    return raw


def _too_large(what: str) -> web.Response:
    return problems.problem(413, "Content Too Large", f"send {what}; split the batch")


async def _capped(stream: StreamReader) -> bytes | None:
    """The whole body, or None once it passes MAX_BODY_BYTES (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
