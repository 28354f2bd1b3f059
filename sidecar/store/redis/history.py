"""Usage history over Redis: the hashes close.lua writes as it closes summaries, one an hour
("<tag>:hh:<hour>") for windows shorter than half an hour and one a day ("<tag>:hd:<day>") for
longer ones, field "<window start - bucket start>|<window length>|<meter>|<feature>" → value,
each expiring ``history_days`` after its bucket ends. A read takes both kinds over the range (the
billing interval may have changed within it), all in one pipeline.

Cost (Redis 6.2, hashes kept compact: at most 512 fields of at most 64 bytes): about 30 bytes a
(window, meter, feature) that had usage, and about 100 bytes a hash; nothing for a window
without usage (README, "Usage history").
"""

from __future__ import annotations

from sidecar.store.history import DAY, HOUR, HistoryWindow, buckets
from sidecar.store.redis import keys
from sidecar.store.redis.calls import BACKGROUND_TIMEOUT, bounded
from sidecar.store.redis.topology import StoreClient


class RedisHistory:
    """The HistoryStore of store/history.py, over Redis."""

    def __init__(self, client: StoreClient, *, timeout: float = BACKGROUND_TIMEOUT) -> None:
        self.client = client
        self._timeout = timeout

    async def windows(self, customer: str, start: int, end: int) -> list[HistoryWindow]:
        wanted = [(b, True) for b in buckets(start, end, HOUR)] + [
            (b, False) for b in buckets(start, end, DAY)
        ]
        if start >= end:
            return []
        pipe = self.client.pipeline(transaction=False)
        for bucket, hourly in wanted:
            pipe.hgetall(keys.history_bucket(customer, bucket, hourly=hourly))
        found = []
        replies = await bounded(pipe.execute(), self._timeout)
        for (bucket, _), stored in zip(wanted, replies, strict=True):
            found += [_window(bucket, field, value) for field, value in stored.items()]
        return sorted(w for w in found if start <= w.window_start < end)


def _window(bucket: int, field: bytes | str, value: bytes | str) -> HistoryWindow:
    text = field.decode() if isinstance(field, bytes) else field
    offset, length, meter, feature = text.split("|", 3)
    window_start = bucket + int(offset)
    return HistoryWindow(window_start, window_start + int(length), meter, feature, int(value))
