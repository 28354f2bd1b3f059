"""replies.admission reads a metering script's reply into the Admission it says, state by state."""

from __future__ import annotations

import pytest

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period
from sidecar.store.port import (
    Admission,
    CreditCharge,
    CreditState,
    LimitCharge,
    LimitState,
    MeterRequest,
    Outcome,
)
from sidecar.store.redis import codec as replies

MONTH = LimitCharge(Limit(meter="requests", limit=100, period=Period.MONTH), 1, (1_000, 2_000), True)
SECOND = LimitCharge(Limit(meter="requests", limit=5, period=Period.SECOND), 1, None, True)
TOKENS = CreditCharge("tokens", 0, True)


def request_of(limits: int, credits: int) -> MeterRequest:
    charges = (MONTH, SECOND, MONTH, SECOND)[:limits]
    return MeterRequest("acme", charges, (), 60, (TOKENS,) * credits)


@pytest.mark.parametrize(
    ("reply", "request_", "has_over", "expected"),
    [
        pytest.param(
            [1, 1_500, 250_000, 7, 3_000_000, 0, 2, 400_000, 0],
            request_of(2, 0),
            True,
            Admission(
                Outcome.ADMITTED,
                1_500.25,
                (LimitState(MONTH, 7, 3.0, False), LimitState(SECOND, 2, 0.4, False)),
            ),
            id="admitted",
        ),
        pytest.param(
            [0, 1_500, 0, 100, 500_000_000, 1, 90, 7, 0],
            request_of(1, 1),
            True,
            Admission(
                Outcome.REFUSED,
                1_500.0,
                (LimitState(MONTH, 100, 500.0, True),),
                (CreditState(TOKENS, 90, 7, False),),
            ),
            id="refused, with a credit",
        ),
        pytest.param(
            [-1, 1_600, 1, 0, 0, 0],
            request_of(1, 0),
            True,
            Admission(Outcome.STALE, 1_600.000001, ()),
            id="stale",
        ),
        pytest.param([1, 1_500, 0], None, True, Admission(Outcome.ADMITTED, 1_500.0, ()), id="a charge"),
        pytest.param(
            [1, 1_500, 0, 4, 1_000_000, 50, -3],
            request_of(1, 1),
            False,
            Admission(
                Outcome.ADMITTED,
                1_500.0,
                (LimitState(MONTH, 4, 1.0, False),),
                (CreditState(TOKENS, 50, -3, False),),
            ),
            id="read_limits: no over flags",
        ),
    ],
)
def test_a_reply_reads_as_the_admission_it_says(
    reply: list[int], request_: MeterRequest | None, has_over: bool, expected: Admission
) -> None:
    assert replies.admission(reply, request_, has_over=has_over) == expected
