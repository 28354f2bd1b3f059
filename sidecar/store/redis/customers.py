"""The CustomerStore of store/port.py over Redis: one hash of JSON documents and a version counter.

``put`` writes the customer's document and bumps the version in one script (put_customer.lua), so
a replica that reads the new version finds the customer in the hash. Every call waits up to
BACKGROUND_TIMEOUT, not the store timeout: the refresh is off the request path, and an admin
PUT may wait for a busy store rather than fail (calls.py). The document keeps key hashes only,
as ``sha256:<hex>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date
from typing import Any, cast

from sidecar.config.policy.model import Customer
from sidecar.store.redis import keys
from sidecar.store.redis.calls import BACKGROUND_TIMEOUT, bounded, load_script
from sidecar.store.redis.topology import StoreClient


class RedisCustomers:
    def __init__(self, client: StoreClient, *, timeout: float = BACKGROUND_TIMEOUT) -> None:
        self.client = client
        self._timeout = timeout
        self._put = client.register_script(load_script("put_customer", shared=False))

    async def put(self, customer: Customer) -> None:
        document = json.dumps(_document(customer))
        operation = self._put(keys=[keys.CUSTOMERS, keys.CUSTOMERS_VERSION], args=[customer.id, document])
        await bounded(operation, self._timeout)

    async def version(self) -> int:
        return int(await bounded(self.client.get(keys.CUSTOMERS_VERSION), self._timeout) or 0)

    async def read(self) -> Mapping[str, Customer]:
        entries = cast(dict[bytes, bytes], await bounded(self.client.hgetall(keys.CUSTOMERS), self._timeout))
        return {k.decode(): _customer(k.decode(), json.loads(v)) for k, v in entries.items()}


def _document(customer: Customer) -> dict[str, Any]:
    return {
        "plan": customer.plan,
        "api_keys": [f"sha256:{h}" for h in customer.api_key_hashes],
        "billing_anchor": customer.billing_anchor.isoformat() if customer.billing_anchor else None,
        "stripe_customer_id": customer.stripe_customer_id,
        "lago_subscription_id": customer.lago_subscription_id,
    }


def _customer(customer_id: str, document: Mapping[str, Any]) -> Customer:
    anchor = document.get("billing_anchor")
    return Customer(
        id=customer_id,
        plan=document["plan"],
        api_key_hashes=tuple(key.removeprefix("sha256:") for key in document.get("api_keys", ())),
        billing_anchor=date.fromisoformat(anchor) if anchor else None,
        stripe_customer_id=document.get("stripe_customer_id"),
        lago_subscription_id=document.get("lago_subscription_id"),
    )
