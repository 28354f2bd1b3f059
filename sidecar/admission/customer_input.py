"""What the admin API accepts as a customer: a document checked field by field, every problem
named, key values never echoed (a client that sent a key instead of its hash must not see it
again in a log or an answer).

Pure functions on plain values: PUT, key adds and the NDJSON import share them, and the import
runs them in a thread (customer_import.py), away from the event loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import date

from sidecar.config.policy.model import Customer, Policy

CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
KEY_HASH = re.compile(r"sha256:([0-9a-f]{64})")
FIELDS = ("plan", "api_keys", "billing_anchor", "stripe_customer_id", "lago_subscription_id")
_BILLING_IDS = ("stripe_customer_id", "lago_subscription_id")
_LINE_FIELDS = ("id", *FIELDS)
_JSON = json.JSONDecoder()


def parse_customer(
    customer_id: str, body: object, policy: Policy, *, fields: tuple[str, ...] = FIELDS
) -> Customer | list[str]:
    """A validated customer from a PUT body, or every problem with it. Whether its keys belong to
    someone else is the directory's to say (customers.py)."""
    problems = id_problems(customer_id)
    if not isinstance(body, dict):
        return [*problems, "expected a JSON object"]
    if not body.keys() <= set(fields):
        problems += [f"unknown field '{str(name)[:64]}'" for name in body if name not in fields]
    plan = body.get("plan")
    if not isinstance(plan, str) or plan not in policy.plans:
        problems.append(f"plan must be one of {', '.join(sorted(policy.plans))}")
    hashes = _key_hashes(body.get("api_keys", []), problems)
    anchor = _anchor(body.get("billing_anchor"), problems)
    ids = {name: body.get(name) for name in _BILLING_IDS}
    problems += _billing_id_problems(policy, ids)
    if problems:
        return problems
    return Customer(
        id=customer_id,
        plan=str(plan),
        api_key_hashes=hashes,
        billing_anchor=anchor,
        stripe_customer_id=ids["stripe_customer_id"],
        lago_subscription_id=ids["lago_subscription_id"],
    )


def parse_line(line: bytes, policy: Policy) -> Customer | list[str]:
    """One NDJSON import line: a customer document with its ``id``."""
    try:
        body = _JSON.decode(line.decode())  # str: json.loads would first guess the bytes' encoding
    except json.JSONDecodeError as error:
        return [f"not JSON: {error.msg} at column {error.colno}"]
    except ValueError:
        return ["not JSON: not UTF-8"]
    if not isinstance(body, dict):
        return ["expected a JSON object"]
    customer_id = body.get("id")
    if not isinstance(customer_id, str):
        return ["id must be a customer id string"]
    return parse_customer(customer_id, body, policy, fields=_LINE_FIELDS)


def id_problems(customer_id: str) -> list[str]:
    if CUSTOMER_ID.fullmatch(customer_id):
        return []
    return [f"invalid customer id '{customer_id[:140]}'; use letters, digits and . _ : @ -"]


def parse_key_hash(value: object, field: str = "api_key") -> str | list[str]:
    """The hex digest of a ``sha256:<hex>`` key hash, or the problem (the value is not shown)."""
    match = KEY_HASH.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return [f"{field} is not a sha256: hash (the value is not shown); use `sidecar hash-key`"]
    return match.group(1)


def key_conflict(index: int, owner: str) -> str:
    return f"api_keys[{index}] already belongs to customer '{owner}'"


def _key_hashes(value: object, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list):
        problems.append("api_keys must be a list of sha256:<hex> hashes (the value is not shown)")
        return ()
    hashes: list[str] = []
    for index, key in enumerate(value):
        parsed = parse_key_hash(key, f"api_keys[{index}]")
        if isinstance(parsed, list):
            problems += parsed
        elif parsed in hashes:
            problems.append(f"api_keys[{index}] is listed twice")
        else:
            hashes.append(parsed)
    return tuple(hashes)


def _anchor(value: object, problems: list[str]) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        problems.append(f"billing_anchor '{str(value)[:40]}' is not a date YYYY-MM-DD")
        return None


def _billing_id_problems(policy: Policy, ids: Mapping[str, object]) -> list[str]:
    problems = [
        f"{name} must be a non-empty string"
        for name, v in ids.items()
        if v is not None and not (isinstance(v, str) and v)
    ]
    name = policy.billing.format.customer_field if policy.billing else None
    if name and policy.billing and not ids[name]:
        problems.append(f"billing format '{policy.billing.format.value}' needs {name}")
    return problems
