"""A journal entry on disk: one JSON object a line, versioned, describing usage, not a script call.

Version 3, written by this release, says what the request used, so that a change to a Lua
script's arguments does not break journals written before an upgrade (the store lays the
arguments out when it merges, store/redis/store.py replay_arguments):

    {"v": 3, "id": "<hex>", "customer": "acme", "at": 1767225600.0,
     "call": ["<token>", 7, <deadline µs>],                  # only when its reply never came
     "request": {"billing_interval": 60, "holds": false, "hold": null,
                 "limits": [{"meter": "requests", "feature": null, "period": "month",
                             "ceiling": 1000, "amount": 1, "window": [start, end],
                             "enforced": true, "counts_requests": true,
                             "allowance": false, "reserved": false}],
                 "credits": [{"meter": "tokens", "amount": 25, "enforced": true,
                              "allowances": [0], "reserved": false, "counts_requests": false}],
                 "usage": [{"meter": "requests", "feature": "search", "amount": 1, "op": "+",
                            "distinct": ""}]}}
    {"v": 3, "id": "<hex>", "customer": "acme", "at": 1767225600.0, "void": ["<token>", 9, 0]}

A usage record's entry (POST /admin/events, kept under ``store_failure: open`` while the store was
down) also has ``"record": {"key": "<24 hex digits>", "seconds": 86400}``, its Dedupe: it merges
as a record, once per key (store/redis/store.py). A release that does not know the member merges
it as plain usage, once per entry.

A request that watches notification thresholds also has ``"notify": {"plan": "pro",
"thresholds": [80, 100]}`` in its ``request``, so a merge records the crossings it makes (SPEC §9);
a release that does not know the member merges the usage without them.

A limit is written as what identifies it (meter, feature, period: its name, requests-month, is
built from them as the policy builds it) and its ceiling, not as the policy's Limit; ``window``
is null for a moving window. Versions 1 and 2 (the release before) kept the scripts' KEYS and
ARGV; they are read as ScriptEntry and merged as they are (tests/fixtures/journal/).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period
from sidecar.errors import UnansweredCall
from sidecar.store.port import (
    CreditCharge,
    Dedupe,
    Hold,
    JournalEntry,
    LimitCharge,
    MeterRequest,
    ScriptEntry,
    UsageCharge,
    UsageEntry,
    VoidEntry,
)

VERSION = 3


class UnreadableEntry(ValueError):
    """A journal line this release cannot read: cut short by a crash mid-write, or written by a
    release that knows a later version."""


def encode(entry: UsageEntry | VoidEntry) -> str:
    """The line (without its newline) that keeps ``entry`` in a segment."""
    head = {"v": VERSION, "id": entry.id, "customer": entry.customer_id, "at": entry.at}
    if isinstance(entry, VoidEntry):
        return json.dumps({**head, "void": entry.call.fields()})
    named: dict[str, object] = {} if entry.call is None else {"call": entry.call.fields()}
    if entry.dedupe is not None:
        named["record"] = {"key": entry.dedupe.key.hex(), "seconds": entry.dedupe.seconds}
    return json.dumps({**head, **named, "request": _request_fields(entry.request)})


def decode(line: str) -> JournalEntry:
    """The entry a segment's line keeps, of any version this release reads."""
    try:
        fields = json.loads(line)
    except ValueError as error:
        raise UnreadableEntry("incomplete (a crash mid-write)") from error
    read = _READERS.get(fields.get("v")) if isinstance(fields, dict) else None
    if read is None:
        raise UnreadableEntry(f"of a version this release does not read: {line[:40]!r}")
    try:
        return read(fields)
    except (KeyError, TypeError, ValueError) as error:
        raise UnreadableEntry(f"malformed ({type(error).__name__}: {error})") from error


def _read_current(fields: dict[str, Any]) -> JournalEntry:
    if "void" in fields:
        return _void(fields)
    request = _request(str(fields["customer"]), fields["request"])
    entry_id, at, call = str(fields["id"]), float(fields["at"]), _call(fields.get("call"))
    return UsageEntry(entry_id, at, request, call, _dedupe(fields.get("record")))


def _dedupe(fields: dict[str, Any] | None) -> Dedupe | None:
    return None if fields is None else Dedupe(bytes.fromhex(str(fields["key"])), int(fields["seconds"]))


def _read_earlier(fields: dict[str, Any]) -> JournalEntry:
    """Versions 1 and 2: a void, or the KEYS and ARGV of the release that wrote it."""
    if "void" in fields:
        return _void(fields)
    return ScriptEntry(
        id=str(fields["id"]),
        customer_id=str(fields["customer"]),
        at=float(fields["at"]),
        keys=tuple(str(key) for key in fields["keys"]),
        args=tuple(fields["args"]),
        call=_call(fields.get("call")),
    )


