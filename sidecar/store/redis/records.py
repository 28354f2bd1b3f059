"""Usage records in record.lua's layout: one script call per customer, its reply read back.

A batch of records (POST /admin/events) becomes one call per customer it names, each carrying
that customer's records in order; the calls of one batch travel in one pipelined round trip
(pipeline.py), so the Redis work per record is a script's loop turn, not a round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.store.port import CreditState, LimitState, Recorded, RecordOutcome, UsageRecord
from sidecar.store.redis.codec import store_time

_OUTCOMES = {1: RecordOutcome.ACCEPTED, 0: RecordOutcome.DUPLICATE, 2: RecordOutcome.REFUSED}


def by_customer(records: Sequence[UsageRecord]) -> dict[str, list[int]]:
    """The positions of each customer's records, in order: one script call each."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(record.request.customer_id, []).append(index)
    return groups


def read_reply(reply: Sequence[Any], records: Sequence[UsageRecord]) -> list[Recorded]:
    """Each record's outcome, in the order given."""
    at = store_time([0, reply[0], reply[1]])
    index = 2
    results = []
    for record in records:
        outcome = _OUTCOMES[int(reply[index])]
        index += 1
        limits = []
        for charge in record.request.limits:
            over = bool(int(reply[index + 2]))
            limits.append(LimitState(charge, int(reply[index]), int(reply[index + 1]) / 1e6, over))
            index += 3
        credits = []
        for credit in record.request.credits:
            over = bool(int(reply[index + 2]))
            credits.append(CreditState(credit, int(reply[index]), int(reply[index + 1]), over))
            index += 3
        results.append(Recorded(outcome, at, tuple(limits), tuple(credits)))
    return results
