"""The reply of a metering script (check_and_meter, charge, read_limits) read into an Admission.

Pure, and on the hot path: every admitted request's reply passes through `admission`. It walks
the flat reply by index and builds the states positionally, where one generator per section with
keyword arguments took 4.9 µs for a two-limit reply against 3.0 µs (BENCHMARKS.md, "Per-request
cost, session 3").

The layout, as lib.lua writes it: ``[outcome, seconds, microseconds]``, then per limit of the
request ``used, reset (µs)[, over]`` and per credit ``granted, balance[, over]``; ``over`` is
absent from read_limits replies (``has_over=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.store.port import Admission, CreditState, LimitState, MeterRequest, Outcome

OUTCOMES = {1: Outcome.ADMITTED, 0: Outcome.REFUSED, -1: Outcome.STALE}


def store_time(reply: Sequence[Any]) -> float:
    """The store's clock when the script ran, in epoch seconds."""
    return int(reply[1]) + int(reply[2]) / 1e6


def admission(reply: Sequence[Any], request: MeterRequest | None, *, has_over: bool = True) -> Admission:
    """The Admission a reply says, its states in the request's order; none for a STALE reply or
    when ``request`` is None (a charge, whose caller reads only the outcome and the time).
    The outcome must be one of OUTCOMES: an expired script is the caller's to refuse first."""
    outcome = OUTCOMES[int(reply[0])]
    at = store_time(reply)
    if outcome is Outcome.STALE or request is None:
        return Admission(outcome, at, ())
    stride = 3 if has_over else 2
    index = 3
    limits = []
    for charge in request.limits:
        over = has_over and bool(int(reply[index + 2]))
        limits.append(LimitState(charge, int(reply[index]), int(reply[index + 1]) / 1e6, over))
        index += stride
    credits = []
    for credit in request.credits:
        over = has_over and bool(int(reply[index + 2]))
        credits.append(CreditState(credit, int(reply[index]), int(reply[index + 1]), over))
        index += stride
    return Admission(outcome, at, tuple(limits), tuple(credits))
