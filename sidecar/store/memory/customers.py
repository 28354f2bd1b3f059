"""Customers stored through the admin API, in memory: the CustomerStore port, with a version
that moves with every change as the Redis one's does."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from sidecar.config.policy.model import Customer


class MemoryCustomers:
    def __init__(self) -> None:
        self._customers: dict[str, Customer] = {}
        self._version = 0

    async def put(self, customer: Customer) -> None:
        self._customers[customer.id] = customer
        self._version += 1

    async def version(self) -> int:
        return self._version

    async def read(self) -> Mapping[str, Customer]:
        return MappingProxyType(dict(self._customers))
