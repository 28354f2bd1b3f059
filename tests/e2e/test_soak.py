"""The soak with chaos of bench/soak.py, in its short form (`--quick`: 24 s of load, about 35 s in
all): two `sidecar run` processes on one Redis under 64 keep-alive connections; Redis restarted
mid-run (SIGTERM: the scripts it ran in its last event-loop turn lose their replies), one sidecar
SIGKILLed and started again; then billing compared with what the clients saw. It runs with the
defaults, the 50 ms store timeout included, so calls time out under load outside the outages too:
every reply lost either way must be resolved by the journal (tests/e2e/test_lost_reply.py).

The whole report is printed; run with -s or -rP to see it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import QUICK, soak
from bench.soakreport import MEMORY_GROWTH, problems, render

pytestmark = pytest.mark.slow


async def test_two_sidecars_through_a_redis_restart_and_a_sigkill_bill_exactly_what_was_admitted(
    tmp_path: Path,
) -> None:
    report = await soak(QUICK, tmp_path)
    text = render(report, "tests/e2e/test_soak.py")
    print(text)
    statuses = report.outcomes.by_status()
    assert statuses["503"] > 0 and sum(report.outcomes.journaled.values()) > 0, text  # both modes ran
    assert [what for _, what in report.events] == [
        "redis stopped", "redis started", "A killed", "A restarted", "A ready"
    ], text  # fmt: skip
    assert report.exits == {"A (killed)": -9, "A (SIGTERM)": 0, "B (SIGTERM)": 0}, text
    survivor = report.targets.index("B")
    assert not [e for e in report.outcomes.errors if e[1] == survivor], text
    for customer, counted in report.counters.items():
        billed = report.billed.get(customer, 0)
        admitted = report.outcomes.units(customer, admitted=True)
        assert billed == counted, text
        assert 0 <= billed - admitted <= report.outcomes.units(customer, admitted=False), text
    assert report.conflicts == [], text
    first, last = report.memory_peaks("B")
    assert last <= first * (1 + MEMORY_GROWTH), text
    assert problems(report) == [], text  # and the rest: only configured 503s, B answered every second
