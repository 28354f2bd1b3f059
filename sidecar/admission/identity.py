"""Who is calling: the API key from the configured headers, looked up by its SHA-256 digest.

Keys are never kept or compared in clear. The lookup is a probe on the digest (a cache, the
store's owner entry), so the only timing it can reveal is about a hash of the presented key,
which says nothing usable about any stored key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Protocol

from sidecar.config.policy.model import Customer, Policy


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key's UTF-8 bytes (the policy stores it as ``sha256:<hex>``)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key(headers: Mapping[str, str], header_names: tuple[str, ...]) -> str | None:
    """The first non-empty key among the configured headers; Authorization must say Bearer."""
    for name in header_names:
        value = headers.get(name)
        if value is None:
            continue
        if name.lower() == "authorization":
            scheme, _, value = value.partition(" ")
            if scheme.lower() != "bearer":
                continue
        value = value.strip()
        if value:
            return value
    return None


class CustomerLookup(Protocol):
    """Finds a customer by key hash among the policy's and the stored customers (the directory,
    admission/customers.py: a cache hit answers without I/O, a miss asks the store)."""

    async def by_key_hash(self, key_hash: str, policy: Policy) -> Customer | None: ...


async def identify(headers: Mapping[str, str], policy: Policy, customers: CustomerLookup) -> Customer | None:
    """The customer the request's API key identifies; None without a key or for an unknown one.
    Raises StoreUnavailable when the store had to be asked and did not answer."""
    key = presented_key(headers, policy.identity.api_key_headers)
    return None if key is None else await customers.by_key_hash(hash_key(key), policy)
