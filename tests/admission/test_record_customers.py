"""The customers usage records named in the last second (admission/record_customers.py)."""

from __future__ import annotations

from pathlib import Path

from sidecar.admission.record_customers import RecentCustomers
from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import Customer, Policy
from tests.helpers import quota_policy

ACME = Customer(id="acme", plan="p")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(tmp_path: Path) -> Policy:
    return load_policy(quota_policy(tmp_path, 10))


def test_what_a_lookup_found_answers_for_a_second_then_is_looked_up_again(tmp_path: Path) -> None:
    clock, current = Clock(), policy(tmp_path)
    recent = RecentCustomers(clock=clock)
    assert recent.split(["acme", "nobody"], current) == ({}, ["acme", "nobody"])
    recent.put(["acme", "nobody"], {"acme": ACME})
    clock.now += 0.9
    assert recent.split(["acme", "nobody"], current) == ({"acme": ACME}, [])  # nobody stays nobody
    clock.now += 0.2
    assert recent.split(["acme", "nobody"], current) == ({}, ["acme", "nobody"])


def test_a_reloaded_policy_starts_afresh(tmp_path: Path) -> None:
    recent = RecentCustomers(clock=Clock())
    first, second = policy(tmp_path), load_policy(quota_policy(tmp_path, 20))
    recent.split(["acme"], first)
    recent.put(["acme"], {"acme": ACME})
    assert recent.split(["acme"], first) == ({"acme": ACME}, [])
    assert recent.split(["acme"], second) == ({}, ["acme"])
