"""How a stored customer looks in Redis: a hash per customer and an owner entry per API key.

The document (keys.customer) holds short fields, so Redis keeps it as a compact listpack: ``p``
the plan, ``a`` the billing anchor, ``s``/``l`` the Stripe and Lago ids, ``d`` when it was
deleted (a tombstone kept for billing), and one field per API key: its 64-hex-digit SHA-256
digest, valued with the token of the write that claimed it. An owner entry (keys.key_owner)
holds "<customer> <token> <claimed at ms>". Key material is never stored, only digests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from sidecar.config.policy.model import Customer

KEY_HASH_LENGTH = 64
_SCALARS = (("a", "billing_anchor"), ("s", "stripe_customer_id"), ("l", "lago_subscription_id"))


@dataclass(frozen=True, slots=True)
class Document:
    """A stored customer as read: the customer, each key's claim token, and whether deleted."""

    customer: Customer
    tokens: dict[str, str]
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    """An owner entry: the customer a key belongs to, the claiming write's token, and when (ms)."""

    owner: str
    token: str
    at_ms: int

    @classmethod
    def parse(cls, entry: str) -> Claim:
        owner, token, at_ms = entry.split(" ")
        return cls(owner, token, int(at_ms))


def scalars(customer: Customer) -> list[str]:
    """The document's fields but the keys, as flat field/value pairs (customer_put.lua adds one
    field per key, valued with the claims' token)."""
    flat = ["p", customer.plan]
    for name, attribute in _SCALARS:
        value = getattr(customer, attribute)
        if value is not None:
            flat += [name, value.isoformat() if isinstance(value, date) else str(value)]
    return flat


def document(customer_id: str, flat: Sequence[Any]) -> Document | None:
    """The document from HGETALL's field/value list (bytes); None for an empty one."""
    if not flat:
        return None
    pairs = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
    tokens = {name: value for name, value in pairs.items() if len(name) == KEY_HASH_LENGTH}
    anchor = pairs.get("a")
    customer = Customer(
        id=customer_id,
        plan=pairs.get("p", ""),
        api_key_hashes=tuple(tokens),
        billing_anchor=date.fromisoformat(anchor) if anchor else None,
        stripe_customer_id=pairs.get("s"),
        lago_subscription_id=pairs.get("l"),
    )
    return Document(customer, tokens, deleted="d" in pairs)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
