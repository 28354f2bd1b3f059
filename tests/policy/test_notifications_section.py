"""The ``notifications:`` section and ``history_days``: defaults, and one located error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.notifications import Notifications, NotifyFormat
from sidecar.errors import PolicyInvalid
from tests.helpers import write_policy

BASE = """version: 1
meters: {requests: {aggregation: count}}
features: [{name: search, match: {path: /v1/search}}]
plans: {p: {features: [search], limits: [{meter: requests, limit: 10, period: month}]}}
"""


def errors_of(tmp_path: Path, extra: str) -> list[str]:
    path = write_policy(tmp_path, BASE + extra)
    with pytest.raises(PolicyInvalid) as refused:
        load_policy(path)
    return [str(error).removeprefix(f"{path}:") for error in refused.value.errors]


def test_notifications_and_history_days_default_to_off_and_35(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, BASE))
    assert policy.notifications is None and policy.history_days == 35


def test_a_notifications_section_with_its_defaults(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, BASE + "notifications: {url: https://app.internal/hooks}\n"))
    assert policy.notifications == Notifications(url="https://app.internal/hooks")
    assert policy.notifications.thresholds == (80, 100) and policy.notifications.format is NotifyFormat.JSON


def test_thresholds_are_kept_ascending_and_history_days_read(tmp_path: Path) -> None:
    text = (
        "notifications: {url: http://h/x, format: cloudevents, thresholds: [100, 50, 150]}\nhistory_days: 7\n"
    )
    policy = load_policy(write_policy(tmp_path, BASE + text))
    assert policy.notifications is not None
    assert (policy.notifications.thresholds, policy.notifications.format) == (
        (50, 100, 150),
        NotifyFormat.CLOUDEVENTS,
    )
    assert policy.history_days == 7


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("notifications: {format: json}\n", "5:16: notifications: missing required key 'url'"),
        (
            "notifications: {url: ftp://h/x}\n",
            "5:22: notifications.url: invalid url 'ftp://h/x'; expected an http:// or https:// URL",
        ),
        (
            "notifications: {url: http://h/x, format: xml}\n",
            "5:42: notifications.format: unknown format 'xml'; expected one of json, cloudevents",
        ),
        (
            "notifications: {url: http://h/x, thresholds: []}\n",
            "5:46: notifications.thresholds: expected at least one threshold, got an empty list",
        ),
        (
            "notifications: {url: http://h/x, thresholds: [80, 80]}\n",
            "5:51: notifications.thresholds[1]: threshold 80 given twice",
        ),
        (
            "notifications: {url: http://h/x, thresholds: [0]}\n",
            "5:47: notifications.thresholds[0]: expected an integer >= 1, got 0",
        ),
        (
            "notifications: {url: http://h/x, thresholds: [1001]}\n",
            "5:47: notifications.thresholds[0]: expected a percentage from 1 to 1000, got 1001",
        ),
        (
            "notifications: {url: http://h/x, threshold: [80]}\n",
            "5:34: notifications.threshold: unknown key 'threshold'; did you mean 'thresholds'?",
        ),
        ("history_days: 0\n", "5:15: history_days: expected an integer >= 1, got 0"),
        ("history_days: 500\n", "5:15: history_days: expected at most 400 days, got 500"),
    ],
)
def test_each_mistake_is_one_located_error(tmp_path: Path, extra: str, expected: str) -> None:
    assert errors_of(tmp_path, extra) == [expected]
