from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path
from types import MappingProxyType

import pytest

from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.meter_sources import Source, SourceKind
from sidecar.config.policy.model import (
    Aggregation,
    Algorithm,
    Billing,
    BillingFormat,
    Feature,
    Identity,
    OnExceed,
    Policy,
    StoreFailure,
)
from sidecar.config.policy.windows import Period
from sidecar.errors import PolicyError, PolicyInvalid

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "policies"
GOOD = FIXTURES / "good.yaml"
EXAMPLE = ROOT / "policies" / "example.yaml"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def route(policy: Policy, method: str, path: str) -> str | None:
    feature = policy.routes.feature_for(method, path)
    return None if feature is None else feature.name


def errors_of(path: Path | str) -> list[str]:
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(path)
    return [str(error) for error in caught.value.errors]


# -- one fixture per error message ------------------------------------------------------------

BAD = [
    (
        "unknown_top_key",
        "14:1: quotas: unknown key 'quotas'; valid keys are version, identity, "
        "meters, features, plans, customers, billing, store_failure, events, notifications, history_days",
    ),
    ("misspelled_limit_key", "13:27: plans.free.limits[0].limt: unknown key 'limt'; did you mean 'limit'?"),
    ("duplicate_key", "17:5: customers.acme.plan: duplicate key 'plan' (first at line 16)"),
    ("missing_version", "1:1: missing required key 'version'"),
    ("wrong_version", "1:10: version: unsupported version 2; expected 1"),
    (
        "unknown_period",
        "13:48: plans.free.limits[0].period: unknown period 'fortnight'; "
        "expected one of second, minute, hour, day, week, month",
    ),
    (
        "unknown_aggregation",
        "3:27: meters.requests.aggregation: unknown aggregation 'avg'; "
        "expected one of count, sum, max, min, unique",
    ),
    (
        "source",
        "3:38: meters.tokens.source: invalid source 'response.heder:X-Usage-Tokens'; "
        "expected request, request.bytes, response.bytes, response.duration_ms, "
        "request.header:NAME, response.header:NAME, response.json:a.b.c or event",
    ),
    (
        "count_source",
        "3:40: meters.egress.source: aggregation 'count' counts requests; use 'sum' to add up response.bytes",
    ),
    (
        "measured_source_missing",
        "3:26: meters.payload.aggregation: aggregation 'max' needs a "
        "measured source such as request.bytes or request.header:NAME, not 'request'",
    ),
    (
        "meter_name",
        "3:3: meters.Requests: invalid meter name 'Requests'; use a lowercase letter, "
        "then lowercase letters, digits or _ (at most 63 characters)",
    ),
    (
        "cost_response_meter",
        "8:12: features[0].cost.tokens: cost can only be given for "
        "request-time meters; 'tokens' is measured from response.header:X-Usage-Tokens",
    ),
    ("public_cost", "6:65: features[0].cost: a public feature is not metered, so it cannot have a cost"),
    (
        "method",
        "3:36: features[0].match.method: unknown method 'FETCH'; "
        "expected one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
    ),
    ("path_slash", "3:34: features[0].match.path: path 'v1/search' must start with '/'"),
    (
        "path_placeholder",
        "3:48: features[0].match.path: segment 'x{id}.csv' of path "
        "'/v1/exports/x{id}.csv': a placeholder like {id} must fill a whole path segment",
    ),
    (
        "duplicate_feature",
        "4:12: features[1].name: duplicate feature 'search' "
        "(first defined at bad_duplicate_feature.yaml:3:12)",
    ),
    ("bool", "3:53: features[0].public: expected true or false, got 'yes'"),
    (
        "plan_unknown_feature",
        "11:24: plans.free.features[1]: unknown feature 'exprot'; did you mean 'export'?",
    ),
    (
        "public_feature_in_plan",
        "11:24: plans.free.features[1]: feature 'health' is public and needs no entitlement",
    ),
    (
        "limit_unknown_meter",
        "13:17: plans.free.limits[0].meter: unknown meter 'reqests'; did you mean 'requests'?",
    ),
    (
        "limit_feature_not_in_plan",
        "13:60: plans.free.limits[0].feature: limit is scoped to "
        "feature 'export', which plan 'free' does not list in its features",
    ),
    (
        "limit_on_max_meter",
        "7:17: plans.free.limits[0].meter: meter 'payload': a limit on a 'max' meter has no running total",
    ),
    (
        "burst_month",
        "13:62: plans.free.limits[0].burst: burst applies to rate periods "
        "(second, minute, hour), not 'month'",
    ),
    ("negative_limit", "13:34: plans.free.limits[0].limit: expected an integer >= 0, got -5"),
    ("float_limit", "13:34: plans.free.limits[0].limit: expected an integer >= 0, got float 1.5"),
    ("bool_limit", "13:34: plans.free.limits[0].limit: expected an integer >= 0, got bool true"),
    ("missing_key", "13:9: plans.free.limits[0]: missing required key 'period'"),
    ("duplicate_limit", "14:9: plans.free.limits[1]: duplicate limit requests-month; first at line 13"),
    (
        "prepaid_allowance_soft",
        "10:9: plans.credits.limits[0]: on a prepaid meter a day/week/month limit is the allowance "
        "used before credit, so it cannot be on_exceed: allow",
    ),
    (
        "prepaid_allowance_feature",
        "10:9: plans.credits.limits[0]: on a prepaid meter a day/week/month limit is the allowance "
        "used before credit, so it cannot be scoped to one feature",
    ),
    (
        "prepaid_allowance_shadow",
        "10:9: plans.credits.limits[0]: on a prepaid meter a day/week/month limit is the allowance "
        "used before credit, so it cannot be a shadow limit",
    ),
    ("reserve_ttl_alone", "3:85: meters.tokens.reserve_ttl: reserve_ttl applies only together with reserve"),
    (
        "reserve_default_fixed",
        "3:103: meters.tokens.reserve_default: reserve_default applies only when reserve reads a "
        "request source",
    ),
    (
        "reserve_without_default",
        "3:83: meters.tokens.reserve: reserve reads request.json:max_tokens; add reserve_default, "
        "the amount held when a request does not carry it",
    ),
    (
        "reserve_on_count",
        "3:43: meters.requests.reserve: reserve applies to a 'sum' meter measured from the "
        "response, such as tokens",
    ),
    (
        "reserve_source",
        "3:81: meters.tokens.reserve: invalid reserve 'response.json:usage'; expected a whole "
        "number, request.header:NAME or request.json:a.b.c",
    ),
    (
        "limit_on_unique_meter",
        "8:22: plans.p.limits[0].meter: meter 'users': a limit on a 'unique' meter "
        "is not supported by this version: it would not be enforced, so it is refused",
    ),
    (
        "prepaid_unique",
        "6:15: plans.credits.prepaid[0]: meter 'users' has aggregation 'unique'; "
        "prepaid credit draws down a 'count' or 'sum' meter",
    ),
    (
        "api_key_clear",
        "17:16: customers.acme.api_keys[0]: api key is not a sha256: hash "
        "(the value is not shown); store the hash instead: use `sidecar hash-key KEY`",
    ),
    (
        "api_key_hash_form",
        "17:16: customers.acme.api_keys[0]: api key 'sha256:ABC123' is not "
        "sha256: followed by 64 lowercase hex digits; use `sidecar hash-key KEY` to compute it",
    ),
    ("duplicate_api_key", "20:16: customers.bob.api_keys[0]: api key already belongs to customer 'acme'"),
    (
        "billing_anchor",
        "15:38: customers.acme.billing_anchor: invalid date '2026-02-30'; expected a date YYYY-MM-DD",
    ),
    ("customer_plan", "15:16: customers.acme.plan: unknown plan 'gold'"),
    (
        "customer_id",
        "15:3: customers.acme{1}: invalid customer id 'acme{1}'; use a letter or "
        "digit, then letters, digits or . _ : @ - (at most 128 characters)",
    ),
    (
        "header_list_empty",
        "3:20: identity.api_key_headers: expected at least one header name, got an empty list",
    ),
    (
        "plan_name",
        "3:3: plans.pro plan: invalid plan name 'pro plan'; use a letter or digit, then letters, "
        "digits or . _ : @ - (at most 128 characters)",
    ),
    (
        "header_name",
        "3:21: identity.api_key_headers[0]: invalid header name 'X API Key'; "
        "use letters, digits and !#$%&'*+-.^_`|~",
    ),
    (
        "lago_batch_size",
        "6:89: billing.batch_size: billing format 'lago' accepts at most 100 events per batch, got 500",
    ),
    (
        "billing_id_missing",
        "7:3: customers.bob: billing format 'stripe' needs stripe_customer_id on every customer; "
        "'bob' has none",
    ),
    (
        "billing_format",
        "4:11: billing.format: unknown format 'csv'; expected one of json, stripe, lago, openmeter",
    ),
    (
        "billing_url",
        "3:8: billing.url: invalid url 'ftp://billing.internal/usage'; expected an http:// or https:// URL",
    ),
    ("billing_interval", "4:13: billing.interval: expected an integer >= 1, got 0"),
    ("store_failure", "2:16: store_failure: unknown store_failure 'sometimes'; expected one of closed, open"),
    (
        "event_unique",
        "3:40: meters.users.source: a meter fed by usage records (source: event) takes count, sum, "
        "max or min, not 'unique'",
    ),
    (
        "event_rate_limit",
        "7:51: plans.free.limits[0].period: meter 'gpu_seconds' is fed only by usage records "
        "(source: event), which rate limits do not count; use period day, week or month, not 'hour'",
    ),
    (
        "event_limit_feature",
        "10:65: plans.free.limits[0].feature: meter 'gpu_seconds' is fed only by usage records "
        "(source: event), which name no feature; a limit on it cannot be scoped to one",
    ),
    ("events_dedupe_hours", "3:24: events.dedupe_hours: expected an integer from 1 to 168, got 200"),
    ("yaml_syntax", "4:9: invalid YAML: while parsing a flow mapping, expected ',' or '}', but got ':'"),
    ("empty", "1:1: empty policy file; expected a mapping with version: 1"),
    ("not_mapping", "1:1: expected a mapping, got a list"),
]


