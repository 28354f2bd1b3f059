"""Policy files → one validated Policy, or every problem found, each located to file:line:col.

The loader walks ``yaml.compose()`` nodes, never loaded Python values, so that every key and
value keeps its position and duplicate keys stay visible. Each file is checked on its own
(shape, types, vocabularies, unknown and duplicate keys). References between sections (plan →
feature, limit → meter, customer → plan) are checked once every file has been read, so a plan in
one file may name a meter defined in another.

This module reads the files and the top level (version, identity, store_failure); each other
section has its reader: meter_section.py, feature_section.py, plan_section.py (limits and
prepaid credit), customer_section.py, billing_section.py and events_section.py (usage
records), all writing into one Draft.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from yaml.nodes import SequenceNode

from sidecar.config.policy.billing_section import read_billing
from sidecar.config.policy.customer_section import read_customers
from sidecar.config.policy.draft import Draft, values
from sidecar.config.policy.events_section import read_events
from sidecar.config.policy.feature_section import read_features
from sidecar.config.policy.meter_section import read_meters
from sidecar.config.policy.meter_sources import HEADER_NAME
from sidecar.config.policy.model import Identity, Policy
from sidecar.config.policy.nodes import (
    At,
    compose,
    policy_files,
    read_bool,
    read_fields,
    read_int,
    read_items,
    read_optional,
    read_pairs,
    read_str,
    unknown_key_message,
)
from sidecar.config.policy.notifications_section import read_history_days, read_notifications
from sidecar.config.policy.plan_section import read_plans, read_store_failure
from sidecar.errors import PolicyInvalid

_TOP_KEYS = (
    "version",
    "identity",
    "meters",
    "features",
    "plans",
    "customers",
    "billing",
    "store_failure",
    "events",
    "notifications",
    "history_days",
)
_ONCE = ("identity", "billing", "store_failure", "events", "notifications", "history_days")


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy file, or every ``*.yaml``/``*.yml`` file of a directory, into one Policy.

    A directory's files are read in sorted filename order and merged: ``meters``, ``plans`` and
    ``customers`` merge by name (a name defined twice is an error), ``features`` concatenate in
    file order, and ``identity``, ``billing``, ``store_failure`` and ``events`` may appear in one
    file only.
    Every file must say ``version: 1``. Unknown keys and duplicate keys are errors at every level.

    Nothing is returned unless the whole policy is valid: otherwise ``PolicyInvalid`` is raised
    carrying every problem found, sorted by (file, line, col), each a ``PolicyError`` naming the
    dotted field path (``plans.pro.limits[2].period``; list indexes count from 0) and the bad
    value. An API key that is not a ``sha256:`` hash is never echoed, as it may be a secret.
    """
    draft = Draft()
    for file in policy_files(os.fspath(path), draft.errors):
        draft.sources.append(file)
        root = compose(file, draft.errors)
        if root is not None:
            _read_file(draft, At(file, "", root, draft.errors))
    for check in draft.checks:
        check()
    draft.checks.clear()  # they hold the draft: without the cycle, refcounting frees it, not a GC pass
    if draft.errors:
        raise PolicyInvalid(sorted(draft.errors, key=lambda e: (e.file, e.line, e.col)))
    return _build(draft)


def _build(draft: Draft) -> Policy:
    return Policy.build(
        identity=draft.identity,
        meters=values(draft.meters),
        features=tuple(values(draft.features).values()),
        plans=values(draft.plans),
        customers=values(draft.customers),
        billing=draft.billing,
        store_failure=draft.store_failure,
        sources=tuple(draft.sources),
        events=draft.events,
        notifications=draft.notifications,
        history_days=draft.history_days,
    )


def _read_file(draft: Draft, at: At) -> None:
    pairs = read_pairs(at)
    if pairs is None:
        return
    if "version" not in (key for key, _, _ in pairs):
        at.error("missing required key 'version'")
    for key, key_at, value_at in pairs:
        read = _SECTIONS.get(key)
        if read is None:
            key_at.error(unknown_key_message(key, _TOP_KEYS))
        elif key not in _ONCE or _claim(draft, key, key_at):
            read(draft, value_at)


def _claim(draft: Draft, section: str, key_at: At) -> bool:
    first = draft.sections.get(section)
    if first is not None:
        key_at.error(f"section '{section}' already defined at {first.where}")
        return False
    draft.sections[section] = key_at
    return True


def _version(draft: Draft, at: At) -> None:
    version = read_int(at, minimum=1)
    if version is not None and version != 1:
        at.error(f"unsupported version {version}; expected 1")


def _identity(draft: Draft, at: At) -> None:
    fields = read_fields(at, ("api_key_headers", "forward_key"))
    if not fields:
        return
    headers = _header_names(fields["api_key_headers"]) if "api_key_headers" in fields else None
    forward_key = read_optional(fields, "forward_key", read_bool, False)
    draft.identity = Identity(api_key_headers=headers or Identity().api_key_headers, forward_key=forward_key)


def _header_names(at: At) -> tuple[str, ...] | None:
    mark = len(at.errors)
    if isinstance(at.node, SequenceNode) and not at.node.value:
        at.error("expected at least one header name, got an empty list")
    names = tuple(name for item in read_items(at) if (name := _header_name(item)) is not None)
    return names if len(at.errors) == mark else None


def _header_name(at: At) -> str | None:
    name = read_str(at, "a header name")
    if name is not None and not HEADER_NAME.rule.fullmatch(name):
        at.error(f"invalid header name '{name}'; use letters, digits and !#$%&'*+-.^_`|~")
        return None
    return name


def _store_failure(draft: Draft, at: At) -> None:
    mode = read_store_failure(at)
    if mode is not None:
        draft.store_failure = mode


_SECTIONS: dict[str, Callable[[Draft, At], None]] = {
    "version": _version,
    "identity": _identity,
    "meters": read_meters,
    "features": read_features,
    "plans": read_plans,
    "customers": read_customers,
    "billing": read_billing,
    "store_failure": _store_failure,
    "events": read_events,
    "notifications": read_notifications,
    "history_days": read_history_days,
}
