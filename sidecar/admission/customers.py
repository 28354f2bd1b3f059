"""Customers from the policy files, overlaid with customers stored in Redis by the admin API.

`PUT /admin/customers/{id}` writes one hash entry and bumps a version counter in one script.
Every replica reads the version once a second (one GET, off the hot path) and, when it moved,
reads the whole hash and swaps in a new immutable snapshot; so a stored customer is served by
every replica within about a second, and a request never waits on Redis to find its customer.
A stored entry overrides a file entry with the same id.

The directory reaches the stored customers only through the store port (CustomerStore: put,
version, read); how they are kept in Redis is store/redis/customers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from types import MappingProxyType

from sidecar.config.policy.model import Customer, Policy
from sidecar.errors import StoreUnavailable
from sidecar.store.port import CustomerStore

log = logging.getLogger("sidecar.admission.customers")

REFRESH_SECONDS = 1.0
CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_KEY_HASH = re.compile(r"sha256:([0-9a-f]{64})")
_FIELDS = ("plan", "api_keys", "billing_anchor", "stripe_customer_id", "lago_subscription_id")


@dataclass(frozen=True, slots=True)
class Stored:
    """One snapshot of the stored customers and their key-hash index."""

    version: int = 0
    customers: Mapping[str, Customer] = field(default_factory=lambda: MappingProxyType({}))
    by_key_hash: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


class CustomerDirectory:
    def __init__(self, store: CustomerStore) -> None:
        self.store = store
        self.stored = Stored()

    def all(self, policy: Policy) -> Mapping[str, Customer]:
        """Every customer by id; a stored one wins over the policy's."""
        return ChainMap(dict(self.stored.customers), dict(policy.customers))

    def by_key_hash(self, key_hash: str, policy: Policy) -> Customer | None:
        stored = self.stored
        customer_id = stored.by_key_hash.get(key_hash)
        if customer_id is not None:
            return stored.customers[customer_id]
        customer_id = policy.customer_by_key_hash.get(key_hash)
        if customer_id is None or customer_id in stored.customers:
            return None  # the stored entry replaced that customer, keys included
        return policy.customers[customer_id]

    async def put(self, customer: Customer) -> None:
        """Store one customer and bump the version, atomically; then serve it here at once."""
        await self.store.put(customer)
        await self.refresh()

    async def refresh(self) -> None:
        """Reload the snapshot when the stored version moved."""
        version = await self.store.version()
        if version == self.stored.version:
            return
        customers = dict(await self.store.read())
        index = {h: c.id for c in customers.values() for h in c.api_key_hashes}
        self.stored = Stored(version, MappingProxyType(customers), MappingProxyType(index))

    async def watch(self) -> None:
        """Refresh once a second for the life of the process; an outage only delays it."""
        while True:
            with contextlib.suppress(StoreUnavailable):
                await self.refresh()
            await asyncio.sleep(REFRESH_SECONDS)


def parse_customer(
    customer_id: str, body: object, policy: Policy, directory: CustomerDirectory
) -> Customer | list[str]:
    """A validated customer from a PUT body, or every problem with it (key values never echoed)."""
    problems: list[str] = []
    if not CUSTOMER_ID.fullmatch(customer_id):
        problems.append(f"invalid customer id '{customer_id}'; use letters, digits and . _ : @ -")
    if not isinstance(body, dict):
        return [*problems, "expected a JSON object"]
    problems += [f"unknown field '{name}'" for name in body if name not in _FIELDS]
    plan = body.get("plan")
    if not isinstance(plan, str) or plan not in policy.plans:
        problems.append(f"plan must be one of {', '.join(sorted(policy.plans))}")
    hashes = _key_hashes(body.get("api_keys", []), problems)
    anchor = _anchor(body.get("billing_anchor"), problems)
    ids = {name: body.get(name) for name in ("stripe_customer_id", "lago_subscription_id")}
    problems += [
        f"{name} must be a non-empty string"
        for name, v in ids.items()
        if v is not None and not (isinstance(v, str) and v)
    ]
    problems += _billing_id_problems(policy, ids)
    problems += _key_conflicts(customer_id, hashes, policy, directory)
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


def _key_hashes(value: object, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list):
        problems.append("api_keys must be a list of sha256:<hex> hashes (the value is not shown)")
        return ()
    hashes = []
    for index, key in enumerate(value):
        match = _KEY_HASH.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            problems.append(
                f"api_keys[{index}] is not a sha256: hash (the value is not shown); use `sidecar hash-key`"
            )
        else:
            hashes.append(match.group(1))
    return tuple(hashes)


def _anchor(value: object, problems: list[str]) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        problems.append(f"billing_anchor '{value}' is not a date YYYY-MM-DD")
        return None


def _billing_id_problems(policy: Policy, ids: Mapping[str, object]) -> list[str]:
    name = policy.billing.format.customer_field if policy.billing else None
    return (
        [f"billing format '{policy.billing.format.value}' needs {name}"]
        if name and policy.billing and not ids[name]
        else []
    )


def _key_conflicts(
    customer_id: str, hashes: tuple[str, ...], policy: Policy, directory: CustomerDirectory
) -> list[str]:
    conflicts = []
    for index, key_hash in enumerate(hashes):
        owner = directory.by_key_hash(key_hash, policy)
        if owner is not None and owner.id != customer_id:
            conflicts.append(f"api_keys[{index}] already belongs to customer '{owner.id}'")
    return conflicts