@pytest.mark.parametrize(("name", "expected"), BAD, ids=[name for name, _ in BAD])
def test_bad_fixture_reports_its_one_error(name: str, expected: str) -> None:
    path = FIXTURES / f"bad_{name}.yaml"
    assert errors_of(path) == [f"{path}:{expected}"]


def test_every_bad_fixture_is_in_the_table() -> None:
    on_disk = {path.stem.removeprefix("bad_") for path in FIXTURES.glob("bad_*.yaml")}
    assert on_disk == {name for name, _ in BAD}


def test_a_clear_text_api_key_is_never_echoed() -> None:
    (message,) = errors_of(FIXTURES / "bad_api_key_clear.yaml")
    assert "sk_live_TOPSECRET" not in message
    assert "TOPSECRET" not in message


def test_api_keys_given_as_one_string_are_not_echoed_either(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nplans: {free: {}}\ncustomers:\n  acme:\n    plan: free\n"
        "    api_keys: sk_live_TOPSECRET\n"
    )
    assert errors_of(path) == [
        f"{path}:6:15: customers.acme.api_keys: expected a list of sha256: key hashes "
        "(the value is not shown)"
    ]


def test_every_field_of_a_section_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nbilling: {url: 'ftp://x', format: csv, interval: 1.0}\n")
    assert [error.split(": ")[1] for error in errors_of(path)] == [
        "billing.url",
        "billing.format",
        "billing.interval",
    ]