_READERS: dict[object, Callable[[dict[str, Any]], JournalEntry]] = {
    1: _read_earlier,
    2: _read_earlier,
    VERSION: _read_current,
}


def _void(fields: dict[str, Any]) -> VoidEntry:
    call = UnansweredCall.from_fields(fields["void"])
    return VoidEntry(str(fields["id"]), str(fields["customer"]), float(fields["at"]), call)


def _call(fields: list[str | int] | None) -> UnansweredCall | None:
    return None if fields is None else UnansweredCall.from_fields(fields)


def _request_fields(request: MeterRequest) -> dict[str, Any]:
    hold = request.hold
    fields = {
        "billing_interval": request.billing_interval,
        "holds": request.holds,
        "hold": None if hold is None else {"id": hold.id, "ttl": hold.ttl},
        "limits": [_limit_fields(charge) for charge in request.limits],
        "credits": [_credit_fields(charge) for charge in request.credits],
        "usage": [_usage_fields(charge) for charge in request.usage],
    }
    if request.thresholds:  # only then: an entry of a request watching none reads as it always did
        fields["notify"] = {"plan": request.plan, "thresholds": list(request.thresholds)}
    return fields


def _request(customer_id: str, fields: dict[str, Any]) -> MeterRequest:
    hold = fields["hold"]
    return MeterRequest(
        customer_id=customer_id,
        limits=tuple(_limit_charge(limit) for limit in fields["limits"]),
        usage=tuple(_usage_charge(usage) for usage in fields["usage"]),
        billing_interval=int(fields["billing_interval"]),
        credits=tuple(_credit_charge(credit) for credit in fields["credits"]),
        hold=None if hold is None else Hold(str(hold["id"]), int(hold["ttl"])),
        holds=bool(fields["holds"]),
        plan=str(fields.get("notify", {}).get("plan", "")),
        thresholds=tuple(int(t) for t in fields.get("notify", {}).get("thresholds", ())),
    )


def _limit_fields(charge: LimitCharge) -> dict[str, Any]:
    limit = charge.limit
    return {
        "meter": limit.meter,
        "feature": limit.feature,
        "period": limit.period.value,
        "ceiling": limit.ceiling,
        "amount": charge.amount,
        "window": None if charge.window is None else list(charge.window),
        "enforced": charge.enforced,
        "counts_requests": charge.counts_requests,
        "allowance": charge.allowance,
        "reserved": charge.reserved,
    }


def _limit_charge(fields: dict[str, Any]) -> LimitCharge:
    """The charge, on a Limit rebuilt from what identifies it: the same name and ceiling, so the
    same keys and arguments; what the policy says beyond that (burst, on_exceed) the merge does
    not use (``enforced`` is the charge's own)."""
    limit = Limit(
        meter=str(fields["meter"]),
        limit=int(fields["ceiling"]),
        period=Period(fields["period"]),
        feature=None if fields["feature"] is None else str(fields["feature"]),
    )
    window = fields["window"]
    return LimitCharge(
        limit=limit,
        amount=int(fields["amount"]),
        window=None if window is None else (int(window[0]), int(window[1])),
        enforced=bool(fields["enforced"]),
        counts_requests=bool(fields["counts_requests"]),
        allowance=bool(fields["allowance"]),
        reserved=bool(fields["reserved"]),
    )


def _credit_fields(charge: CreditCharge) -> dict[str, Any]:
    return {
        "meter": charge.meter,
        "amount": charge.amount,
        "enforced": charge.enforced,
        "allowances": list(charge.allowances),
        "reserved": charge.reserved,
        "counts_requests": charge.counts_requests,
    }


def _credit_charge(fields: dict[str, Any]) -> CreditCharge:
    return CreditCharge(
        meter=str(fields["meter"]),
        amount=int(fields["amount"]),
        enforced=bool(fields["enforced"]),
        allowances=tuple(int(index) for index in fields["allowances"]),
        reserved=bool(fields["reserved"]),
        counts_requests=bool(fields["counts_requests"]),
    )


def _usage_fields(charge: UsageCharge) -> dict[str, Any]:
    return {
        "meter": charge.meter,
        "feature": charge.feature,
        "amount": charge.amount,
        "op": charge.op,
        "distinct": charge.distinct,
    }


def _usage_charge(fields: dict[str, Any]) -> UsageCharge:
    return UsageCharge(
        meter=str(fields["meter"]),
        feature=str(fields["feature"]),
        amount=int(fields["amount"]),
        op=str(fields["op"]),
        distinct=str(fields["distinct"]),
    )
