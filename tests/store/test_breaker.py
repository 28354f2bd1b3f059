"""The circuit breaker's states, on a clock the test moves."""

from __future__ import annotations

from sidecar.store.redis.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_it_stays_closed_below_the_threshold() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=Clock())
    for _ in range(2):
        breaker.failed()
    assert breaker.allow() and not breaker.is_open


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=Clock())
    for outcome in (breaker.failed, breaker.failed, breaker.succeeded, breaker.failed, breaker.failed):
        outcome()
    assert not breaker.is_open


def test_it_opens_after_threshold_failures_in_a_row_and_refuses_calls() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=Clock())
    for _ in range(3):
        breaker.failed()
    assert breaker.is_open and not breaker.allow()


def test_after_the_cooldown_one_probe_goes_through_at_a_time() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.failed()
    clock.now += 1.0
    assert breaker.allow()
    assert not breaker.allow()


def test_a_failed_probe_opens_it_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.failed()
    clock.now += 1.0
    assert breaker.allow()
    breaker.failed()
    clock.now += 0.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()


def test_a_successful_probe_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.failed()
    clock.now += 1.0
    assert breaker.allow()
    breaker.succeeded()
    assert not breaker.is_open and breaker.allow() and breaker.allow()