def test_errors_are_structured_and_one_based() -> None:
    path = FIXTURES / "bad_unknown_period.yaml"
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(path)
    assert caught.value.errors == (
        PolicyError(
            file=str(path),
            line=13,
            col=48,
            path="plans.free.limits[0].period",
            message="unknown period 'fortnight'; expected one of second, minute, hour, day, week, month",
        ),
    )


# -- every error, not just the first ------------------------------------------------------------


def test_three_independent_errors_are_all_reported_in_order(tmp_path: Path) -> None:
    path = tmp_path / "three.yaml"
    path.write_text(
        "version: 1\n"
        "meters:\n"
        "  requests: {aggregation: count}\n"
        "plans:\n"
        "  free:\n"
        "    limits:\n"
        "      - {meter: requests, limit: 10, period: fortnight}\n"
        "      - {meter: requests, limit: 1.5, period: day}\n"
        "customers:\n"
        "  acme: {plan: free, api_keys: [hunter2]}\n"
    )
    assert errors_of(path) == [
        f"{path}:7:46: plans.free.limits[0].period: unknown period 'fortnight'; "
        "expected one of second, minute, hour, day, week, month",
        f"{path}:8:34: plans.free.limits[1].limit: expected an integer >= 0, got float 1.5",
        f"{path}:10:33: customers.acme.api_keys[0]: api key is not a sha256: hash "
        "(the value is not shown); store the hash instead: use `sidecar hash-key KEY`",
    ]


