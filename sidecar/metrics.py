"""Every Prometheus collector, declared once, with bounded labels (plan, feature, decision, kind).

The customer id is never a label: it would make cardinality unbounded. Each sidecar instance owns
its registry, so several instances can live in one process (tests, workers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

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
        self.registry.register(self.store_traffic)
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
            "a request answered 503 whose metering call may have run, to undo).",
            ["source"],
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
        )
        self.store_circuit_open = Gauge(
            "sidecar_store_circuit_open",
            "1 while the circuit breaker treats the store as down and calls fail at once.",
            registry=self.registry,
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
        )
        self.billing_oldest_age = Gauge(
            "sidecar_billing_oldest_pending_age_seconds",
            "Age of the oldest undelivered summary seen in the last push cycle, from its window end.",
            registry=self.registry,
        )
        self.billing_dead_letters = Counter(
            "sidecar_billing_dead_letters",
            "Summaries billing refused for good (4xx), kept as dead letters for re-driving.",
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
