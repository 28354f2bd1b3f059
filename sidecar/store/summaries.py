"""A usage summary: every unit of one (customer, meter, feature, window), frozen with its id.

The id is derived from those fields, the window's revision (1 for the first close; a unit
that arrives after its window was closed is sent in a later revision with its own id) and the
deployment's ``billing.namespace``, so a resend of the same summary always carries the same id and
the same value, and two deployments with their own namespaces never share an id.

The default namespace is left out of the id, so a deployment that keeps it has the ids of the
releases before namespaces existed (receivers and reconciliation that recompute ids go on
working); leaving it in would not separate two deployments that both keep the default anyway.
A summary is frozen with its id and namespace when its window closes, so changing the namespace
never changes a summary already closed, resends included.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sidecar.config.policy.model import DEFAULT_NAMESPACE
from sidecar.config.policy.windows import rfc3339

__all__ = ["DEFAULT_NAMESPACE", "Summary", "id_namespace", "summary_id"]


def id_namespace(namespace: str) -> str:
    """What close.lua is given for ``namespace``: empty for the default, which ids leave out."""
    return "" if namespace == DEFAULT_NAMESPACE else namespace


def summary_id(
    customer: str,
    meter: str,
    feature: str,
    window_start: int,
    revision: int,
    *,
    namespace: str = DEFAULT_NAMESPACE,
) -> str:
    """The SHA-1 of ``[<namespace>|]<customer>|<meter>|<feature>|<window_start>|<revision>``;
    close.lua computes the same with redis.sha1hex."""
    prefix = id_namespace(namespace)
    text = f"{prefix}{'|' if prefix else ''}{customer}|{meter}|{feature}|{window_start}|{revision}"
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    id: str
    customer: str
    plan: str
    meter: str
    aggregation: str
    feature: str
    value: int
    window_start: int  # epoch seconds, inclusive
    window_end: int  # epoch seconds, exclusive
    namespace: str = DEFAULT_NAMESPACE  # billing.namespace when it closed: the CloudEvents source

    def to_json(self) -> dict[str, Any]:
        """The SPEC §6 `json` form of one summary."""
        return {
            "id": self.id,
            "customer": self.customer,
            "plan": self.plan,
            "meter": self.meter,
            "aggregation": self.aggregation,
            "feature": self.feature,
            "value": self.value,
            "window_start": rfc3339(self.window_start),
            "window_end": rfc3339(self.window_end),
        }
