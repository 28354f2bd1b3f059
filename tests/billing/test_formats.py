"""The billing encoders (SPEC §6), decoded back and read with each system's documented field names.

Field names follow: Stripe "Create a billing meter event" (POST /v1/billing/meter_events), Lago
"Batch usage events" (POST /api/v1/events/batch) and OpenMeter's CloudEvents usage events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jsonschema  # type: ignore[import-untyped]
import pytest

from sidecar.billing.formats import (
    FORMATS,
    STRIPE_APIS,
    Delivery,
    Format,
    Limits,
    PushRequest,
    UnknownCustomer,
    encode,
    format_for,
    idempotency_key,
)
from sidecar.config.policy.model import Billing, BillingFormat, Customer, StripeApi
from sidecar.store.summaries import Summary, summary_id

JSON, STRIPE, LAGO, OPENMETER = (
    BillingFormat.JSON,
    BillingFormat.STRIPE,
    BillingFormat.LAGO,
    BillingFormat.OPENMETER,
)
URLS = {
    JSON: "https://billing.example/usage",
    STRIPE: "https://api.stripe.com/v1/billing/meter_events",
    LAGO: "https://api.getlago.com/api/v1/events/batch",
    OPENMETER: "https://openmeter.cloud/api/v1/events",
}
T0 = int(datetime(2026, 3, 15, 10, 0, tzinfo=UTC).timestamp())
CUSTOMERS = {
    "acme": Customer(id="acme", plan="pro", stripe_customer_id="cus_ACME", lago_subscription_id="sub_acme"),
    "globex": Customer(
        id="globex", plan="free", stripe_customer_id="cus_GLOBEX", lago_subscription_id="sub_gx"
    ),
}


def case(name: str, *values: object) -> object:
    return pytest.param(*values, id=name)


def make(
    customer: str = "acme",
    meter: str = "requests",
    feature: str = "search",
    value: int = 42,
    start: int = T0,
    plan: str = "pro",
) -> Summary:
    return Summary(
        id=summary_id(customer, meter, feature, start, 1),
        customer=customer,
        plan=plan,
        meter=meter,
        aggregation="count",
        feature=feature,
        value=value,
        window_start=start,
        window_end=start + 60,
    )


ONE = make()
BATCH = [make(), make(customer="globex", plan="free", value=7), make(meter="tokens", value=1500)]


def push(fmt: BillingFormat, summaries: list[Summary], token: str | None = None) -> list[PushRequest]:
    return encode(Billing(url=URLS[fmt], format=fmt), summaries, CUSTOMERS, token=token)


def only(fmt: BillingFormat, summaries: list[Summary] | None = None) -> PushRequest:
    (request,) = push(fmt, summaries or [ONE])
    return request


def decoded(fmt: BillingFormat, body: bytes) -> Any:
    if fmt is STRIPE:
        return dict(parse_qsl(body.decode("ascii"), strict_parsing=True))
    return json.loads(body)


# -- payloads, field by field ------------------------------------------------------------------

JSON_FIELDS = [
    case("id", "id", ONE.id),
    case("customer", "customer", "acme"),
    case("plan", "plan", "pro"),
    case("meter", "meter", "requests"),
    case("aggregation", "aggregation", "count"),
    case("feature", "feature", "search"),
    case("value", "value", 42),
    case("window_start", "window_start", "2026-03-15T10:00:00Z"),
    case("window_end", "window_end", "2026-03-15T10:01:00Z"),
]


@pytest.mark.parametrize("field, expected", JSON_FIELDS)
def test_json_summary_field(field: str, expected: object) -> None:
    (summary,) = decoded(JSON, only(JSON).body)["summaries"]
    assert summary[field] == expected


def test_json_summary_has_exactly_the_spec_fields() -> None:
    document = decoded(JSON, only(JSON).body)
    assert list(document) == ["summaries"]
    assert set(document["summaries"][0]) == {"id", "customer", "plan", "meter", "aggregation",
                                             "feature", "value", "window_start", "window_end"}  # fmt: skip


STRIPE_FIELDS = [
    case("event_name", "event_name", "requests"),
    case("customer", "payload[stripe_customer_id]", "cus_ACME"),
    case("value-is-a-string", "payload[value]", "42"),
    case("identifier", "identifier", ONE.id),
    case("timestamp-unix-seconds", "timestamp", str(T0)),
]


@pytest.mark.parametrize("field, expected", STRIPE_FIELDS)
def test_stripe_meter_event_field(field: str, expected: str) -> None:
    assert decoded(STRIPE, only(STRIPE).body)[field] == expected


def test_stripe_meter_event_has_exactly_the_documented_fields() -> None:
    assert set(decoded(STRIPE, only(STRIPE).body)) == {
        "event_name", "payload[stripe_customer_id]", "payload[value]", "identifier", "timestamp",
    }  # fmt: skip


LAGO_FIELDS = [
    case("transaction_id", ("transaction_id",), ONE.id),
    case("external_subscription_id", ("external_subscription_id",), "sub_acme"),
    case("code", ("code",), "requests"),
    case("timestamp-unix-seconds", ("timestamp",), T0),
    case("value", ("properties", "value"), 42),
    case("feature", ("properties", "feature"), "search"),
    case("window_end", ("properties", "window_end"), "2026-03-15T10:01:00Z"),
]


@pytest.mark.parametrize("path, expected", LAGO_FIELDS)
def test_lago_event_field(path: tuple[str, ...], expected: object) -> None:
    (event,) = decoded(LAGO, only(LAGO).body)["events"]
    for key in path:
        event = event[key]
    assert event == expected


def test_lago_event_has_exactly_the_documented_fields() -> None:
    document = decoded(LAGO, only(LAGO).body)
    assert list(document) == ["events"]
    assert set(document["events"][0]) == {
        "transaction_id", "external_subscription_id", "code", "timestamp", "properties",
    }  # fmt: skip
    assert set(document["events"][0]["properties"]) == {"value", "feature", "window_end"}


OPENMETER_FIELDS = [
    case("specversion", ("specversion",), "1.0"),
    case("id", ("id",), ONE.id),
    case("source", ("source",), "quota-sidecar"),
    case("type", ("type",), "requests"),
    case("subject", ("subject",), "acme"),
    case("time-rfc3339", ("time",), "2026-03-15T10:00:00Z"),
    case("value", ("data", "value"), 42),
    case("feature", ("data", "feature"), "search"),
    case("plan", ("data", "plan"), "pro"),
    case("window_end", ("data", "window_end"), "2026-03-15T10:01:00Z"),
]


@pytest.mark.parametrize("path, expected", OPENMETER_FIELDS)
def test_openmeter_cloudevent_field(path: tuple[str, ...], expected: object) -> None:
    (event,) = decoded(OPENMETER, only(OPENMETER).body)
    for key in path:
        event = event[key]
    assert event == expected


def test_openmeter_cloudevent_has_exactly_these_attributes() -> None:
    (event,) = decoded(OPENMETER, only(OPENMETER).body)
    assert set(event) == {"specversion", "id", "source", "type", "subject", "time", "data"}


# -- requests and headers ----------------------------------------------------------------------

CONTENT_TYPES = [
    case("json", JSON, "application/json"),
    case("stripe", STRIPE, "application/x-www-form-urlencoded"),
    case("lago", LAGO, "application/json"),
    case("openmeter", OPENMETER, "application/cloudevents-batch+json"),
]
ALL_FORMATS = [case(fmt.value, fmt) for fmt in BillingFormat]


@pytest.mark.parametrize("fmt, content_type", CONTENT_TYPES)
def test_headers_without_token(fmt: BillingFormat, content_type: str) -> None:
    request = only(fmt)
    assert dict(request.headers) == {"Content-Type": content_type, "Idempotency-Key": ONE.id}


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_token_becomes_a_bearer_authorization(fmt: BillingFormat) -> None:
    for request in push(fmt, BATCH, token="sk_test_123"):
        assert request.headers["Authorization"] == "Bearer sk_test_123"


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_posts_to_the_configured_url(fmt: BillingFormat) -> None:
    assert {request.url for request in push(fmt, BATCH)} == {URLS[fmt]}


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_headers_cannot_be_changed_after_encoding(fmt: BillingFormat) -> None:
    with pytest.raises(TypeError):
        only(fmt).headers["Idempotency-Key"] = "x"  # type: ignore[index]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_empty_batch_needs_no_request(fmt: BillingFormat) -> None:
    assert push(fmt, []) == []


BATCH_FORMATS = [case(fmt.value, fmt) for fmt in (JSON, LAGO, OPENMETER)]
ID_FIELD = {JSON: "id", LAGO: "transaction_id", OPENMETER: "id"}
ITEMS_KEY = {JSON: "summaries", LAGO: "events"}


def batch_items(fmt: BillingFormat, body: bytes) -> list[dict[str, Any]]:
    document = decoded(fmt, body)
    items: list[dict[str, Any]] = document if fmt is OPENMETER else document[ITEMS_KEY[fmt]]
    return items


@pytest.mark.parametrize("fmt", BATCH_FORMATS)
def test_batch_formats_send_one_request_in_id_order(fmt: BillingFormat) -> None:
    (request,) = push(fmt, BATCH)
    ids = sorted(summary.id for summary in BATCH)
    assert request.summary_ids == tuple(ids)
    assert [item[ID_FIELD[fmt]] for item in batch_items(fmt, request.body)] == ids


def test_stripe_sends_one_request_per_summary() -> None:
    requests = push(STRIPE, BATCH)
    assert len(requests) == len(BATCH)
    for request in requests:
        (summary_id_,) = request.summary_ids
        assert request.headers["Idempotency-Key"] == summary_id_
        assert decoded(STRIPE, request.body)["identifier"] == summary_id_
    by_id = {summary.id: summary for summary in BATCH}
    assert {decoded(STRIPE, r.body)["payload[stripe_customer_id]"] for r in requests} == {
        CUSTOMERS[by_id[r.summary_ids[0]].customer].stripe_customer_id for r in requests
    }


def test_lago_maps_each_customer_to_its_subscription() -> None:
    events = batch_items(LAGO, only(LAGO, BATCH).body)
    by_id = {summary.id: summary for summary in BATCH}
    for event in events:
        customer = CUSTOMERS[by_id[event["transaction_id"]].customer]
        assert event["external_subscription_id"] == customer.lago_subscription_id


@pytest.mark.parametrize("fmt", [case(f.value, f) for f in (JSON, LAGO, OPENMETER)])
def test_json_bodies_are_compact_utf8(fmt: BillingFormat) -> None:
    body = only(fmt, [make(feature="recherche-élargie")]).body
    assert "recherche-élargie".encode() in body
    assert b": " not in body and b", " not in body


# -- idempotency keys --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", BATCH_FORMATS)
def test_same_batch_in_any_order_gets_the_same_key_and_body(fmt: BillingFormat) -> None:
    first = only(fmt, BATCH)
    for seed in range(5):
        shuffled = BATCH.copy()
        random.Random(seed).shuffle(shuffled)
        again = only(fmt, shuffled)
        assert again.headers["Idempotency-Key"] == first.headers["Idempotency-Key"]
        assert again.body == first.body


@pytest.mark.parametrize("fmt", BATCH_FORMATS)
def test_different_batch_gets_a_different_key(fmt: BillingFormat) -> None:
    keys = {
        only(fmt, BATCH).headers["Idempotency-Key"],
        only(fmt, BATCH[:2]).headers["Idempotency-Key"],
        only(fmt, [*BATCH, make(value=1, start=T0 + 60)]).headers["Idempotency-Key"],
    }
    assert len(keys) == 3


def test_batch_key_is_sha256_hex_of_the_sorted_ids() -> None:
    key = idempotency_key(summary.id for summary in BATCH)
    assert len(key) == 64 and int(key, 16) >= 0
    assert key not in {summary.id for summary in BATCH}


def test_single_summary_key_is_its_id() -> None:
    assert idempotency_key([ONE.id]) == ONE.id


# -- customers the policy no longer knows ------------------------------------------------------

NEEDS_EXTERNAL_ID = [case("stripe", STRIPE), case("lago", LAGO)]


@pytest.mark.parametrize("fmt", NEEDS_EXTERNAL_ID)
def test_unknown_customer_is_a_value_error_naming_it(fmt: BillingFormat) -> None:
    gone = make(customer="initech", plan="pro")
    with pytest.raises(UnknownCustomer) as raised:
        push(fmt, [*BATCH, gone])
    assert isinstance(raised.value, ValueError)
    assert "initech" in str(raised.value)
    assert raised.value.customers == ("initech",)
    assert raised.value.summary_ids == (gone.id,)


@pytest.mark.parametrize("fmt", NEEDS_EXTERNAL_ID)
def test_customer_without_external_id_is_refused_too(fmt: BillingFormat) -> None:
    bare = {"acme": Customer(id="acme", plan="pro")}
    with pytest.raises(UnknownCustomer, match="acme"):
        encode(Billing(url=URLS[fmt], format=fmt), [ONE], bare)


@pytest.mark.parametrize("fmt", [case("json", JSON), case("openmeter", OPENMETER)])
def test_formats_keyed_by_our_own_customer_id_need_no_policy_entry(fmt: BillingFormat) -> None:
    (request,) = encode(Billing(url=URLS[fmt], format=fmt), [ONE], {})
    assert request.summary_ids == (ONE.id,)


# -- classify ----------------------------------------------------------------------------------


def lago_answer(details: object, code: str = "validation_errors") -> bytes:
    return json.dumps(
        {"status": 422, "error": "Unprocessable Entity", "code": code, "error_details": details}
    ).encode()


DUPLICATE = {"transaction_id": ["value_already_exist"]}
LAGO_ALL_DUPLICATES = lago_answer({"0": DUPLICATE, "1": DUPLICATE})
LAGO_MIXED = lago_answer({"0": DUPLICATE, "1": {"code": ["value_is_mandatory"]}})
LAGO_OTHER = lago_answer({"0": {"timestamp": ["invalid_format"]}})
STRIPE_DUPLICATE = json.dumps(
    {
        "error": {
            "type": "invalid_request_error",
            "message": f"An event already exists with identifier {ONE.id}.",
        }
    }
).encode()

D, R, X = Delivery.DELIVERED, Delivery.RETRY, Delivery.REJECTED
BY_STATUS = [(200, D), (201, D), (202, D), (204, D), (400, X), (401, X), (403, X), (404, X), (408, R),
             (413, X), (422, X), (425, R), (429, R), (500, R), (502, R), (503, R), (504, R)]  # fmt: skip
CLASSIFY = [
    *(case(f"{f.value}-{status}", f, status, b"", want) for f in BillingFormat for status, want in BY_STATUS),
    case("json-409", JSON, 409, b"", X),
    case("lago-409", LAGO, 409, b"", X),
    case("openmeter-409", OPENMETER, 409, b"", X),
    case("stripe-409-concurrent-idempotency-key", STRIPE, 409, b"", R),
    case("lago-422-all-duplicates", LAGO, 422, LAGO_ALL_DUPLICATES, D),
    case("lago-422-duplicates-and-another-error", LAGO, 422, LAGO_MIXED, X),
    case("lago-422-other-validation-error", LAGO, 422, LAGO_OTHER, X),
    case("lago-422-not-json", LAGO, 422, b"<html>oops</html>", X),
    case("lago-400-with-duplicate-body", LAGO, 400, LAGO_ALL_DUPLICATES, X),
    case("json-422-with-lago-duplicate-body", JSON, 422, LAGO_ALL_DUPLICATES, X),
    case("stripe-400-identifier-reused-undocumented", STRIPE, 400, STRIPE_DUPLICATE, X),
    case("redirect-is-a-misconfigured-url", JSON, 301, b"", X),
]  # fmt: skip


@pytest.mark.parametrize("fmt, status, body, expected", CLASSIFY)
def test_classify(fmt: BillingFormat, status: int, body: bytes, expected: Delivery) -> None:
    assert FORMATS[fmt].classify(status, body) is expected


@pytest.mark.parametrize(
    "sent, expected",
    [
        case("every-event-a-duplicate", 2, D),
        case("a-third-event-was-not-stored", 3, X),
        case("answer-names-more-than-sent", 1, X),
    ],
)
def test_lago_duplicates_must_cover_the_whole_batch_when_its_size_is_known(
    sent: int, expected: Delivery
) -> None:
    assert FORMATS[LAGO].classify(422, LAGO_ALL_DUPLICATES, sent=sent) is expected


@pytest.mark.parametrize(
    "body, expected",
    [
        case("all-duplicates", LAGO_ALL_DUPLICATES, {0, 1}),
        case("repeated-code", lago_answer({"3": {"transaction_id": ["value_already_exist"] * 2}}), {3}),
        case("mixed", LAGO_MIXED, set()),
        case("other-field", lago_answer({"0": {"transaction_id": ["value_is_mandatory"]}}), set()),
        case("two-fields", lago_answer({"0": {**DUPLICATE, "code": ["value_already_exist"]}}), set()),
        case("empty-codes", lago_answer({"0": {"transaction_id": []}}), set()),
        case("single-event-shape", lago_answer(DUPLICATE), set()),
        case("no-details", lago_answer({}), set()),
        case("other-code", lago_answer({"0": DUPLICATE}, code="bad_request"), set()),
        case("json-array", b"[]", set()),
        case("not-utf8", b"\xff\xfe", set()),
        case("empty", b"", set()),
    ],
)  # fmt: skip
def test_lago_duplicates(body: bytes, expected: set[int]) -> None:
    assert FORMATS[LAGO].already_stored(body) == expected


@pytest.mark.parametrize("fmt", [case(f.value, f) for f in (JSON, STRIPE, OPENMETER)])
def test_only_lago_splits_a_refusal(fmt: BillingFormat) -> None:
    assert FORMATS[fmt].already_stored(LAGO_ALL_DUPLICATES) == frozenset()


# -- the registry ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_format_is_registered_under_its_own_name(fmt: BillingFormat) -> None:
    assert FORMATS[fmt].kind is fmt


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_a_format_reads_its_traits_from_the_policy_enum(fmt: BillingFormat) -> None:
    assert (FORMATS[fmt].customer_field, FORMATS[fmt].max_batch) == (fmt.customer_field, fmt.max_batch)


def test_the_traits_the_loader_checks() -> None:
    traits = {fmt.value: (FORMATS[fmt].customer_field, FORMATS[fmt].max_batch) for fmt in BillingFormat}
    assert traits == {
        "json": (None, None),
        "stripe": ("stripe_customer_id", None),
        "lago": ("lago_subscription_id", 100),
        "openmeter": (None, None),
    }


# -- Stripe's v2 meter event stream (billing.stripe_api: v2) -------------------------------------

SCHEMAS = Path(__file__).parent.parent / "fixtures" / "schemas" / "stripe"
STREAM_URL = "https://meter-events.stripe.com/v2/billing/meter_event_stream"
V2 = Billing(url=STREAM_URL, format=STRIPE, stripe_api=StripeApi.V2)


def stream_schema() -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / "meter_event_stream.request.json").read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_v2_is_chosen_by_stripe_api_and_v1_stays_the_default() -> None:
    assert format_for(V2) is STRIPE_APIS[StripeApi.V2]
    assert format_for(Billing(url=URLS[STRIPE], format=STRIPE)) is FORMATS[STRIPE]
    assert format_for(Billing(url=URLS[LAGO], format=LAGO)) is FORMATS[LAGO]


def test_v2_batches_up_to_100_events_that_match_stripes_published_schema() -> None:
    summaries = [make(customer=("acme", "globex")[n % 2], value=n, start=T0 + 60 * n) for n in range(100)]
    (request,) = encode(V2, summaries, CUSTOMERS, token="ek_session_token")
    document = json.loads(request.body)
    stream_schema().validate(document)
    assert len(document["events"]) == 100 == format_for(V2).max_batch
    assert [event["identifier"] for event in document["events"]] == sorted(s.id for s in summaries)


def test_v2_event_fields() -> None:
    (request,) = encode(V2, [ONE], CUSTOMERS, token="ek_session_token")
    (event,) = json.loads(request.body)["events"]
    assert event == {
        "event_name": "requests",
        "identifier": ONE.id,
        "timestamp": "2026-03-15T10:00:00Z",
        "payload": {"stripe_customer_id": "cus_ACME", "value": "42"},
    }
    assert datetime.fromisoformat(event["timestamp"]).timestamp() == T0


def test_v2_requests_carry_the_session_token_and_the_api_version() -> None:
    (request,) = encode(V2, BATCH, CUSTOMERS, token="ek_session_token")
    assert request.url == STREAM_URL
    assert request.headers["Authorization"] == "Bearer ek_session_token"
    assert request.headers["Stripe-Version"] == "2024-09-30.acacia"
    assert request.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "url, session",
    [
        case("stripe", STREAM_URL, "https://api.stripe.com/v2/billing/meter_event_session"),
        case(
            "loopback",
            "http://127.0.0.1:8099/v2/billing/meter_event_stream",
            "http://127.0.0.1:8099/v2/billing/meter_event_session",
        ),
    ],
)
def test_v2_sessions_come_from_the_api_host(url: str, session: str) -> None:
    assert format_for(V2).session_url(url) == session


def test_only_v2_needs_a_session() -> None:
    assert all(fmt.session_url(URLS[kind]) is None for kind, fmt in FORMATS.items())


def test_v2_retries_an_expired_session() -> None:
    assert format_for(V2).classify(401, b'{"error": {"code": "billing_meter_event_session_expired"}}') is R
    assert format_for(V2).classify(200, b"{}") is D
    assert format_for(V2).classify(400, b"{}") is X


# -- what each system takes: batch sizes, rates, lanes -------------------------------------------

LIMITS = [
    case("json", FORMATS[JSON], None, Limits()),
    case("lago", FORMATS[LAGO], None, Limits(requests_per_second=500)),
    case("openmeter", FORMATS[OPENMETER], None, Limits()),
    case("stripe-live", FORMATS[STRIPE], "sk_live_x", Limits(in_flight=128, requests_per_second=1000)),
    case("stripe-test", FORMATS[STRIPE], "sk_test_x", Limits(in_flight=128, requests_per_second=25)),
    case(
        "stripe-restricted-test", FORMATS[STRIPE], "rk_test_x", Limits(in_flight=128, requests_per_second=25)
    ),
    case("stripe-v2-live", STRIPE_APIS[StripeApi.V2], "sk_live_x", Limits(events_per_second=10_000)),
    case("stripe-v2-test", STRIPE_APIS[StripeApi.V2], "sk_test_x", Limits(requests_per_second=25)),
]


@pytest.mark.parametrize("fmt, token, expected", LIMITS)
def test_each_system_is_paced_at_its_documented_limit(
    fmt: Format, token: str | None, expected: Limits
) -> None:
    assert fmt.limits(token) == expected


def test_stripe_v1_lanes_are_a_stripe_customer_and_meter() -> None:
    shared = dict(CUSTOMERS, globex=Customer(id="globex", plan="free", stripe_customer_id="cus_ACME"))
    requests = encode(Billing(url=URLS[STRIPE], format=STRIPE), BATCH, shared)
    by_id = {summary.id: summary for summary in BATCH}
    assert {r.lane for r in requests} == {"cus_ACME|requests", "cus_ACME|tokens"}
    for request in requests:
        assert request.lane == f"cus_ACME|{by_id[request.summary_ids[0]].meter}"


@pytest.mark.parametrize("fmt", BATCH_FORMATS)
def test_batch_formats_have_no_lanes(fmt: BillingFormat) -> None:
    assert only(fmt, BATCH).lane is None


# -- billing.namespace ---------------------------------------------------------------------------


def test_the_cloudevents_source_is_the_summarys_namespace() -> None:
    summary = dataclasses.replace(ONE, namespace="acme-prod")
    (event,) = decoded(OPENMETER, only(OPENMETER, [summary]).body)
    assert event["source"] == "acme-prod"


def test_the_default_namespace_keeps_the_ids_of_before() -> None:
    before = hashlib.sha1(f"acme|requests|search|{T0}|1".encode()).hexdigest()
    assert summary_id("acme", "requests", "search", T0, 1) == before
    assert summary_id("acme", "requests", "search", T0, 1, namespace="quota-sidecar") == before
    other = summary_id("acme", "requests", "search", T0, 1, namespace="acme-prod")
    assert other == hashlib.sha1(f"acme-prod|acme|requests|search|{T0}|1".encode()).hexdigest()
