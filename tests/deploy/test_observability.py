"""The Grafana dashboard and the Prometheus alert rules against a real sidecar's /metrics.

Every metric the dashboard and the rules query must be one that `sidecar run` serves, with the
labels it has; `promtool check rules` and `promtool check metrics` must pass; and each alert must
fire on the series it is written for, and stay quiet on a healthy sidecar (`promtool test rules`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    DASHBOARD,
    REPO,
    RULES,
    find_tool,
    grouping,
    http_get,
    metric_names,
    raw_request,
    run_tool,
    selectors,
    sidecar_command,
    sidecar_process,
    upstream,
)

# Labels the scrape adds (job, instance), and the bucket bound of a histogram.
TARGET_LABELS = {"job", "instance"}


@dataclass(frozen=True)
class Exposition:
    text: str
    names: frozenset[str]  # every series name /metrics may carry
    labels: dict[str, set[str]]  # labels seen on the samples of each name


def parse_exposition(text: str) -> Exposition:
    names: set[str] = set()
    labels: dict[str, set[str]] = defaultdict(set)
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        elif line and not line.startswith("#"):
            match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s", line)
            assert match, f"unreadable sample line: {line!r}"
            names.add(match.group(1))
            labels[match.group(1)].update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', match.group(3) or ""))
    return Exposition(text, frozenset(names), dict(labels))


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposition]:
    """/metrics of a real `sidecar run` (embedded redis-server) after traffic of every kind:
    admitted, refused, unauthorized, forbidden, not found, public, malformed, a refused reload."""
    work = tmp_path_factory.mktemp("live-sidecar")
    policies = work / "policies"
    policies.mkdir()
    shutil.copy(REPO / "policies" / "example.yaml", policies / "example.yaml")
    with (
        upstream() as upstream_url,
        sidecar_process(
            sidecar_command(), upstream_url, policies, work / "data", work / "sidecar.log"
        ) as sidecar,
    ):
        sidecar.wait_ready()
        key = {"X-API-Key": "demo-key"}
        statuses = [http_get(f"{sidecar.proxy}/hello", headers=key)[0] for _ in range(7)]
        assert statuses.count(200) >= 1 and 429 in statuses, statuses
        assert http_get(f"{sidecar.proxy}/hello")[0] == 401
        assert http_get(f"{sidecar.proxy}/v1/exports/1", method="POST", headers=key)[0] == 403
        assert http_get(f"{sidecar.proxy}/no/such/route", headers=key)[0] == 404
        assert http_get(f"{sidecar.proxy}/healthz")[0] == 200
        answer = raw_request(sidecar.proxy_port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        assert answer.split(b" ", 2)[1] == b"400", answer
        (policies / "zz-broken.yaml").write_text("version: 1\nplans: {free: {features: [no_such_feature]}}\n")
        assert http_get(f"{sidecar.admin}/admin/reload", method="POST")[0] == 422
        status, text = http_get(f"{sidecar.admin}/metrics")
        assert status == 200
    yield parse_exposition(text)


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def dashboard_panels() -> list[dict[str, Any]]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            queries.append((f"variable ${variable['name']}", inner.group(1) if inner else query))
    return queries


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def rule_queries() -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in rules()]


def as_promql(query: str) -> str:
    """A dashboard query as Prometheus itself would receive it from Grafana."""
    for variable, value in {
        "$__rate_interval": "1m",
        "$__range": "6h",
        "$__interval": "30s",
        "$job": ".*",
        "$instance": ".*",
    }.items():
        query = query.replace(variable, value)
    return query


# --- Every name and label exists -----------------------------------------------------------------


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    queried = set().union(*(metric_names(q) for _, q in dashboard_queries()))
    for metric in (
        "sidecar_requests_total",
        "sidecar_overhead_seconds_bucket",
        "sidecar_store_round_trips_total",
        "sidecar_store_errors_total",
        "sidecar_store_circuit_open",
        "sidecar_journal_pending_entries",
        "sidecar_billing_pending_summaries",
        "sidecar_billing_dead_letters_total",
        "sidecar_policy_reloads_total",
    ):
        assert metric in queried, f"the dashboard shows no {metric}"


def test_the_rules_alert_on_what_an_operator_must_act_on() -> None:
    alerts = {rule["alert"]: metric_names(rule["expr"]) for rule in rules()}
    expected = {
        "QuotaSidecarStoreDown": "sidecar_store_circuit_open",
        "QuotaSidecarJournalGrowing": "sidecar_journal_pending_entries",
        "QuotaSidecarBillingDeadLetters": "sidecar_billing_dead_letters_total",
        "QuotaSidecarPolicyReloadRefused": "sidecar_policy_reloads_total",
        "QuotaSidecarBillingOutboxOld": "sidecar_billing_oldest_pending_age_seconds",
    }
    for alert, metric in expected.items():
        assert metric in alerts.get(alert, set()), f"no alert {alert} on {metric}"
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_queried_is_served_by_a_real_sidecar(source: str, exposition: Exposition) -> None:
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    problems = []
    for where, query in queries:
        names = metric_names(query)
        if not names:
            problems.append(f"{where}: selects no metric: {query}")
        problems += [f"{where}: {name} is not in /metrics" for name in sorted(names - exposition.names)]
    assert not problems, "\n".join(problems) + "\n\n/metrics served:\n" + "\n".join(sorted(exposition.names))


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_label_queried_is_one_the_metric_carries(source: str, exposition: Exposition) -> None:
    """Label matchers and `by (...)` lists name labels the metric's samples have (checked for the
    metrics the traffic above produced samples of; the scrape's own job and instance aside)."""
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    problems = []
    checked = 0
    for where, query in queries:
        uses = [(name, labels) for name, labels in selectors(query)]
        uses += [(name, labels) for labels, inner in grouping(query) for name in metric_names(inner)]
        for name, labels in uses:
            if name in exposition.labels:
                checked += 1
                unknown = labels - TARGET_LABELS - exposition.labels[name]
                if unknown:
                    problems.append(
                        f"{where}: {name} has no label {sorted(unknown)} "
                        f"(it has {sorted(exposition.labels[name])})"
                    )
    assert not problems, "\n".join(problems)
    assert checked >= 5, "too few queries on metrics with samples to check their labels"


