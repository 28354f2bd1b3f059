"""calendar_window remembers the last window per (period, anchor day): the answers must be the
same as computing each one, whatever order the times come in, across boundaries and anchors."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime

import pytest

from sidecar.config.policy import windows
from sidecar.config.policy.windows import Period

JAN_31 = date(2026, 1, 31)


@pytest.mark.parametrize("period", [Period.DAY, Period.WEEK, Period.MONTH])
@pytest.mark.parametrize("anchor", [None, JAN_31, date(2025, 6, 15)])
def test_remembered_windows_equal_computed_ones(period: Period, anchor: date | None) -> None:
    start = datetime(2026, 1, 27, tzinfo=UTC).timestamp()
    rng = random.Random(5)
    moments = sorted(start + rng.uniform(0, 70 * 86400) for _ in range(400))
    moments += [m - 1e-6 for m in moments[:50]] + rng.sample(moments, 100)  # back in time, shuffled
    for now in moments:
        assert windows.calendar_window(period, now, anchor) == windows._calendar_window(period, now, anchor)


def test_a_window_end_belongs_to_the_next_window() -> None:
    end = windows.calendar_window(Period.DAY, datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp())[1]
    assert windows.calendar_window(Period.DAY, end)[0] == end
    assert windows.calendar_window(Period.DAY, end - 0.001)[1] == end
