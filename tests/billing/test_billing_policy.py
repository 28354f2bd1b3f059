"""The loader refuses what the billing system would refuse later (SPEC §6): a Stripe window that
cannot arrive within the 35 days Stripe takes events for, a max or min meter in a format that can
only add, a batch over what the format takes; and it reads billing.stripe_api and
billing.namespace. Each error names where and what, like every loader error."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config.policy.loader import load_policy
from sidecar.config.policy.model import DEFAULT_NAMESPACE, BillingFormat, StripeApi
from sidecar.errors import PolicyInvalid
from tests.conftest import write_policy

STRIPE_URL = "https://api.stripe.com/v1/billing/meter_events"
DAY = 86400
STRIPE_WHY = "Stripe meters only sum, count or keep the last event"


def policy(meters: str, billing: str) -> str:
    return f"""\
version: 1
meters: {{{meters}}}
features: [{{name: search, match: {{path: /v1/search}}}}]
plans: {{p: {{features: [search]}}}}
customers: {{acme: {{plan: p, stripe_customer_id: cus_1, lago_subscription_id: sub_1}}}}
billing: {{{billing}}}
"""


COUNT = "requests: {aggregation: count}"


def errors(tmp_path: Path, text: str) -> list[str]:
    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(path)
    return [str(error).removeprefix(f"{path}:") for error in caught.value.errors]


def loads(tmp_path: Path, text: str) -> None:
    load_policy(write_policy(tmp_path, text))


# -- Stripe's 35 days ------------------------------------------------------------------------------


def test_a_stripe_window_that_cannot_arrive_within_35_days_is_refused(tmp_path: Path) -> None:
    text = policy(COUNT, f"url: '{STRIPE_URL}', format: stripe, interval: {40 * DAY}")
    assert errors(tmp_path, text) == [
        f"6:92: billing.interval: billing format 'stripe' takes events at most 35 days old, and a "
        f"summary is sent interval + grace = {40 * DAY + 5} seconds (40.0 days) after its window "
        f"starts; make interval + grace less than {35 * DAY} seconds"
    ]


@pytest.mark.parametrize(
    "interval, grace, refused",
    [
        pytest.param(35 * DAY - 6, 5, False, id="a-second-to-spare"),
        pytest.param(35 * DAY - 5, 5, True, id="exactly-35-days"),
        pytest.param(30 * DAY, 5 * DAY, True, id="the-grace-counts-too"),
        pytest.param(86400, 5, False, id="a-day"),
    ],
)
def test_interval_and_grace_together_must_leave_stripe_its_35_days(
    tmp_path: Path, interval: int, grace: int, refused: bool
) -> None:
    text = policy(COUNT, f"url: '{STRIPE_URL}', format: stripe, interval: {interval}, grace: {grace}")
    if refused:
        (error,) = errors(tmp_path, text)
        assert "takes events at most 35 days old" in error
    else:
        loads(tmp_path, text)


@pytest.mark.parametrize("fmt", ["json", "lago", "openmeter"])
def test_formats_without_an_age_limit_take_long_windows(tmp_path: Path, fmt: str) -> None:
    loads(
        tmp_path, policy(COUNT, f"url: 'https://billing.example/usage', format: {fmt}, interval: {40 * DAY}")
    )


# -- meters a format cannot bill -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, aggregation, why, able",
    [
        pytest.param("stripe", "max", STRIPE_WHY, "json, lago, openmeter", id="stripe-max"),
        pytest.param("stripe", "min", STRIPE_WHY, "json, openmeter", id="stripe-min"),
        pytest.param(
            "lago", "min", "Lago billable metrics take no minimum", "json, openmeter", id="lago-min"
        ),
    ],
)
def test_a_meter_the_billing_system_cannot_bill_is_refused(
    tmp_path: Path, fmt: str, aggregation: str, why: str, able: str
) -> None:
    meters = f"{COUNT}, biggest: {{aggregation: {aggregation}, source: request.bytes}}"
    assert errors(tmp_path, policy(meters, f"url: '{STRIPE_URL}', format: {fmt}")) == [
        f"2:42: meters.biggest: meter 'biggest' aggregates {aggregation}, which billing format "
        f"'{fmt}' cannot bill ({why}); bill it with format {able}, or aggregate sum"
    ]


@pytest.mark.parametrize(
    "fmt, aggregation",
    [("json", "max"), ("json", "min"), ("lago", "max"), ("openmeter", "max"), ("openmeter", "min")],
)
def test_max_and_min_meters_are_billable_where_the_system_takes_them(
    tmp_path: Path, fmt: str, aggregation: str
) -> None:
    meters = f"{COUNT}, biggest: {{aggregation: {aggregation}, source: request.bytes}}"
    loads(tmp_path, policy(meters, f"url: 'https://billing.example/usage', format: {fmt}"))


@pytest.mark.parametrize("aggregation", ["sum", "unique"])
def test_meters_that_add_up_are_billable_with_stripe(tmp_path: Path, aggregation: str) -> None:
    """A unique meter adds up too: each value is billed once a month, where first seen."""
    meters = f"{COUNT}, users: {{aggregation: {aggregation}, source: 'request.header:X-User'}}"
    loads(tmp_path, policy(meters, f"url: '{STRIPE_URL}', format: stripe"))


# -- stripe_api and the batch each API takes --------------------------------------------------------


def test_stripe_api_v2_is_read_and_v1_is_the_default(tmp_path: Path) -> None:
    url = "https://meter-events.stripe.com/v2/billing/meter_event_stream"
    v2 = load_policy(write_policy(tmp_path, policy(COUNT, f"url: '{url}', format: stripe, stripe_api: v2")))
    assert v2.billing is not None and v2.billing.stripe_api is StripeApi.V2
    v1 = load_policy(write_policy(tmp_path, policy(COUNT, f"url: '{STRIPE_URL}', format: stripe")))
    assert v1.billing is not None and v1.billing.stripe_api is StripeApi.V1
    assert v1.billing.format is BillingFormat.STRIPE and v1.billing.namespace == DEFAULT_NAMESPACE


def test_the_v2_stream_takes_at_most_100_events_a_request(tmp_path: Path) -> None:
    text = policy(COUNT, f"url: '{STRIPE_URL}', format: stripe, stripe_api: v2, batch_size: 101")
    assert errors(tmp_path, text) == [
        "6:110: billing.batch_size: billing format 'stripe (v2)' accepts at most 100 events per batch, "
        "got 101"
    ]


def test_stripe_api_belongs_to_stripe(tmp_path: Path) -> None:
    text = policy(COUNT, "url: 'https://api.getlago.com/api/v1/events/batch', format: lago, stripe_api: v2")
    assert errors(tmp_path, text) == [
        "6:89: billing.stripe_api: stripe_api applies to format stripe, not 'lago'"
    ]


def test_an_unknown_stripe_api_is_named(tmp_path: Path) -> None:
    text = policy(COUNT, f"url: '{STRIPE_URL}', format: stripe, stripe_api: v3")
    (error,) = errors(tmp_path, text)
    assert error.startswith("6:94: billing.stripe_api: unknown stripe_api 'v3'; expected one of v1, v2")


# -- the namespace ---------------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["acme-prod", "urn:acme:billing/eu-1", "a"])
def test_a_namespace_is_a_uri_reference(tmp_path: Path, namespace: str) -> None:
    text = policy(COUNT, f"url: 'https://billing.example/usage', namespace: '{namespace}'")
    loaded = load_policy(write_policy(tmp_path, text))
    assert loaded.billing is not None and loaded.billing.namespace == namespace


@pytest.mark.parametrize("namespace", ["a|b", "-lead", "with space", "x" * 101])
def test_a_namespace_without_the_id_separator_or_spaces(tmp_path: Path, namespace: str) -> None:
    text = policy(COUNT, f"url: 'https://billing.example/usage', namespace: '{namespace}'")
    (error,) = errors(tmp_path, text)
    assert f"billing.namespace: invalid namespace '{namespace}'; use a letter or digit" in error
