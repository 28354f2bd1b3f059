"""The soak's figures and checks (bench.soak): what the clients saw, what was billed, what the
store counted, latency by phase, memory over time; rendered as Markdown.

Kept apart from the harness so that the checks read as a list: `problems()` is what the e2e test
asserts is empty and what makes `python -m bench.soak` exit 1.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.soak import Config

SETTLE_SECONDS = 2.0  # a fault's window lasts this long after the fault is repaired
MEMORY_GROWTH = 0.25  # the last window's peak may exceed the first window's by this fraction
MIB = 1024


@dataclass(frozen=True)
class Outcomes:
    """The load generator's results, with units derived from each feature's cost."""

    started: float  # wall clock of the first request
    counts: Counter[tuple[str, str, str]]  # (customer, feature, outcome) → requests
    costs: Mapping[str, int]
    journaled: Counter[tuple[str, int]]  # (customer, target index) → 2xx without RateLimit
    errors: Counter[tuple[str, int]]  # (connect|broken|timeout, target index) → count
    samples: list[tuple[float, float, int, int]]  # (seconds since start, ms, status, target)

    @classmethod
    def of(cls, results: Mapping[str, Any], costs: Mapping[str, int]) -> Outcomes:
        return cls(
            started=float(results["started"]),
            counts=Counter({(c, f, o): int(n) for c, f, o, n in results["outcomes"]}),
            costs=costs,
            journaled=Counter({(str(c), int(t)): int(n) for c, t, n in results["journaled"]}),
            errors=Counter({(str(kind), int(target)): int(n) for kind, target, n in results["errors"]}),
            samples=[(float(t), float(ms), int(s), int(g)) for t, ms, s, g in results["samples"]],
        )

    def units(self, customer: str, admitted: bool) -> int:
        """Units the customer was answered 2xx for (admitted), or whose answer never came."""
        return sum(
            self.costs[f] * n
            for (c, f, o), n in self.counts.items()
            if c == customer and (_is_2xx(o) if admitted else o == "unknown")
        )

    def by_status(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for (_c, _f, outcome), n in self.counts.items():
            totals[outcome] += n
        return totals


def _is_2xx(outcome: str) -> bool:
    return outcome.isdigit() and 200 <= int(outcome) < 300


@dataclass(frozen=True)
class Report:
    config: Config
    outcomes: Outcomes
    events: list[tuple[float, str]]  # wall clock, what happened
    memory: list[tuple[float, str, int]]  # wall clock, sidecar, VmRSS KiB
    exits: Mapping[str, int | None]
    billed: Mapping[str, int]
    counters: Mapping[str, int]
    drain_seconds: float
    deliveries: int
    unique_summaries: int
    conflicts: list[str]
    metrics: Mapping[str, list[str]]
    failure_modes: Mapping[str, str]  # customer → store_failure of its plan
    refusable: frozenset[str]  # customers whose plan has a rate limit
    targets: list[str]  # sidecar names by the load generator's target index

    def event(self, name: str) -> float:
        return next(at for at, what in self.events if what == name)

    def windows(self) -> dict[str, tuple[float, float]]:
        """Each fault's window in seconds since the load started: from the fault until a little after
        it was repaired."""
        t0 = self.outcomes.started
        return {
            "redis restart": (
                self.event("redis stopped") - t0,
                self.event("redis started") - t0 + SETTLE_SECONDS,
            ),
            "sidecar A killed": (self.event("A killed") - t0, self.event("A ready") - t0 + SETTLE_SECONDS),
        }

    def phase(self, t: float) -> str:
        return next((name for name, (a, b) in self.windows().items() if a <= t < b), "normal")

    def memory_peaks(self, sidecar: str) -> tuple[int, int]:
        """Peak VmRSS (KiB) of the first and of the last `memory_window` seconds of the load."""
        t0, window = self.outcomes.started, self.config.memory_window
        end = t0 + self.config.duration
        samples = [(at, kib) for at, name, kib in self.memory if name == sidecar]
        first = [kib for at, kib in samples if at < t0 + window]
        last = [kib for at, kib in samples if end - window <= at]
        return max(first, default=0), max(last, default=0)


def problems(report: Report) -> list[str]:
    """Everything that makes the soak a failure; empty when it passed."""
    found = [f"a summary id was billed with two values: {c}" for c in report.conflicts]
    found += _unit_problems(report)
    found += _status_problems(report)
    found += _survivor_problems(report)
    found += [
        f"{name} exited {code}" for name, code in report.exits.items() if "SIGTERM" in name and code != 0
    ]
    first, last = report.memory_peaks(report.targets[-1])
    if not first or last > first * (1 + MEMORY_GROWTH):
        found.append(f"memory of the surviving sidecar grew from {first} KiB to {last} KiB")
    if not sum(report.outcomes.journaled.values()):
        found.append("nothing was admitted through the journal: the Redis restart tested nothing")
    if not report.outcomes.by_status()["503"]:
        found.append("no 503 was answered: store_failure closed was not exercised")
    return found


def _unit_problems(report: Report) -> list[str]:
    found = []
    for customer, counted in report.counters.items():
        billed = report.billed.get(customer, 0)
        admitted = report.outcomes.units(customer, admitted=True)
        unknown = report.outcomes.units(customer, admitted=False)
        if billed != counted:
            found.append(f"{customer}: billed {billed} units, the store counted {counted}")
        if not 0 <= billed - admitted <= unknown:
            found.append(
                f"{customer}: billed {billed} units for {admitted} admitted and {unknown} of unknown outcome"
            )
    return found


def _status_problems(report: Report) -> list[str]:
    """Only 2xx, 429 for rate-limited customers, 503 under store_failure closed, and `unknown`."""
    found = []
    for (customer, feature, outcome), n in sorted(report.outcomes.counts.items()):
        allowed = (
            _is_2xx(outcome)
            or outcome == "unknown"
            or (outcome == "429" and customer in report.refusable)
            or (outcome == "503" and report.failure_modes[customer] == "closed")
        )
        if not allowed:
            found.append(f"{customer} {feature}: {n} answers {outcome}")
    return found


def _survivor_problems(report: Report) -> list[str]:
    """The sidecar never killed answered every request it was sent, in every second of the load."""
    survivor = len(report.targets) - 1
    found = [
        f"{report.targets[survivor]}: {n} {kind} errors"
        for (kind, target), n in report.outcomes.errors.items()
        if target == survivor
    ]
    answered = {int(t) for t, _ms, _status, target in report.outcomes.samples if target == survivor}
    silent = [s for s in range(int(report.config.duration) - 1) if s not in answered]
    if silent:
        found.append(f"{report.targets[survivor]} answered nothing in seconds {silent} of the load")
    return found


# -- rendering -----------------------------------------------------------------------------------


def render(report: Report, command: str) -> str:
    sections = [
        _header(report, command),
        _timeline(report),
        _requests(report),
        _latency(report),
        _units(report),
        _memory(report),
        _processes(report),
        _checks(report),
    ]
    return "\n\n".join(sections) + "\n"


def _header(report: Report, command: str) -> str:
    c = report.config
    return "\n".join(
        [
            "# Soak and chaos",
            "",
            f"Command: `{command}` (from the repository root).",
            f"Machine: {os.cpu_count()} cores (`nproc`), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; run {_utc(report.outcomes.started)}.",
            f"Load: {c.duration:g} s, {c.connections} keep-alive connections over two sidecars, "
            f"{len(report.failure_modes)} customers; store timeout {c.store_timeout:g} s; billing windows "
            f"of {c.interval} s with {c.grace} s grace. Redis stopped with SIGTERM"
            f"{' after CLIENT PAUSE ALL' if c.pause_before_stop else ''} at {c.redis_stop_at:.0%} of the run "
            f"and started again {c.redis_down:g} s later; sidecar A SIGKILLed at {c.kill_at:.0%} and "
            f"started again {c.kill_down:g} s later.",
        ]
    )


def _utc(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _timeline(report: Report) -> str:
    t0 = report.outcomes.started
    rows = [f"| {at - t0:7.2f} | {what} |" for at, what in report.events]
    return "\n".join(
        ["## Timeline (seconds since the load started)", "", "| t | event |", "|---:|---|", *rows]
    )


def _requests(report: Report) -> str:
    statuses = report.outcomes.by_status()
    rows = [f"| {status} | {n} |" for status, n in sorted(statuses.items())]
    errors = ", ".join(
        f"{kind} to {report.targets[target]}: {n}"
        for (kind, target), n in sorted(report.outcomes.errors.items())
    )
    served = sum(n for status, n in statuses.items() if _is_2xx(status))
    return "\n".join(
        [
            "## Requests",
            "",
            f"Sent {sum(statuses.values())}, served (2xx) {served}; of those, "
            f"{_journaled(report)} were admitted without the store (`store_failure: open`, kept in "
            "the journal): while Redis was down, or when a store call timed out. `unknown`: written, "
            "but the connection broke before the whole answer came.",
            "",
            "| answer | requests |",
            "|---|---:|",
            *rows,
            "",
            f"Connection errors (nothing or not all received): {errors or 'none'}.",
        ]
    )


def _journaled(report: Report) -> str:
    by_target: Counter[str] = Counter()
    for (_customer, target), n in report.outcomes.journaled.items():
        by_target[report.targets[target]] += n
    return f"{by_target.total()} ({', '.join(f'{t} {n}' for t, n in sorted(by_target.items()))})"


def _latency(report: Report) -> str:
    by_phase: dict[str, list[float]] = {}
    unavailable: Counter[str] = Counter()
    for t, ms, status, _target in report.outcomes.samples:
        phase = report.phase(t)
        by_phase.setdefault(phase, []).append(ms)
        unavailable[phase] += status == 503
    rows = [
        f"| {name} | {len(values)} | {unavailable[name]} | {_pct(values, 50):.1f} | {_pct(values, 99):.1f} "
        f"| {max(values):.1f} |"
        for name, values in sorted(by_phase.items(), key=lambda item: item[0] != "normal")
    ]
    return "\n".join(
        [
            "## Latency of complete answers (ms), by when the request started",
            "",
            f"A fault's window runs from the fault until {SETTLE_SECONDS:g} s after it was repaired. "
            "The machine is shared and has 2 cores for every process of the run, so these are noisy.",
            "",
            "| phase | answers | of them 503 | p50 | p99 | max |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _units(report: Report) -> str:
    rows = []
    for customer, counted in report.counters.items():
        admitted = report.outcomes.units(customer, admitted=True)
        unknown = report.outcomes.units(customer, admitted=False)
        billed = report.billed.get(customer, 0)
        rows.append(
            f"| {customer} | {report.failure_modes[customer]} | {admitted} | {unknown} | {billed} | "
            f"{counted} | {billed - admitted} |"
        )
    total = _sum_row(report)
    return "\n".join(
        [
            "## Units: admitted, billed, counted",
            "",
            "Admitted: units of the 2xx answers. Unknown: units of requests whose answer never came. "
            "Billed: the receiver's total over unique summary ids. Counted: the store's month counter "
            "(admin usage API). Billed must equal counted, and billed - admitted lie in [0, unknown].",
            "",
            "| customer | store_failure | admitted | unknown | billed | counted | billed - admitted |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
            total,
            "",
            f"Billing: {report.deliveries} summaries delivered in POSTs, {report.unique_summaries} unique "
            f"ids, {report.deliveries - report.unique_summaries} resends, {len(report.conflicts)} ids "
            f"with two values; caught up with the counters {report.drain_seconds:.1f} s after the load "
            "generator had exited.",
        ]
    )


def _sum_row(report: Report) -> str:
    customers = list(report.counters)
    admitted = sum(report.outcomes.units(c, admitted=True) for c in customers)
    unknown = sum(report.outcomes.units(c, admitted=False) for c in customers)
    billed = sum(report.billed.get(c, 0) for c in customers)
    counted = sum(report.counters.values())
    return f"| **all** | | {admitted} | {unknown} | {billed} | {counted} | {billed - admitted} |"


def _memory(report: Report) -> str:
    rows = []
    for name in report.targets:
        first, last = report.memory_peaks(name)
        rows.append(f"| {name} | {first / MIB:.1f} | {last / MIB:.1f} | {_series(report, name)} |")
    window = report.config.memory_window
    return "\n".join(
        [
            "## Memory (VmRSS, MiB)",
            "",
            f"Peak of the first and of the last {window:g} s of the load, and one sample every "
            f"{_stride(report):g} s (A's series restarts after its SIGKILL).",
            "",
            f"| sidecar | first {window:g} s peak | last {window:g} s peak | samples |",
            "|---|---:|---:|---|",
            *rows,
        ]
    )


def _stride(report: Report) -> float:
    return max(1.0, round(report.config.duration / 18))


def _series(report: Report, name: str) -> str:
    stride, t0 = _stride(report), report.outcomes.started
    picked: dict[int, int] = {}
    for at, sidecar, kib in report.memory:
        if sidecar == name:
            picked.setdefault(int((at - t0) // stride), kib)
    return " ".join(f"{kib / MIB:.0f}" for _, kib in sorted(picked.items()))


def _processes(report: Report) -> str:
    exits = ", ".join(f"{name}: {code}" for name, code in report.exits.items())
    lines = [f"    {name}: {line}" for name, series in report.metrics.items() for line in series]
    return "\n".join(
        [
            "## Processes",
            "",
            f"Exit codes: {exits}.",
            "",
            "Each sidecar's own counters at the end (A's since its restart):",
            "",
            *lines,
        ]
    )


def _checks(report: Report) -> str:
    found = problems(report)
    listed: Iterable[str] = (f"- {p}" for p in found) if found else ["All checks passed."]
    return "\n".join(["## Checks", "", *listed])
