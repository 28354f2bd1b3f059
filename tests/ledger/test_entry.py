"""The journal entry on disk (ledger/entry.py): what the request used, versioned, read back whole;
entries of the release before (KEYS/ARGV) still read; merged into a real redis-server."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest

from sidecar.config.policy.model import Limit
from sidecar.config.policy.windows import Period, calendar_window
from sidecar.errors import UnansweredCall
from sidecar.ledger.entry import VERSION, UnreadableEntry, decode, encode
from sidecar.ledger.journal import SEGMENT_SUFFIX, Journal
from sidecar.store.port import (
    CreditCharge,
    Grant,
    Hold,
    LimitCharge,
    MeterRequest,
    Replayed,
    ScriptEntry,
    UsageCharge,
    UsageEntry,
    VoidEntry,
)
from sidecar.store.redis import keys
from sidecar.store.redis.store import RedisStore, replay_arguments, script_arguments

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CALL = UnansweredCall("c0ffee0123456789", 7, 1_767_225_600_025_000)


def everything(now: float, burst: int = 0) -> MeterRequest:
    """A request with every kind of charge: a calendar quota of a feature, a moving window (with
    a burst allowance), a period allowance before prepaid credit, a reservation, and three kinds
    of usage."""
    month = Limit(meter="requests", limit=1000, period=Period.MONTH, feature="search")
    second = Limit(meter="requests", limit=5, period=Period.SECOND, burst=burst)
    tokens = Limit(meter="tokens", limit=100, period=Period.MONTH)
    return MeterRequest(
        customer_id="acme",
        limits=(
            LimitCharge(month, 1, calendar_window(Period.MONTH, now), True),
            LimitCharge(second, 1, None, False),
            LimitCharge(tokens, 40, calendar_window(Period.MONTH, now), False, False, True, True),
        ),
        usage=(
            UsageCharge("requests", "search", 1, "+"),
            UsageCharge("tokens", "search", 40, "max"),
            UsageCharge("users", "search", 1, "uniq", "alice"),
        ),
        billing_interval=60,
        credits=(CreditCharge("tokens", 40, True, (2,), True, False),),
        hold=Hold("r1", 30),
        holds=True,
    )


def test_an_entry_reads_back_as_it_was_written() -> None:
    kept = UsageEntry(uuid.uuid4().hex, NOW, everything(NOW), CALL)
    assert decode(encode(kept)) == kept
    void = VoidEntry(uuid.uuid4().hex, "acme", NOW, CALL)
    assert decode(encode(void)) == void


def test_a_read_back_request_gives_the_script_the_same_keys_and_arguments() -> None:
    """The Limit is rebuilt from its meter, feature, period and ceiling (limit plus burst): the
    same name and the same ceiling, so the same KEYS and ARGV as the policy's own Limit."""
    kept = UsageEntry("e1", NOW, everything(NOW, burst=2))
    again = decode(encode(kept))
    assert isinstance(again, UsageEntry)
    assert script_arguments(again.request) == script_arguments(kept.request)
    assert replay_arguments(again) == replay_arguments(kept)


def test_an_entry_is_the_usage_it_describes_not_a_script_call() -> None:
    request = MeterRequest(
        "acme",
        (LimitCharge(Limit(meter="requests", limit=100, period=Period.MONTH), 1, (10, 20), True),),
        (UsageCharge("requests", "search", 1, "+"),),
        60,
    )
    line = json.loads(encode(UsageEntry("e1", NOW, request)))
    assert line == {
        "v": VERSION,
        "id": "e1",
        "customer": "acme",
        "at": NOW,
        "request": {
            "billing_interval": 60,
            "holds": False,
            "hold": None,
            "limits": [
                {
                    "meter": "requests",
                    "feature": None,
                    "period": "month",
                    "ceiling": 100,
                    "amount": 1,
                    "window": [10, 20],
                    "enforced": True,
                    "counts_requests": True,
                    "allowance": False,
                    "reserved": False,
                }
            ],
            "credits": [],
            "usage": [{"meter": "requests", "feature": "search", "amount": 1, "op": "+", "distinct": ""}],
        },
    }


@pytest.mark.parametrize(
    ("line", "entry"),
    [
        pytest.param(
            '{"v": 1, "id": "e1", "customer": "acme", "at": 5.0, "keys": ["k"], "args": [60, "", 0]}',
            ScriptEntry("e1", "acme", 5.0, ("k",), (60, "", 0)),
            id="v1",
        ),
        pytest.param(
            '{"v": 2, "id": "e2", "customer": "c", "at": 5.0, "call": ["t", 7, 9], "keys": [], "args": []}',
            ScriptEntry("e2", "c", 5.0, (), (), UnansweredCall("t", 7, 9)),
            id="v2-call",
        ),
        pytest.param(
            '{"v": 2, "id": "e3", "customer": "acme", "at": 5.0, "void": ["t", 9, 0]}',
            VoidEntry("e3", "acme", 5.0, UnansweredCall("t", 9, 0)),
            id="v2-void",
        ),
    ],
)
def test_entries_of_the_release_before_read_as_they_were_kept(line: str, entry: object) -> None:
    assert decode(line) == entry


@pytest.mark.parametrize(
    ("line", "why"),
    [
        pytest.param('{"v": 3, "id": "cut', "incomplete", id="cut-short"),
        pytest.param('{"v": 4, "id": "e1", "customer": "acme", "at": 5.0}', "version", id="later-version"),
        pytest.param('{"id": "e1"}', "version", id="no-version"),
        pytest.param('{"v": 3, "id": "e1", "customer": "acme", "at": 5.0}', "malformed", id="no-request"),
        pytest.param("[1, 2]", "version", id="not-an-object"),
    ],
)
def test_a_line_this_release_cannot_read_says_why(line: str, why: str) -> None:
    with pytest.raises(UnreadableEntry, match=why):
        decode(line)


async def test_a_line_of_a_later_version_is_skipped_and_logged(
    store: RedisStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / f"later{SEGMENT_SUFFIX}").write_text('{"v": 99, "id": "e1"}\n')
    with caplog.at_level(logging.WARNING):
        assert await Journal(tmp_path).replay(store.replay) == 0
    assert "version this release does not read" in caplog.text


async def test_an_entry_of_this_version_merges_every_charge_into_a_real_store(
    store: RedisStore, tmp_path: Path
) -> None:
    now = store.time()
    await store.grant("acme", Grant(id="order-1", meter="tokens", amount=100))
    journal = Journal(tmp_path)
    journal.record(everything(now), now)
    assert await journal.replay(store.replay) == 1
    after = await store.read_limits(everything(now))
    assert [state.used for state in after.limits] == [1, 0, 40], "quota, moving window skipped, allowance"
    assert after.credits[0].balance == 100, "the allowance covered the 40 before the credit"
    window = int(now) - int(now) % 60
    assert await store.client.hgetall(keys.usage("acme")) == {
        f"{window}|requests|search".encode(): b"1",
        f"{window}|tokens|search".encode(): b"40",
        f"u|{window}|users|search|alice".encode(): b"1",
    }


async def test_an_entry_of_this_version_whose_call_ran_is_not_merged(store: RedisStore) -> None:
    now = store.time()
    await store.client.rpush(keys.call_records("acme", CALL.token), f"{CALL.seq} []")
    entry = UsageEntry(uuid.uuid4().hex, now, everything(now), UnansweredCall(CALL.token, CALL.seq))
    assert await store.replay(entry) is Replayed.RAN
    assert [state.used for state in (await store.read_limits(everything(now))).limits] == [0, 0, 0]
