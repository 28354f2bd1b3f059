"""meter_request: what one admitted request charges, with the window charges shared per window;
and each limit algorithm's two halves, admission's window and the store's arguments."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from sidecar.admission import algorithms
from sidecar.admission.plan import meter_request
from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Algorithm, Customer, Limit, Policy
from sidecar.config.policy.windows import Period
from sidecar.store.port import LimitCharge
from sidecar.store.redis import keys
from sidecar.store.redis.limit_kinds import LIMIT_KINDS
from sidecar.store.redis.store import script_arguments
from tests.conftest import write_policy

JAN_10 = datetime(2026, 1, 10, tzinfo=UTC).timestamp()
FEB_10 = datetime(2026, 2, 10, tzinfo=UTC).timestamp()
JAN_1, FEB_1, MAR_1 = (int(datetime(2026, m, 1, tzinfo=UTC).timestamp()) for m in (1, 2, 3))


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return load_policy(
        write_policy(
            tmp_path,
            """
            version: 1
            meters:
              requests: {aggregation: count}
              tokens: {aggregation: sum, source: "response.header:X-Tokens", reserve: 50}
            features: [{name: chat, match: {path: /chat}}]
            plans:
              p:
                features: [chat]
                limits:
                  - {meter: requests, limit: 100, period: month}
                  - {meter: requests, limit: 5, period: second}
                  - {meter: tokens, limit: 1000, period: month}
            customers:
              acme: {plan: p, api_keys: []}
            """,
        )
    )


def charges(
    policy: Policy, now: float, customer: Customer | None = None, **reserved: int
) -> tuple[LimitCharge, ...]:
    customer = customer or policy.customers["acme"]
    return meter_request(policy, customer, "chat", policy.charges[("p", "chat")], now, reserved).limits


def test_a_request_that_reserves_nothing_charges_each_limit_in_the_window_of_now(policy: Policy) -> None:
    month, second, tokens = (spec.limit for spec in policy.charges[("p", "chat")].limits)
    assert charges(policy, JAN_10) == (
        LimitCharge(month, 1, (JAN_1, FEB_1), True),
        LimitCharge(second, 1, None, True),
        LimitCharge(tokens, 0, (JAN_1, FEB_1), True, counts_requests=False),
    )
    assert charges(policy, FEB_10)[0].window == (FEB_1, MAR_1)


def test_requests_in_one_window_share_its_charges_and_the_next_window_gets_its_own(policy: Policy) -> None:
    first, again, later = charges(policy, JAN_10), charges(policy, JAN_10 + 3600), charges(policy, FEB_10)
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert first[0] is not later[0] and first[0].window != later[0].window
    assert first[1] is later[1]  # a rate limit has no calendar window


def test_each_billing_anchor_gets_its_own_month_window(policy: Policy) -> None:
    anchored = Customer(id="bob", plan="p", billing_anchor=date(2025, 12, 15))
    assert charges(policy, JAN_10, anchored)[0].window == (
        int(datetime(2025, 12, 15, tzinfo=UTC).timestamp()),
        int(datetime(2026, 1, 15, tzinfo=UTC).timestamp()),
    )
    assert charges(policy, JAN_10)[0].window == (JAN_1, FEB_1)


def test_a_reserving_request_charges_what_it_holds(policy: Policy) -> None:
    _, _, tokens = charges(policy, JAN_10, tokens=300)
    assert (tokens.amount, tokens.reserved) == (300, True)
    assert charges(policy, JAN_10)[2].amount == 0  # and the shared charge is left as it was


def test_the_shared_charges_are_bounded(policy: Policy) -> None:
    day = 86_400
    for n in range(24 * 31):  # two years of month windows, a month apart each
        charges(policy, JAN_10 + n * 31 * day)
    assert all(len(spec.charges) <= 64 for spec in policy.charges[("p", "chat")].limits)


def test_every_algorithm_has_a_window_rule_and_a_store_kind() -> None:
    assert set(algorithms.WINDOWS) == set(Algorithm) == set(LIMIT_KINDS)
    assert len({kind.tag for kind in LIMIT_KINDS.values()}) == len(LIMIT_KINDS)


def test_a_calendar_quota_names_its_window_and_a_moving_window_none() -> None:
    month = Limit(meter="requests", limit=100, period=Period.MONTH)
    minute = Limit(meter="requests", limit=5, period=Period.MINUTE)
    assert (month.algorithm, minute.algorithm) == (Algorithm.CALENDAR_QUOTA, Algorithm.MOVING_WINDOW)
    assert algorithms.window(month, JAN_10, None) == (JAN_1, FEB_1)
    assert algorithms.window(minute, JAN_10, None) is None


def test_each_algorithm_lays_out_its_kind_tag_keys_and_window(policy: Policy) -> None:
    request = meter_request(policy, policy.customers["acme"], "chat", policy.charges[("p", "chat")], JAN_10)
    key_list, args = script_arguments(request)
    # Per limit: kind tag, amount, ceiling, mode, then the algorithm's two window values.
    assert args[6:24] == [
        *("c", 1, 100, "h", JAN_1, FEB_1),
        *("r", 1, 5, "h", 1_000_000, 0),
        *("c", 0, 1000, "h", JAN_1, FEB_1),
    ]
    assert key_list[2:6] == [  # after the customer's two reservation keys
        keys.quota("acme", "requests-month", JAN_1),
        keys.rate_log("acme", "requests-second"),
        keys.rate_total("acme", "requests-second"),
        keys.quota("acme", "tokens-month", JAN_1),
    ]