def test_the_dashboard_is_importable_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    names = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= names
    for panel in dashboard_panels():
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                assert "$job" in target["expr"] and "$instance" in target["expr"], (
                    panel["title"],
                    target["expr"],
                )


# --- promtool -------------------------------------------------------------------------------------


def test_promtool_check_rules_passes() -> None:
    promtool = find_tool("promtool")
    done = run_tool([promtool, "check", "rules", str(RULES)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_check_metrics_passes_on_the_real_exposition(exposition: Exposition) -> None:
    promtool = find_tool("promtool")
    done = run_tool([promtool, "check", "metrics"], stdin=exposition.text)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables filled in, as a recording rule for promtool."""
    promtool = find_tool("promtool")
    recorded = [
        {"record": f"dashboard:query_{n}", "expr": as_promql(query)}
        for n, (_, query) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    done = run_tool([promtool, "check", "rules", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr


# --- promtool test rules: each alert fires when it should, and only then --------------------------

A = 'job="sidecar", instance="10.0.0.1:9000"'
B = 'job="sidecar", instance="10.0.0.2:9000"'


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{labels}}}", "values": values}


def alert(name: str, at: str, *fired: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in fired]}


def labels(severity: str, **extra: str) -> dict[str, str]:
    return {"severity": severity, "job": "sidecar", **extra}


def healthy_series() -> list[dict[str, str]]:
    """Two sidecars serving normally for an hour."""
    found = []
    for target in (A, B):
        found += [
            series("sidecar_store_circuit_open", target, "0x60"),
            series("sidecar_store_errors_total", target + ', operation="check_and_meter"', "0x60"),
            series("sidecar_store_script_calls_total", target, "0+600x60"),
            series("sidecar_journal_pending_entries", target, "0x60"),
            series("sidecar_billing_dead_letters_total", target, "0x60"),
            series("sidecar_billing_oldest_pending_age_seconds", target, "30x60"),
            series("sidecar_billing_pushes_total", target + ', outcome="delivered"', "0+2x60"),
            series("sidecar_billing_pushes_total", target + ', outcome="retry"', "0+1x60"),
            series("sidecar_policy_reloads_total", target + ', outcome="applied"', "0+1x60"),
            series("sidecar_overhead_seconds_bucket", target + ', le="0.001"', "0+590x60"),
            series("sidecar_overhead_seconds_bucket", target + ', le="0.025"', "0+600x60"),
            series("sidecar_overhead_seconds_bucket", target + ', le="+Inf"', "0+600x60"),
        ]
    return found


def rule_unit_tests() -> list[dict[str, Any]]:
    names = [rule["alert"] for rule in rules()]
    return [
        {
            "name": "a healthy fleet fires nothing",
            "interval": "1m",
            "input_series": healthy_series(),
            "alert_rule_test": [alert(name, "60m") for name in names],
        },
        {
            "name": "store down on one replica",
            "interval": "1m",
            "input_series": [
                series("sidecar_store_circuit_open", A, "0 0 1x20"),
                series("sidecar_store_circuit_open", B, "0x22"),
            ],
            "alert_rule_test": [
                alert("QuotaSidecarStoreDown", "2m"),
                alert("QuotaSidecarStoreDown", "5m", labels("critical", instance="10.0.0.1:9000")),
            ],
        },
        {
            "name": "2% of store calls failing",
            "interval": "1m",
            "input_series": [
                series("sidecar_store_errors_total", A + ', operation="check_and_meter"', "0+12x40"),
                series("sidecar_store_script_calls_total", A, "0+600x40"),
            ],
            "alert_rule_test": [
                alert("QuotaSidecarStoreErrors", "30m", labels("warning", instance="10.0.0.1:9000"))
            ],
        },
        {
            "name": "journal growing, then stuck",
            "interval": "1m",
            "input_series": [series("sidecar_journal_pending_entries", A, "0 0 0 5+5x30 155x40")],
            "alert_rule_test": [
                alert("QuotaSidecarJournalGrowing", "25m", labels("warning", instance="10.0.0.1:9000")),
                alert("QuotaSidecarJournalNotDraining", "25m"),
                alert("QuotaSidecarJournalNotDraining", "40m", labels("critical", instance="10.0.0.1:9000")),
            ],
        },
        {
            "name": "a dead letter",
            "interval": "1m",
            "input_series": [series("sidecar_billing_dead_letters_total", A, "0x10 1x20")],
            "alert_rule_test": [
                alert("QuotaSidecarBillingDeadLetters", "5m"),
                alert("QuotaSidecarBillingDeadLetters", "15m", labels("warning")),
            ],
        },
        {
            "name": "undelivered summaries an hour old",
            "interval": "1m",
            "input_series": [
                series("sidecar_billing_oldest_pending_age_seconds", A, "0+60x90"),
                series("sidecar_billing_oldest_pending_age_seconds", B, "0+60x90"),
            ],
            "alert_rule_test": [
                alert("QuotaSidecarBillingOutboxOld", "70m"),
                alert("QuotaSidecarBillingOutboxOld", "80m", labels("critical")),
            ],
        },
        {
            "name": "billing refusing every push",
            "interval": "1m",
            "input_series": [
                series("sidecar_billing_pushes_total", A + ', outcome="delivered"', "5x60"),
                series("sidecar_billing_pushes_total", A + ', outcome="retry"', "0+3x60"),
            ],
            "alert_rule_test": [alert("QuotaSidecarBillingPushesFailing", "45m", labels("warning"))],
        },
        {
            "name": "a refused reload",
            "interval": "1m",
            "input_series": [
                series("sidecar_policy_reloads_total", A + ', outcome="refused"', "0x5 1x30"),
                series("sidecar_policy_reloads_total", A + ', outcome="applied"', "0+1x35"),
            ],
            "alert_rule_test": [
                alert("QuotaSidecarPolicyReloadRefused", "10m", labels("warning", instance="10.0.0.1:9000")),
                alert("QuotaSidecarPolicyReloadRefused", "30m"),
            ],
        },
        {
            "name": "p99 added latency above 25 ms",
            "interval": "1m",
            "input_series": [
                series("sidecar_overhead_seconds_bucket", A + ', le="0.025"', "0+10x40"),
                series("sidecar_overhead_seconds_bucket", A + ', le="0.05"', "0+600x40"),
                series("sidecar_overhead_seconds_bucket", A + ', le="+Inf"', "0+600x40"),
            ],
            "alert_rule_test": [alert("QuotaSidecarAddedLatencyHigh", "30m", labels("warning"))],
        },
    ]


def test_each_alert_fires_on_its_condition_and_not_on_a_healthy_fleet(tmp_path: Path) -> None:
    promtool = find_tool("promtool")
    # promtool compares annotations too: test the expressions, `for` and labels on a copy without them.
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": rule_unit_tests()}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = run_tool([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        case["alertname"]
        for test in rule_unit_tests()[1:]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in rules()}, "an alert no test makes fire"
