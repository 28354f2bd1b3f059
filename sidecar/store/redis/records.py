"""Usage records in record.lua's layout: script calls of up to RECORDS_PER_CALL records, their
replies read back.

A batch of records (POST /admin/events) becomes few script calls, in order: on one server (or
behind Sentinel) any records may share a call; in a cluster, only records whose customers' keys
share a slot (each call touches one). The calls of one batch travel in one pipelined round trip
(pipeline.py), so the Redis work per record is a turn of the script's loop, not a round trip nor
a script call. A call is bounded, so Redis runs other clients' commands (the proxy's admissions)
between the calls of a large batch rather than after all of it.

What a record charges (its MeterRequest: limits, windows, credits, usage field) is its shape.
Records of one customer and shape (the same request object: admission/records.py builds one per
customer, meter, amount and day) share it: a call carries each shape once, and each record only
its shape, key, time, enforce flag and amount. A shape's RESP encoding is kept (Shapes), so a
customer's next batch does not encode it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot

from sidecar.store.port import CreditState, LimitState, MeterRequest, Recorded, RecordOutcome, UsageRecord
from sidecar.store.redis import keys, resp
from sidecar.store.redis.codec import store_time

_OUTCOMES = {1: RecordOutcome.ACCEPTED, 0: RecordOutcome.DUPLICATE, 2: RecordOutcome.REFUSED}
SHAPES_KEPT = 50_000  # encoded shapes remembered; past it, the memory starts afresh
RECORDS_PER_CALL = 100  # a call runs about 10-15 µs of Redis a record, so at most a few ms


def by_call(records: Sequence[UsageRecord], *, sharded: bool) -> list[list[int]]:
    """The positions of the records of each script call, in order: in a cluster (``sharded``) by
    the slot of their customer's keys, on one server all together; RECORDS_PER_CALL at most a
    call."""
    groups: dict[int, list[int]] = {}
    for index, record in enumerate(records):
        slot = key_slot(keys.usage(record.request.customer_id).encode()) if sharded else 0
        groups.setdefault(slot, []).append(index)
    return [
        group[i : i + RECORDS_PER_CALL]
        for group in groups.values()
        for i in range(0, len(group), RECORDS_PER_CALL)
    ]


def amount_of(request: MeterRequest) -> int:
    """The one amount a record's request adds to each of its charges."""
    for charges in (request.usage, request.limits, request.credits):
        if charges:
            return charges[0].amount
    return 0


def shape_arguments(request: MeterRequest) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of one shape, as record.lua's read_shape reads them: calendar quotas only."""
    customer = request.customer_id
    key_list: list[str] = []
    args: list[Any] = [request.billing_interval, len(request.limits)]
    for charge in request.limits:
        if charge.window is None:
            raise ValueError(f"a record charges calendar windows only, not {charge.limit.name}")
        key_list.append(keys.quota(customer, charge.limit.name, charge.window[0]))
        mode = "a" if charge.allowance else "h" if charge.enforced else "s"
        args += (charge.limit.ceiling, mode, charge.window[1])
    args.append(len(request.credits))
    for credit in request.credits:
        key_list += (
            keys.credit_left(customer, credit.meter),
            keys.credit_expiries(customer, credit.meter),
            keys.overdraft(customer, credit.meter),
        )
        args += ("h" if credit.enforced else "s", len(credit.allowances), *(i + 1 for i in credit.allowances))
    key_list.append(keys.usage(customer))
    usage = request.usage[0] if request.usage else None
    args += (f"{usage.meter}|{usage.feature}", usage.op) if usage else ("", "+")
    args.append(len(request.thresholds))  # threshold notifications (notify_lib.lua): plan, thresholds
    if request.thresholds:
        key_list.append(keys.notify_outbox(customer))
        args += (request.plan, *request.thresholds)
    return key_list, args


class Shapes:
    """RESP encodings of record shapes (their KEYS, then their ARGV), by request object."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[MeterRequest, int, bytes, int, bytes]] = {}

    def encoded(self, request: MeterRequest) -> tuple[int, bytes, int, bytes]:
        """(number of keys, their RESP, number of ARGV, their RESP) of one shape."""
        kept = self._kept.get(id(request))
        if kept is None or kept[0] is not request:
            if len(self._kept) >= SHAPES_KEPT:
                self._kept.clear()
            key_list, args = shape_arguments(request)
            key_bytes = b"".join([resp.bulk(key) for key in key_list])
            kept = (
                request,
                len(key_list),
                key_bytes,
                len(args),
                b"".join([resp.bulk(value) for value in args]),
            )
            self._kept[id(request)] = kept
        return kept[1:]


def record_call(sha: str, records: Sequence[UsageRecord], shapes: Shapes) -> bytes:
    """The EVALSHA of record.lua for these records, in RESP."""
    index: dict[int, int] = {}
    keys_out: list[bytes] = []
    shape_args: list[bytes] = []
    tail: list[bytes] = [resp.bulk(len(records))]
    n_keys = n_args = 0
    for record in records:
        request = record.request
        position = index.get(id(request))
        if position is None:
            position = index[id(request)] = len(index) + 1
            keys_count, keys_bytes, args_count, args_bytes = shapes.encoded(request)
            keys_out.append(keys_bytes)
            shape_args.append(args_bytes)
            n_keys, n_args = n_keys + keys_count, n_args + args_count
        flag = b"1" if record.enforce else b"0"
        tail.append(
            b"%s%s%s%s%s"
            % (
                _int(position),
                resp.bulk(record.dedupe.key),
                _int(int(record.at)),
                _bulk(flag),
                _int(amount_of(request)),
            )
        )
    seconds = records[0].dedupe.seconds
    length = 3 + n_keys + 2 + n_args + 1 + 5 * len(records)  # EVALSHA sha numkeys, KEYS, ARGV
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (length, sha.encode(), _int(n_keys))
    return b"".join([head, *keys_out, _int(seconds), _int(len(index)), *shape_args, *tail])


def _int(value: int) -> bytes:
    text = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(text), text)


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def read_reply(reply: Sequence[Any], records: Sequence[UsageRecord]) -> list[Recorded]:
    """Each record's outcome, in the order given; a refused one with its limits and credits."""
    at = store_time([0, reply[0], reply[1]])
    index = 2
    results = []
    for record in records:
        outcome = _OUTCOMES[int(reply[index])]
        index += 1
        if outcome is not RecordOutcome.REFUSED:
            results.append(Recorded(outcome, at))
            continue
        limits, index = _limit_states(reply, index, record.request)
        credits, index = _credit_states(reply, index, record.request)
        results.append(Recorded(outcome, at, limits, credits))
    return results


def _limit_states(
    reply: Sequence[Any], index: int, request: MeterRequest
) -> tuple[tuple[LimitState, ...], int]:
    states = []
    for charge in request.limits:
        over = bool(int(reply[index + 2]))
        states.append(LimitState(charge, int(reply[index]), int(reply[index + 1]) / 1e6, over))
        index += 3
    return tuple(states), index


def _credit_states(
    reply: Sequence[Any], index: int, request: MeterRequest
) -> tuple[tuple[CreditState, ...], int]:
    states = []
    for credit in request.credits:
        over = bool(int(reply[index + 2]))
        states.append(CreditState(credit, int(reply[index]), int(reply[index + 1]), over))
        index += 3
    return tuple(states), index
