"""The store clock estimate: the least-delayed reply wins; old samples give way."""

from __future__ import annotations

from sidecar.store.redis.clock import SAMPLE_SECONDS, StoreClock


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_000.0
        self.monotonic = 50.0


def clock_with(clocks: Clocks) -> StoreClock:
    return StoreClock(wall=lambda: clocks.wall, monotonic=lambda: clocks.monotonic)


def test_the_first_reply_sets_the_estimate() -> None:
    clocks = Clocks()
    clock = clock_with(clocks)
    clock.learn(1_005.0)
    assert clock.now() == 1_005.0


def test_a_reply_handled_late_does_not_pull_the_estimate_back() -> None:
    clocks = Clocks()
    clock = clock_with(clocks)
    clock.learn(1_005.0)
    clocks.wall += 0.030  # this reply's TIME was taken 30 ms before it was handled
    clock.learn(1_005.0)
    assert clock.now() == 1_005.030


def test_a_sample_older_than_a_second_gives_way_to_a_smaller_one() -> None:
    clocks = Clocks()
    clock = clock_with(clocks)
    clock.learn(1_005.0)
    clocks.monotonic += SAMPLE_SECONDS + 0.1
    clock.learn(1_004.0)  # the local clock was stepped forward by a second
    assert clock.now() == 1_004.0
