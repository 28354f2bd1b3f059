"""Method + path templates compiled once into one lookup; the first matching feature wins."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Routable(Protocol):
    """What a route table routes to (a Feature): a method, or None for any, and a path template."""

    @property
    def method(self) -> str | None: ...

    @property
    def path(self) -> str: ...


R = TypeVar("R", bound=Routable)

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
class _Route(Generic[R]):
    method: str | None
    pattern: re.Pattern[str]
    feature: R


@dataclass(frozen=True, slots=True)
class RouteTable(Generic[R]):
    routes: tuple[_Route[R], ...]

    @classmethod
    def compile(cls, features: Iterable[R]) -> RouteTable[R]:
        return cls(tuple(_Route(f.method, template_to_regex(f.path), f) for f in features))

    def feature_for(self, method: str, path: str) -> R | None:
        """The first feature whose method (if any) and path template match, else None."""
        for route in self.routes:
            if (route.method is None or route.method == method) and route.pattern.match(path):
                return route.feature
        return None
