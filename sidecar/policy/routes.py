"""Method + path templates compiled once into one lookup; the first matching feature wins."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.policy.model import Feature

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def has_dot_segments(path: str) -> bool:
    """A decoded path with `.` or `..` segments: an upstream that normalises it would serve a
    route other than the one the route table matched, so such paths are refused, not routed."""
    return "." in path and any(segment in (".", "..") for segment in path.split("/"))


def template_to_regex(template: str) -> re.Pattern[str]:
    """`/v1/exports/{id}` matches `/v1/exports/abc` but not `/v1/exports/abc/x` nor `/v1/exports/`."""
    parts = _PLACEHOLDER.split(template)
    pattern = "".join("[^/]+" if index % 2 else re.escape(literal) for index, literal in enumerate(parts))
    return re.compile(pattern + r"\Z")


@dataclass(frozen=True, slots=True)
class _Route:
    method: str | None
    pattern: re.Pattern[str]
    feature: Feature


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: tuple[_Route, ...]

    @classmethod
    def compile(cls, features: Iterable[Feature]) -> RouteTable:
        return cls(tuple(_Route(f.method, template_to_regex(f.path), f) for f in features))

    def feature_for(self, method: str, path: str) -> Feature | None:
        """The first feature whose method (if any) and path template match, else None."""
        for route in self.routes:
            if (route.method is None or route.method == method) and route.pattern.match(path):
                return route.feature
        return None
