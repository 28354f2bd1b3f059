"""The notifier's decisions without a network: what each answer means, and no send once its lease
is about to end (another replica may then take the customer; a send it had started would overlap)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from sidecar.billing.notifier import LEASE_MARGIN_MS, Notifier, classify
from sidecar.config.policy.holder import PolicyHolder
from sidecar.metrics import Metrics
from sidecar.store.notifications import Notification
from tests.helpers import write_policy


@pytest.mark.parametrize(
    ("status", "delivered", "dead", "retry_after"),
    [(200, True, False, 0.0), (204, True, False, 0.0), (410, False, True, 0.0), (422, False, True, 0.0),
     (408, False, False, 7.0), (429, False, False, 7.0), (503, False, False, 7.0)],
)  # fmt: skip
def test_each_answer_means_delivered_dead_or_retried(
    status: int, delivered: bool, dead: bool, retry_after: float
) -> None:
    answer = classify(status, "why", {"Retry-After": "7"})
    assert (answer.delivered, answer.dead, answer.retry_after) == (delivered, dead, retry_after)


class Outbox:
    """A NotifyStore of one waiting notification, recording releases."""

    def __init__(self) -> None:
        self.released: list[tuple[str, int, int | None]] = []

    async def pending(self, customer: str) -> list[Notification]:
        crossing, kind = "limit.threshold|requests-month|0|80", "limit.threshold"
        fields = {"name": "requests-month", "plan": "p", "threshold": 80, "used": 8, "limit": 10}
        return [
            Notification(
                customer=customer, crossing=crossing, type=kind, window_start=0, window_end=1, at=0, **fields
            )
        ]

    async def release(self, customer: str, lease_end_ms: int, due_ms: int | None) -> bool:
        self.released.append((customer, lease_end_ms, due_ms))
        return True


async def test_nothing_is_sent_once_the_lease_is_about_to_end(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "version: 1\nnotifications: {url: 'http://127.0.0.1:9/never'}\n")
    holder, outbox, now = PolicyHolder.load(policy), Outbox(), 1_000.0
    async with aiohttp.ClientSession() as session:
        notifier = Notifier(
            holder=holder, outbox=outbox, session=session, metrics=Metrics(), clock=lambda: now
        )  # type: ignore[arg-type]
        notifications = holder.current.notifications
        assert notifications is not None
        lease_end = int(now * 1000) + LEASE_MARGIN_MS - 1
        await notifier._customer("acme", lease_end, notifications, "quota-sidecar")
    assert outbox.released == [("acme", lease_end, int(now * 1000))]  # due again at once, nothing sent
