"""The journal's loops (ledger/merger.py): what a merge counts and marks for billing, a loop that
survives a bug, and the last entries written on shutdown."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from sidecar.errors import UnansweredCall
from sidecar.ledger import merger as merger_module
from sidecar.ledger.journal import SEGMENT_SUFFIX, Journal
from sidecar.ledger.merger import Merger, every, run_ledger
from sidecar.metrics import Metrics
from sidecar.store.port import JournalEntry, MeterRequest, Replayed, UsageEntry, VoidEntry

CALL = UnansweredCall("c0ffee0123456789", 7)
PLAIN = UsageEntry("e1", 100.0, MeterRequest("acme", (), (), 60))
NAMED = UsageEntry("e2", 101.0, MeterRequest("acme", (), (), 60), CALL)
VOID = VoidEntry("e3", "beta", 102.0, CALL)


class Answers:
    """A store that answers every replay with `replayed`."""

    def __init__(self, replayed: Replayed) -> None:
        self.replayed = replayed

    async def replay(self, entry: JournalEntry) -> Replayed:
        return self.replayed


class NoVoids:
    async def fence(self, customer: str, void: UnansweredCall, seconds: int) -> bool:
        return False


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("entry", "replayed", "merged", "found"),
    [
        pytest.param(PLAIN, Replayed.MERGED, 1, None, id="plain-merged"),
        pytest.param(PLAIN, Replayed.REPEATED, 0, None, id="plain-repeated"),
        pytest.param(NAMED, Replayed.MERGED, 1, "not_run", id="named-not-run"),
        pytest.param(NAMED, Replayed.RAN, 0, "ran", id="named-ran"),
        pytest.param(VOID, Replayed.UNDONE, 0, "ran", id="void-undone"),
        pytest.param(VOID, Replayed.NOT_RUN, 0, "not_run", id="void-not-run"),
        pytest.param(VOID, Replayed.BILLED, 0, "ran_and_billed", id="void-billed"),
        pytest.param(VOID, Replayed.REPEATED, 0, "repeated", id="void-repeated"),
    ],
)
async def test_a_merged_entry_is_counted_by_what_the_store_found_and_marked_for_billing(
    tmp_path: Path, entry: JournalEntry, replayed: Replayed, merged: int, found: str | None
) -> None:
    metrics, billed = Metrics(), []
    merger = Merger(Journal(tmp_path), Answers(replayed), metrics, lambda *due: billed.append(due))
    await merger.merge_entry(entry)
    assert sample(metrics, "sidecar_journal_merged_total") == merged
    for label in ("not_run", "ran", "ran_and_billed", "repeated"):
        assert sample(metrics, "sidecar_lost_replies_total", found=label) == (label == found)
    assert billed == [(entry.customer_id, entry.at)]


async def test_a_loop_that_hits_a_bug_logs_it_and_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    rounds = 0

    async def buggy() -> None:
        nonlocal rounds
        rounds += 1
        raise RuntimeError("a bug")

    loop = asyncio.create_task(every(0.01, buggy, "testing"))
    await asyncio.sleep(0.1)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert rounds > 2
    assert "testing failed; trying again in 0.01 s" in caplog.text


async def test_entries_recorded_before_shutdown_are_written_when_the_loops_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merger_module, "MERGE_INTERVAL", 60.0)  # no merge takes them first
    journal = Journal(tmp_path)
    async with AsyncExitStack() as stack:
        await run_ledger(
            stack, Merger(journal, Answers(Replayed.MERGED), Metrics(), lambda *_: None), fences=NoVoids()
        )
        journal.record(PLAIN.request, 100.0)
    (segment,) = tmp_path.glob(f"*{SEGMENT_SUFFIX}")
    assert '"customer": "acme"' in segment.read_text()
