"""The ``features:`` section: each feature's routes (method and path template), whether it is
public, and what one request of it costs on request-time meters."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from types import MappingProxyType

from sidecar.config.policy.draft import Draft, define, resolve, valid_name
from sidecar.config.policy.model import Feature
from sidecar.config.policy.nodes import (
    At,
    read_bool,
    read_fields,
    read_int,
    read_items,
    read_optional,
    read_pairs,
    read_required,
    read_str,
    read_word,
)

_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_FEATURE_KEYS = ("name", "match", "public", "cost")
_MATCH_KEYS = ("method", "path")


def read_features(draft: Draft, at: At) -> None:
    for item in read_items(at):
        _feature(draft, item)


def _feature(draft: Draft, at: At) -> None:
    fields = read_fields(at, _FEATURE_KEYS, required=("name", "match"))
    if fields is None:
        return
    name = read_required(fields, "name", partial(read_str, what="a feature name"))
    if name is not None:
        valid_name(fields["name"], "feature", name)
    feature = _feature_value(draft, fields, name or "")
    if name is not None:
        define(draft.features, "feature", name, fields["name"], feature)


def _feature_value(draft: Draft, fields: dict[str, At], name: str) -> Feature | None:
    mark = len(draft.errors)
    route = read_required(fields, "match", _match)
    public = read_optional(fields, "public", read_bool, False)
    no_cost: Mapping[str, int] = MappingProxyType({})
    cost = read_optional(fields, "cost", partial(_cost, draft, public), no_cost)
    if route is None or not name or len(draft.errors) > mark:
        return None
    method, path = route
    return Feature(name=name, method=method, path=path, public=public, cost=cost)


def _match(at: At) -> tuple[str | None, str] | None:
    mark = len(at.errors)
    fields = read_fields(at, _MATCH_KEYS, required=("path",))
    path = read_required(fields or {}, "path", _route_path)
    method = read_optional(fields or {}, "method", _method, None)
    if path is None or len(at.errors) > mark:
        return None
    return method, path


def _method(at: At) -> str | None:
    return read_word(at, "method", _METHODS, str.upper)


def _route_path(at: At) -> str | None:
    path = read_str(at, "a path template")
    if path is None:
        return None
    if not path.startswith("/"):
        at.error(f"path '{path}' must start with '/'")
        return None
    for segment in path.split("/"):
        if ("{" in segment or "}" in segment) and not _PLACEHOLDER.fullmatch(segment):
            at.error(
                f"segment '{segment}' of path '{path}': a placeholder like {{id}} "
                "must fill a whole path segment"
            )
            return None
    return path


def _cost(draft: Draft, public: bool, at: At) -> Mapping[str, int] | None:
    if public:
        at.error("a public feature is not metered, so it cannot have a cost")
        return None
    amounts: dict[str, int] = {}
    for meter, key_at, value_at in read_pairs(at) or ():
        draft.later(_cost_meter, draft, key_at, meter)
        amount = read_int(value_at, minimum=1)
        if amount is not None:
            amounts[meter] = amount
    return MappingProxyType(amounts)


def _cost_meter(draft: Draft, at: At, name: str) -> None:
    meter = resolve(draft.meters, "meter", at, name)
    if meter is not None and not meter.source.at_request_time:
        at.error(f"cost can only be given for request-time meters; '{name}' is measured from {meter.source}")
