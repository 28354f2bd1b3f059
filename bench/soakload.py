"""The soak's load generator (bench.soak): keep-alive connections spread over several sidecars, each
a closed loop of requests for a fixed time, recording every outcome as the client sees it.

It runs in its own process so that its CPU does not slow the harness (billing receiver, faults,
memory sampler), and so that its latencies are not the harness's scheduling delays.

Outcomes, per (customer, feature):
* the HTTP status of every complete answer (2xx means admitted; a 2xx without a `RateLimit` header
  was admitted with the store unreachable under `store_failure: open`, so it went to the journal);
* `unknown`: the request was written and the connection broke (or timed out) before the whole
  answer came: the sidecar may have admitted and metered it, and the client cannot tell.
A connection that cannot be opened sends nothing; it is counted per target, and the connection
tries the next target (as a load balancer would stop sending to a dead replica).

    python -m bench.soakload CONFIG.json OUT.json
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

REQUEST_TIMEOUT = 10.0  # seconds for one exchange; longer is an `unknown` outcome
RECYCLE_AFTER = 500  # requests per connection, so a restarted target gets its share back
CONNECT_PAUSE = 0.05  # seconds between connect attempts when every target refuses


@dataclass(frozen=True)
class Kind:
    """One request shape: its feature name, method, path and the units it costs when admitted."""

    feature: str
    method: str
    path: str
    cost: int


@dataclass
class Results:
    started: float  # wall clock (time.time()) when the load began
    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # customer, feature, outcome
    journaled: Counter[tuple[str, int]] = field(default_factory=Counter)  # 2xx without RateLimit
    errors: Counter[tuple[str, int]] = field(default_factory=Counter)  # (connect|broken|timeout, target)
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)  # t, ms, status, target

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "outcomes": [[*key, n] for key, n in sorted(self.outcomes.items())],
            "journaled": [[*key, n] for key, n in sorted(self.journaled.items())],
            "errors": [[*key, n] for key, n in sorted(self.errors.items())],
            "samples": self.samples,
        }


class Load:
    def __init__(self, config: dict[str, Any]) -> None:
        self.targets = [(str(host), int(port)) for host, port in config["targets"]]
        self.customers = [(str(name), str(key)) for name, key in config["customers"]]
        self.kinds = [Kind(**kind) for kind in config["mix"]]
        self.connections = int(config["connections"])
        self.deadline = time.monotonic() + float(config["seconds"])
        self.results = Results(started=time.time())
        self._t0 = time.perf_counter()
        self._sequence = itertools.count()

    async def run(self) -> Results:
        await asyncio.gather(*(self._connection(i) for i in range(self.connections)))
        return self.results

    async def _connection(self, index: int) -> None:
        """Prefer target index % n; on a refused connect, try the others in turn."""
        order = [(index + k) % len(self.targets) for k in range(len(self.targets))]
        while time.monotonic() < self.deadline:
            opened = await self._open(order)
            if opened is None:
                await asyncio.sleep(CONNECT_PAUSE)
                continue
            target, reader, writer = opened
            try:
                for _ in range(RECYCLE_AFTER):
                    if time.monotonic() >= self.deadline or not await self._exchange(target, reader, writer):
                        break
            finally:
                writer.close()

    async def _open(self, order: list[int]) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
        for target in order:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.targets[target]), 5)
            except (OSError, TimeoutError):
                self.results.errors[("connect", target)] += 1
                continue
            return target, reader, writer
        return None

    def _next(self) -> tuple[str, str, Kind]:
        """Customers in turn; each round of them uses the next kind of the mix (a list whose
        repeats weigh the kinds)."""
        n = next(self._sequence)
        name, key = self.customers[n % len(self.customers)]
        return name, key, self.kinds[(n // len(self.customers)) % len(self.kinds)]

    async def _exchange(
        self, target: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """One request; False when the connection is no longer usable."""
        name, key, kind = self._next()
        head = (
            f"{kind.method} {kind.path} HTTP/1.1\r\nHost: soak\r\nX-API-Key: {key}\r\n"
            f"Content-Length: 0\r\n\r\n"
        )
        started = time.perf_counter()
        try:
            writer.write(head.encode())
            status, rate_limited, keep_alive = await asyncio.wait_for(_answer(reader), REQUEST_TIMEOUT)
        except TimeoutError:
            return self._unknown(name, kind, ("timeout", target))
        except (OSError, asyncio.IncompleteReadError, ValueError, ConnectionError):
            return self._unknown(name, kind, ("broken", target))
        ms = (time.perf_counter() - started) * 1000
        self.results.samples.append((round(started - self._t0, 3), round(ms, 2), status, target))
        self.results.outcomes[(name, kind.feature, str(status))] += 1
        if 200 <= status < 300 and not rate_limited:
            self.results.journaled[(name, target)] += 1
        return keep_alive

    def _unknown(self, name: str, kind: Kind, error: tuple[str, int]) -> bool:
        self.results.outcomes[(name, kind.feature, "unknown")] += 1
        self.results.errors[error] += 1
        return False


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool, bool]:
    """The status of one whole answer, whether it carried a RateLimit header, and whether the
    connection stays open after it."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readexactly(2)
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status, "ratelimit" in headers, headers.get("connection", "").lower() != "close"


def main() -> None:
    config_path, out_path = sys.argv[1:3]
    with open(config_path) as file:
        config = json.load(file)
    results = asyncio.run(Load(config).run())
    with open(out_path, "w") as file:
        json.dump(results.as_json(), file)


if __name__ == "__main__":
    main()