def test_an_invalid_definition_does_not_cascade_into_reference_errors(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(
        "version: 1\n"
        "meters:\n"
        "  requests: {aggregation: avg}\n"
        "plans:\n"
        "  free:\n"
        "    limits: [{meter: requests, limit: 10, period: day}]\n"
    )
    assert len(errors_of(path)) == 1


def test_missing_file_is_an_error_at_line_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert errors_of(path) == [f"{path}:1:1: no such file or directory"]


def test_directory_without_yaml_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a policy")
    assert errors_of(tmp_path) == [f"{tmp_path}:1:1: no *.yaml or *.yml files in this directory"]


# -- directories merge --------------------------------------------------------------------------


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_directory_files_merge_in_name_order(tmp_path: Path) -> None:
    # a-plans.yaml names the meter and a feature that b-meters.yml defines.
    write(
        tmp_path,
        "a-plans.yaml",
        (
            "version: 1\n"
            "features:\n"
            "  - {name: export, match: {method: post, path: '/v1/exports/{id}'}}\n"
            "plans:\n"
            "  free:\n"
            "    features: [search, export]\n"
            "    limits: [{meter: requests, limit: 5, period: second}]\n"
            "customers:\n"
            "  bob: {plan: free}\n"
        ),
    )
    write(
        tmp_path,
        "b-meters.yml",
        (
            "version: 1\n"
            "meters:\n"
            "  requests: {aggregation: count}\n"
            "features:\n"
            "  - {name: search, match: {path: /v1/search}}\n"
        ),
    )
    write(tmp_path, "notes.txt", "ignored\n")
    policy = load_policy(tmp_path)
    assert [feature.name for feature in policy.features] == ["export", "search"]
    assert policy.features[0].method == "POST"
    assert policy.plans["free"].features == frozenset({"search", "export"})
    assert policy.customers["bob"].plan == "free"
    assert policy.meters["requests"].counts_requests
    assert policy.sources == (str(tmp_path / "a-plans.yaml"), str(tmp_path / "b-meters.yml"))


def test_duplicate_meter_across_files_points_at_both(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\nmeters:\n  tokens: {aggregation: count}\n")
    second = write(tmp_path, "b.yaml", "version: 1\nmeters:\n  tokens: {aggregation: count}\n")
    assert errors_of(tmp_path) == [
        f"{second}:3:3: meters.tokens: duplicate meter 'tokens' (first defined at a.yaml:3:3)"
    ]


def test_section_defined_in_two_files(tmp_path: Path) -> None:
    billing = "billing:\n  url: http://127.0.0.1:8099/usage\n"
    write(tmp_path, "a.yaml", "version: 1\n" + billing)
    second = write(tmp_path, "b.yaml", "version: 1\n\n" + billing)
    assert errors_of(tmp_path) == [f"{second}:3:1: billing: section 'billing' already defined at a.yaml:2:1"]


def test_errors_from_several_files_sort_by_file_then_line(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", "version: 1\nmeters:\n  x: {aggregation: avg}\n")
    second = write(tmp_path, "b.yaml", "version: 3\n")
    errors = errors_of(tmp_path)
    assert [error.split(":")[0] for error in errors] == [str(first), str(second)]


# -- the good policies ----------------------------------------------------------------------------


def test_good_policy_objects() -> None:
    policy = load_policy(GOOD)
    assert policy.identity == Identity(api_key_headers=("X-API-Key", "Authorization"))
    assert policy.store_failure is StoreFailure.CLOSED
    assert policy.billing is None
    assert policy.sources == (str(GOOD),)
    assert policy.meters["requests"].aggregation is Aggregation.COUNT
    assert policy.meters["requests"].source == Source(kind=SourceKind.REQUEST)
    assert policy.meters["tokens"].source == Source(
        kind=SourceKind.RESPONSE_HEADER, argument="X-Usage-Tokens"
    )


def test_good_policy_features_and_routes() -> None:
    policy = load_policy(GOOD)
    export = policy.routes.feature_for("POST", "/v1/exports/abc")
    assert export is not None
    assert export == Feature(
        name="export",
        method="POST",
        path="/v1/exports/{id}",
        cost=MappingProxyType({"requests": 10}),
    )
    assert isinstance(export.cost, MappingProxyType)
    assert route(policy, "GET", "/healthz") == "health"
    assert policy.features[0].public and not export.public
    assert route(policy, "DELETE", "/v1/completions") == "complete"
    assert route(policy, "POST", "/v1/search") is None
    assert route(policy, "POST", "/v1/exports/abc/x") is None


def test_good_policy_plans_and_limits() -> None:
    pro = load_policy(GOOD).plans["pro"]
    assert pro.features == frozenset({"search", "export", "complete"})
    assert [limit.name for limit in pro.limits] == [
        "requests-month",
        "tokens-month",
        "requests-second",
        "requests-day-export",
    ]
    tokens, rate, scoped = pro.limits[1], pro.limits[2], pro.limits[3]
    assert tokens.on_exceed is OnExceed.ALLOW and not tokens.is_hard
    assert rate.period is Period.SECOND and rate.ceiling == 150
    assert rate.algorithm is Algorithm.MOVING_WINDOW
    assert tokens.algorithm is scoped.algorithm is Algorithm.CALENDAR_QUOTA
    assert scoped.feature == "export" and scoped.burst == 0 and not scoped.shadow
    assert pro.prepaid == () and pro.store_failure is None and not pro.shadow


def test_good_policy_customers_and_key_index() -> None:
    policy = load_policy(GOOD)
    acme = policy.customers["acme"]
    assert acme.plan == "pro"
    assert acme.api_key_hashes == (sha256("acme-key-1"),)
    assert acme.billing_anchor == date(2026, 1, 15)
    assert policy.customers["bob"].billing_anchor is None
    assert policy.customer_by_key_hash == {
        sha256("acme-key-1"): "acme",
        sha256("bob-key-1"): "bob",
    }


def test_quoted_dates_methods_and_top_level_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        (
            "version: 1\n"
            "identity: {api_key_headers: [X-Key]}\n"
            "meters:\n"
            "  bytes_in: {aggregation: sum, source: request.bytes}\n"
            "  answer: {aggregation: unique, source: 'response.json:data.user.id'}\n"
            "features: [{name: a, match: {method: Get, path: /a}}]\n"
            "plans: {p: {features: [a], shadow: true, store_failure: open}}\n"
            "customers: {'c:1': {plan: p, billing_anchor: '2026-03-31'}}\n"
            "billing: {url: 'https://billing.example/usage', format: openmeter, interval: 30}\n"
            "store_failure: open\n"
        ),
    )
    policy = load_policy(path)
    assert policy.identity.api_key_headers == ("X-Key",)
    assert policy.meters["answer"].source.argument == "data.user.id"
    assert policy.features[0].method == "GET"
    plan = policy.plans["p"]
    assert plan.prepaid == () and plan.shadow
    assert plan.store_failure is StoreFailure.OPEN
    assert policy.customers["c:1"].billing_anchor == date(2026, 3, 31)
    assert policy.billing == Billing(
        url="https://billing.example/usage", format=BillingFormat.OPENMETER, interval=30
    )
    assert policy.store_failure is StoreFailure.OPEN


def test_example_policy_loads() -> None:
    policy = load_policy(EXAMPLE)
    demo = policy.customers["demo"]
    assert demo.plan == "free"
    assert policy.customer_by_key_hash[sha256("demo-key")] == "demo"
    assert policy.plans["free"].features == frozenset({"hello", "search"})
    assert route(policy, "GET", "/hello") == "hello"
    assert policy.billing is not None and policy.billing.url.startswith("http://127.0.0.1:")


# -- what the loader sets beyond what a policy says ----------------------------------------------


@pytest.mark.parametrize(
    ("period", "algorithm"),
    [
        ("second", Algorithm.MOVING_WINDOW),
        ("minute", Algorithm.MOVING_WINDOW),
        ("hour", Algorithm.MOVING_WINDOW),
        ("day", Algorithm.CALENDAR_QUOTA),
        ("week", Algorithm.CALENDAR_QUOTA),
        ("month", Algorithm.CALENDAR_QUOTA),
    ],
)
def test_each_period_is_counted_by_its_algorithm(tmp_path: Path, period: str, algorithm: Algorithm) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        "version: 1\nmeters: {requests: {aggregation: count}}\n"
        f"plans: {{p: {{limits: [{{meter: requests, limit: 1, period: {period}}}]}}}}\n",
    )
    (limit,) = load_policy(path).plans["p"].limits
    assert limit.algorithm is algorithm
    assert limit.algorithm is Algorithm.of(limit.period)
