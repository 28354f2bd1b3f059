"""Pure window arithmetic (STYLE 6): fixed `now` values in, literal epoch boundaries out."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from sidecar.config.policy.windows import Period, billing_window, calendar_window, rfc3339


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


def anchor(day: int) -> date:
    return date(2026, 1, day)


def case(name: str, *values: object) -> object:
    return pytest.param(*values, id=name)


# -- day and week ----------------------------------------------------------------------------

DAY, WEEK = Period.DAY, Period.WEEK
# fmt: off
DAY_AND_WEEK = [
    case("day-midday", DAY, at(2026, 3, 15, 13, 45, 10), at(2026, 3, 15), at(2026, 3, 16)),
    case("day-last-second", DAY, at(2026, 3, 15, 23, 59, 59), at(2026, 3, 15), at(2026, 3, 16)),
    case("day-feb-28-non-leap", DAY, at(2027, 2, 28, 12), at(2027, 2, 28), at(2027, 3, 1)),
    case("day-feb-29-leap", DAY, at(2028, 2, 29, 12), at(2028, 2, 29), at(2028, 3, 1)),
    case("day-new-year-eve", DAY, at(2026, 12, 31, 18), at(2026, 12, 31), at(2027, 1, 1)),
    case("week-sunday-ends-monday-9s-week", WEEK, at(2026, 3, 15, 23), at(2026, 3, 9), at(2026, 3, 16)),
    case("week-monday-midday", WEEK, at(2026, 3, 16, 12), at(2026, 3, 16), at(2026, 3, 23)),
    case("week-across-year-end", WEEK, at(2027, 1, 1, 9), at(2026, 12, 28), at(2027, 1, 4)),
]
# fmt: on


@pytest.mark.parametrize(("period", "now", "start", "end"), DAY_AND_WEEK)
def test_day_and_iso_week_windows_are_utc_calendar_windows(
    period: Period, now: int, start: int, end: int
) -> None:
    assert calendar_window(period, now) == (start, end)


# -- calendar months and billing anchors --------------------------------------------------------

# anchor day (None: calendar month), now, expected start, expected end
# fmt: off
MONTHS = [
    case("calendar-mid-month", None, at(2026, 3, 15, 13), at(2026, 3, 1), at(2026, 4, 1)),
    case("calendar-dec-to-jan", None, at(2026, 12, 31, 23, 59, 59), at(2026, 12, 1), at(2027, 1, 1)),
    case("calendar-jan-after-rollover", None, at(2027, 1, 1, 0, 0, 1), at(2027, 1, 1), at(2027, 2, 1)),
    case("calendar-feb-leap", None, at(2028, 2, 29, 23), at(2028, 2, 1), at(2028, 3, 1)),
    case("anchor-15-before-the-15th", 15, at(2026, 3, 10), at(2026, 2, 15), at(2026, 3, 15)),
    case("anchor-15-after-the-15th", 15, at(2026, 3, 20), at(2026, 3, 15), at(2026, 4, 15)),
    case("anchor-15-jan-10-starts-dec-15", 15, at(2027, 1, 10), at(2026, 12, 15), at(2027, 1, 15)),
    case("anchor-15-dec-20-ends-jan-15", 15, at(2026, 12, 20), at(2026, 12, 15), at(2027, 1, 15)),
    case("anchor-31-april-starts-apr-30", 31, at(2026, 4, 30, 12), at(2026, 4, 30), at(2026, 5, 31)),
    case("anchor-31-apr-29-still-march", 31, at(2026, 4, 29, 12), at(2026, 3, 31), at(2026, 4, 30)),
    case("anchor-31-may", 31, at(2026, 5, 31, 1), at(2026, 5, 31), at(2026, 6, 30)),
    case("anchor-31-leap-feb-29-starts", 31, at(2028, 2, 29, 10), at(2028, 2, 29), at(2028, 3, 31)),
    case("anchor-31-leap-feb-28-still-jan", 31, at(2028, 2, 28, 10), at(2028, 1, 31), at(2028, 2, 29)),
    case("anchor-31-feb-28-starts", 31, at(2027, 2, 28, 10), at(2027, 2, 28), at(2027, 3, 31)),
    case("anchor-31-feb-27-still-jan", 31, at(2027, 2, 27, 10), at(2027, 1, 31), at(2027, 2, 28)),
    case("anchor-31-mar-1-still-feb", 31, at(2027, 3, 1), at(2027, 2, 28), at(2027, 3, 31)),
    case("anchor-30-leap-feb-29-starts", 30, at(2028, 2, 29, 10), at(2028, 2, 29), at(2028, 3, 30)),
    case("anchor-30-leap-feb-28-still-jan", 30, at(2028, 2, 28, 10), at(2028, 1, 30), at(2028, 2, 29)),
    case("anchor-30-feb-28-starts", 30, at(2027, 2, 28, 10), at(2027, 2, 28), at(2027, 3, 30)),
    case("anchor-30-mar-29-still-feb", 30, at(2027, 3, 29, 23), at(2027, 2, 28), at(2027, 3, 30)),
    case("anchor-29-leap-feb-29-starts", 29, at(2028, 2, 29, 10), at(2028, 2, 29), at(2028, 3, 29)),
    case("anchor-29-leap-feb-28-still-jan", 29, at(2028, 2, 28, 10), at(2028, 1, 29), at(2028, 2, 29)),
    case("anchor-29-feb-28-starts", 29, at(2027, 2, 28, 10), at(2027, 2, 28), at(2027, 3, 29)),
    case("anchor-29-feb-27-still-jan", 29, at(2027, 2, 27, 10), at(2027, 1, 29), at(2027, 2, 28)),
    case("anchor-1-is-the-calendar", 1, at(2026, 12, 31, 23), at(2026, 12, 1), at(2027, 1, 1)),
]
# fmt: on


@pytest.mark.parametrize(("anchor_day", "now", "start", "end"), MONTHS)
def test_month_window_starts_on_the_anchor_day_clamped_to_short_months(
    anchor_day: int | None, now: int, start: int, end: int
) -> None:
    billing_anchor = None if anchor_day is None else anchor(anchor_day)
    assert calendar_window(Period.MONTH, now, billing_anchor) == (start, end)


def test_anchor_31_walks_jan_feb_mar_apr_may_without_drifting() -> None:
    starts = []
    now = at(2027, 1, 31)
    for _ in range(5):
        start, end = calendar_window(Period.MONTH, now, anchor(31))
        starts.append(start)
        now = end
    assert starts == [at(2027, 1, 31), at(2027, 2, 28), at(2027, 3, 31), at(2027, 4, 30), at(2027, 5, 31)]


def test_anchor_year_and_month_do_not_matter_only_its_day() -> None:
    now = at(2027, 6, 20)
    expected = calendar_window(Period.MONTH, now, anchor(15))
    assert calendar_window(Period.MONTH, now, date(2020, 11, 15)) == expected


# -- `now` exactly on a boundary belongs to the new window -------------------------------------

MONTH = Period.MONTH
# fmt: off
BOUNDARIES = [
    case("day-midnight", DAY, None, at(2026, 3, 16), at(2026, 3, 16), at(2026, 3, 17)),
    case("week-monday-midnight", WEEK, None, at(2026, 3, 16), at(2026, 3, 16), at(2026, 3, 23)),
    case("month-first-midnight", MONTH, None, at(2027, 1, 1), at(2027, 1, 1), at(2027, 2, 1)),
    case("anchor-15-midnight", MONTH, 15, at(2026, 3, 15), at(2026, 3, 15), at(2026, 4, 15)),
    case("anchor-31-apr-30-midnight", MONTH, 31, at(2026, 4, 30), at(2026, 4, 30), at(2026, 5, 31)),
    case("anchor-31-leap-feb-29-midnight", MONTH, 31, at(2028, 2, 29), at(2028, 2, 29), at(2028, 3, 31)),
]
# fmt: on


@pytest.mark.parametrize(("period", "anchor_day", "boundary", "start", "end"), BOUNDARIES)
def test_now_exactly_on_a_boundary_opens_the_new_window(
    period: Period, anchor_day: int | None, boundary: int, start: int, end: int
) -> None:
    billing_anchor = None if anchor_day is None else anchor(anchor_day)
    assert calendar_window(period, boundary, billing_anchor) == (start, end)
    previous = calendar_window(period, boundary - 1, billing_anchor)
    assert previous[1] == boundary
    assert calendar_window(period, boundary - 0.001, billing_anchor) == previous


def test_fractional_now_just_before_midnight_stays_in_the_old_day() -> None:
    assert calendar_window(Period.DAY, at(2026, 3, 16) - 0.0005) == (at(2026, 3, 15), at(2026, 3, 16))


@pytest.mark.parametrize("period", [Period.SECOND, Period.MINUTE, Period.HOUR])
def test_rate_periods_have_no_calendar_window(period: Period) -> None:
    with pytest.raises(ValueError, match=period.value):
        calendar_window(period, at(2026, 3, 15))


# -- billing summary windows ---------------------------------------------------------------------

LATE_LUNCH = at(2026, 3, 15, 13, 45, 10)
# fmt: off
BILLING = [
    case("minute-inside", 1000.7, 60, 960, 1020),
    case("minute-on-boundary-is-new-window", 1020, 60, 1020, 1080),
    case("minute-one-before-boundary", 1019.999, 60, 960, 1020),
    case("hour-aligned-to-epoch", LATE_LUNCH, 3600, at(2026, 3, 15, 13), at(2026, 3, 15, 14)),
    case("day-aligned-to-utc-midnight", LATE_LUNCH, 86400, at(2026, 3, 15), at(2026, 3, 16)),
    case("odd-interval-7s", 100, 7, 98, 105),
]
# fmt: on


@pytest.mark.parametrize(("now", "interval", "start", "end"), BILLING)
def test_billing_window_is_aligned_to_the_epoch(now: float, interval: int, start: int, end: int) -> None:
    assert billing_window(now, interval) == (start, end)


# -- rfc3339 ---------------------------------------------------------------------------------------

RFC3339 = [
    case("spec-example", at(2026, 12, 1), "2026-12-01T00:00:00Z"),
    case("epoch", 0, "1970-01-01T00:00:00Z"),
    case("fraction-truncated-not-rounded", at(2026, 3, 15, 13, 45, 10) + 0.999, "2026-03-15T13:45:10Z"),
    case("leap-day", at(2028, 2, 29, 23, 59, 59), "2028-02-29T23:59:59Z"),
]


@pytest.mark.parametrize(("epoch", "text"), RFC3339)
def test_rfc3339_is_utc_seconds_with_a_z(epoch: float, text: str) -> None:
    assert rfc3339(epoch) == text
