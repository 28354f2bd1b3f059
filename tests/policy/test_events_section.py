"""The events: block and meters fed by usage records (source: event)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config.policy.events import Events
from sidecar.config.policy.loader import load_policy
from sidecar.errors import PolicyInvalid
from tests.helpers import write_policy

EVENT_POLICY = """
version: 1
meters:
  requests: {aggregation: count}
  gpu_seconds: {aggregation: sum, source: event}
  tokens: {aggregation: sum, source: "response.header:X-Tokens"}
features:
  - {name: train, match: {method: POST, path: /v1/train}}
  - {name: search, match: {path: /v1/search}}
plans:
  pro:
    features: [train, search]
    limits:
      - {meter: gpu_seconds, limit: 3600, period: day}
      - {meter: requests, limit: 10, period: second}
billing: {url: "http://127.0.0.1:9/usage"}
"""


def test_a_policy_without_the_block_takes_the_defaults(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, EVENT_POLICY))
    assert policy.events == Events(dedupe_hours=24, max_age_days=35)
    assert policy.events.dedupe_seconds == 86400


def test_the_block_sets_the_dedupe_window_and_the_oldest_record(tmp_path: Path) -> None:
    policy = load_policy(
        write_policy(tmp_path, EVENT_POLICY + "events: {dedupe_hours: 48, max_age_days: 7}\n")
    )
    assert (policy.events.dedupe_hours, policy.events.max_age_days) == (48, 7)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("{max_age_days: 40}", "events.max_age_days: expected an integer from 1 to 35, got 40"),
        ("{dedupe_hours: 0}", "events.dedupe_hours: expected an integer >= 1, got 0"),
    ],
)
def test_out_of_bounds_values_are_refused(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(write_policy(tmp_path, EVENT_POLICY + f"events: {block}\n"))
    assert [str(e).split(": ", 1)[1] for e in caught.value.errors] == [message]


def test_an_event_meters_limit_gates_every_feature_and_nothing_measures_it(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, EVENT_POLICY))
    for feature in ("train", "search"):
        spec = policy.charges[("pro", feature)]
        gpu = [s for s in spec.limits if s.limit.meter == "gpu_seconds"]
        assert [(s.amount, s.enforced) for s in gpu] == [(0, True)]  # admitted while there is room
        assert [m.name for m in spec.measured] == ["tokens"]  # the proxy measures no event meter
        assert [name for name, _ in spec.usage] == ["requests"]


def test_a_reserve_on_an_event_meter_is_refused(tmp_path: Path) -> None:
    text = EVENT_POLICY.replace(
        "{aggregation: sum, source: event}", "{aggregation: sum, source: event, reserve: 5}"
    )
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(write_policy(tmp_path, text))
    assert "reserve applies to a 'sum' meter measured from the response" in str(caught.value.errors[0])
