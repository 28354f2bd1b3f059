"""Every Prometheus collector, declared once, with bounded labels (plan, feature, decision, kind).

The customer id is never a label: it would make cardinality unbounded. Each sidecar instance owns
its registry, so several instances can live in one process (tests).

Under ``--workers N`` each worker is a process of its own, and worker 0's /metrics must count every
worker's requests. prometheus-client's multiprocess mode does that: each worker keeps its values
in memory-mapped files in one directory (``use_multiprocess``, called in each worker before its
Metrics exist) and the exposition reads them all. Counters and histograms add up; each gauge says
how its workers' values combine (``multiprocess_mode``: the journal backlog adds up over live
workers, the rest take the largest). The store's traffic counters, plain integers the script
batcher keeps, are copied into real counters once a second (``sync_store_traffic``) there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess(directory: Path) -> None:
    """From here on, in this process, every metric value lives in `directory` (a worker calls this
    after the fork and before it builds its Metrics; the parent cleared the directory first)."""
    os.environ[MULTIPROC_VARIABLE] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def clear_multiprocess(directory: Path) -> None:
    """Start `directory` empty: values a previous run left there must not be counted again."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def worker_exited(directory: Path, pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: what it counted happened)."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


# Sidecar overhead: from the request's arrival to the moment it is handed to the upstream.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class StoreTraffic:
    """The store client's own counters, read when /metrics is: script calls and the round trips
    (pipelines) that carried them. ``source`` returns (calls, round trips); None: not exported."""

    def __init__(self) -> None:
        self.source: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        calls, round_trips = self.source()
        yield CounterMetricFamily(
            "sidecar_store_script_calls", "Hot-path script calls sent to the store.", value=calls
        )
        yield CounterMetricFamily(
            "sidecar_store_round_trips",
            "Pipelines written to the store: the script calls of one event-loop turn share one.",
            value=round_trips,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.store_traffic = StoreTraffic()
        self.multiprocess_dir = os.environ.get(MULTIPROC_VARIABLE)
        self._synced = (0, 0)
        if self.multiprocess_dir is None:
            self.registry.register(self.store_traffic)
        else:
            self.store_script_calls = Counter(
                "sidecar_store_script_calls",
                "Hot-path script calls sent to the store.",
                registry=self.registry,
            )
            self.store_round_trips = Counter(
                "sidecar_store_round_trips",
                "Pipelines written to the store: the script calls of one event-loop turn share one.",
                registry=self.registry,
            )
        self.requests = Counter(
            "sidecar_requests",
            "Requests by decision (admitted, refused, unauthorized, ...), feature and plan.",
            ["decision", "feature", "plan"],
            registry=self.registry,
        )
        self.shadow_refusals = Counter(
            "sidecar_shadow_refusals",
            "Requests a shadow limit or shadow plan would have refused, by limit name.",
            ["plan", "limit"],
            registry=self.registry,
        )
        self.overhead = Histogram(
            "sidecar_overhead_seconds",
            "Time the sidecar adds before forwarding: routing, identity and the store round trip.",
            buckets=_OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "sidecar_store_errors",
            "Store calls that failed or timed out, by operation.",
            ["operation"],
            registry=self.registry,
        )
        self.unmeasured = Counter(
            "sidecar_unmeasured",
            "Responses whose meter value could not be read (missing or non-numeric); nothing was charged.",
            ["meter"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "sidecar_upstream_errors",
            "Upstream failures by kind (refused, timeout, broken).",
            ["kind"],
            registry=self.registry,
        )
        self.refused_input = Counter(
            "sidecar_refused_input",
            "Requests refused before admission by fault (malformed, headers_too_large, body_too_large, "
            "head_timeout); none reached the upstream whole.",
            ["fault"],
            registry=self.registry,
        )
        self.journal_recorded = Counter(
            "sidecar_journal_recorded",
            "Usage kept in the local journal because the store was unreachable, by source "
            "(admission: admitted under store_failure open; charge: a response-time charge; void: "
            "a request answered 503 whose metering call may have run, to undo; record: a usage record).",
            ["source"],
            registry=self.registry,
        )
        self.records = Counter(
            "sidecar_records",
            "Usage records (POST /admin/events) by result: accepted, duplicate, refused, invalid, "
            "unavailable (503, store_failure closed) or journaled (accepted into the local journal).",
            ["result"],
            registry=self.registry,
        )
        self.journal_merged = Counter(
            "sidecar_journal_merged",
            "Journal entries merged into the store once it answered again.",
            registry=self.registry,
        )
        self.lost_replies = Counter(
            "sidecar_lost_replies",
            "Metering calls sent whose reply never came, by what the journal found in the store: "
            "ran (its usage was in already, or undone for a 503), not_run, ran_and_billed (a 503 "
            "whose window billing had before the undo came: it stands) or repeated.",
            ["found"],
            registry=self.registry,
        )
        self.journal_pending = Gauge(
            "sidecar_journal_pending_entries",
            "Journal entries of this process not yet merged into the store.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.store_circuit_open = Gauge(
            "sidecar_store_circuit_open",
            "1 while the circuit breaker treats the store as down and calls fail at once.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.policy_reloads = Counter(
            "sidecar_policy_reloads",
            "Policy reload attempts by outcome (applied, refused).",
            ["outcome"],
            registry=self.registry,
        )
        self.policy_loaded = Gauge(
            "sidecar_policy_loaded_timestamp_seconds",
            "When the policy in force was loaded.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )

        self.billing_pushes = Counter(
            "sidecar_billing_pushes",
            "Billing push requests by outcome (delivered, retry, rejected).",
            ["outcome"],
            registry=self.registry,
        )
        self.billing_pending = Gauge(
            "sidecar_billing_pending_summaries",
            "Summaries waiting in outboxes for a 2xx from billing.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.billing_oldest_age = Gauge(
            "sidecar_billing_oldest_pending_age_seconds",
            "Age of the oldest undelivered summary seen in the last push cycle, from its window end.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.billing_dead_letters = Counter(
            "sidecar_billing_dead_letters",
            "Summaries billing refused for good (4xx), kept as dead letters for re-driving.",
            registry=self.registry,
        )
        self.notifications = Counter(
            "sidecar_notifications",
            "Threshold notifications sent, by outcome (delivered, retry, rejected: dead-lettered).",
            ["outcome"],
            registry=self.registry,
        )

    def sync_store_traffic(self) -> None:
        """Under --workers: add what the store client counted since the last call to the shared
        counters (a no-op in one process, where /metrics reads the client's integers directly)."""
        if self.multiprocess_dir is None or self.store_traffic.source is None:
            return
        calls, round_trips = self.store_traffic.source()
        self.store_script_calls.inc(calls - self._synced[0])
        self.store_round_trips.inc(round_trips - self._synced[1])
        self._synced = (calls, round_trips)

    def exposition(self) -> bytes:
        """The text format: this instance's registry, or under --workers every worker's values."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self.sync_store_traffic()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
