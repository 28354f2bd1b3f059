"""The ``customers:`` section: each customer's plan, API key hashes (never the keys: a key in clear
is refused without being echoed), billing anchor and ids in the billing system."""

from __future__ import annotations

import re
from datetime import date
from functools import partial

from yaml.nodes import ScalarNode, SequenceNode

from sidecar.config.policy.draft import Draft, define, resolve, valid_id
from sidecar.config.policy.model import Customer
from sidecar.config.policy.nodes import (
    At,
    is_tag,
    read_fields,
    read_items,
    read_optional,
    read_pairs,
    read_required,
    read_str,
    report_expected,
)

_KEY_HASH = re.compile(r"sha256:([0-9a-f]{64})")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CUSTOMER_KEYS = ("plan", "api_keys", "billing_anchor", "stripe_customer_id", "lago_subscription_id")


def read_customers(draft: Draft, at: At) -> None:
    for customer_id, key_at, value_at in read_pairs(at) or ():
        valid_id(key_at, "customer id", customer_id)
        customer = _customer(draft, value_at, customer_id)
        define(draft.customers, "customer", customer_id, key_at, customer)


def _customer(draft: Draft, at: At, customer_id: str) -> Customer | None:
    mark = len(at.errors)
    fields = read_fields(at, _CUSTOMER_KEYS, required=("plan",))
    if fields is None:
        return None
    plan = read_required(fields, "plan", partial(read_str, what="a plan name"))
    if plan is not None:
        draft.later(resolve, draft.plans, "plan", fields["plan"], plan)
    keys: tuple[str, ...] = read_optional(fields, "api_keys", partial(_api_keys, draft, customer_id), ())
    anchor = read_optional(fields, "billing_anchor", _date, None)
    stripe_id = read_optional(fields, "stripe_customer_id", read_str, None)
    lago_id = read_optional(fields, "lago_subscription_id", read_str, None)
    if plan is None or len(at.errors) > mark:
        return None
    return Customer(
        id=customer_id,
        plan=plan,
        api_key_hashes=keys,
        billing_anchor=anchor,
        stripe_customer_id=stripe_id,
        lago_subscription_id=lago_id,
    )


def _api_keys(draft: Draft, customer_id: str, at: At) -> tuple[str, ...]:
    if not isinstance(at.node, SequenceNode):
        at.error("expected a list of sha256: key hashes (the value is not shown)")
        return ()
    hashes: list[str] = []
    for item in read_items(at):
        digest = _key_hash(item)
        if digest is None:
            continue
        owner = draft.key_owners.setdefault(digest, customer_id)
        if owner != customer_id:
            item.error(f"api key already belongs to customer '{owner}'")
        elif digest in hashes:
            item.error("api key listed twice for this customer")
        else:
            hashes.append(digest)
    return tuple(hashes)


def _key_hash(at: At) -> str | None:
    text = str(at.node.value) if is_tag(at, "str") else ""
    match = _KEY_HASH.fullmatch(text)
    if match:
        return match.group(1)
    if text.startswith("sha256:"):
        at.error(
            f"api key '{text}' is not sha256: followed by 64 lowercase hex digits; "
            "use `sidecar hash-key KEY` to compute it"
        )
    else:
        at.error(
            "api key is not a sha256: hash (the value is not shown); store the hash instead: "
            "use `sidecar hash-key KEY`"
        )
    return None


def _date(at: At) -> date | None:
    if not isinstance(at.node, ScalarNode):
        report_expected(at, "a date YYYY-MM-DD")
        return None
    text = str(at.node.value)
    if at.tag in ("str", "timestamp") and _DATE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    at.error(f"invalid date '{text}'; expected a date YYYY-MM-DD")
    return None
