"""The history query (admission/history.py): parameters read, bounded, refused with every problem;
windows added up into steps by meter aggregation."""

from __future__ import annotations

from pathlib import Path

from sidecar.admission.history import HistoryQuery, parse_query, stepped
from sidecar.config.policy.loader import load_policy
from sidecar.store.history import DAY, HistoryWindow
from tests.helpers import write_policy

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def test_by_default_the_last_history_days() -> None:
    assert parse_query({}, NOW, 35) == HistoryQuery(int(NOW) - 35 * DAY, int(NOW) + 1)


def test_from_and_to_in_rfc_3339_or_unix_seconds_and_never_further_back_than_kept() -> None:
    query = parse_query({"from": "2025-12-31T00:00:00Z", "to": "1767225000", "meter": "requests"}, NOW, 35)
    assert query == HistoryQuery(int(NOW) - DAY, 1_767_225_000, "requests")
    assert (
        isinstance(old := parse_query({"from": "0"}, NOW, 2), HistoryQuery)
        and old.start == int(NOW) - 3 * DAY
    )


def test_every_problem_is_named() -> None:
    problems = parse_query({"from": "yesterday", "to": "2026-01-01T00:00:00", "step": "-1"}, NOW, 35)
    assert isinstance(problems, list) and len(problems) == 3
    assert problems[0].startswith("from must be an RFC 3339 time") and problems[2].startswith("step must be")


def test_steps_add_up_counts_and_keep_the_peak_of_a_max_meter(tmp_path: Path) -> None:
    policy = load_policy(
        write_policy(
            tmp_path,
            """
            version: 1
            meters: {requests: {aggregation: count}, peak: {aggregation: max, source: request.bytes}}
            features: [{name: search, match: {path: /v1/search}}]
            plans: {p: {features: [search]}}
            """,
        )
    )
    seen = ((0, "requests", 2), (60, "requests", 3), (0, "peak", 9), (60, "peak", 4), (DAY, "requests", 1))
    windows = [HistoryWindow(start, start + 60, meter, "search", value) for start, meter, value in seen]
    assert stepped(windows, DAY, policy) == [
        HistoryWindow(0, DAY, "peak", "search", 9),
        HistoryWindow(0, DAY, "requests", "search", 5),
        HistoryWindow(DAY, 2 * DAY, "requests", "search", 1),
    ]
