"""The meter sources a policy may name, one row each: what follows the colon, when it is charged,
whether a reservation may read it, and whether it reads a JSON body. ``event`` is the one source
no exchange reads: usage records (POST /admin/events) alone feed it.

This table is all the policy knows of a source: the loader reads its names, arguments and
hints from it, and the policy reads its phase. How a source is read from an exchange is
admission's table (admission/sources.py, READERS), keyed by the same SourceKind. A new source is
one member and one row here, and one reader there.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType


class SourceKind(enum.Enum):
    REQUEST = "request"
    REQUEST_BYTES = "request.bytes"
    RESPONSE_BYTES = "response.bytes"
    RESPONSE_DURATION_MS = "response.duration_ms"
    REQUEST_HEADER = "request.header"
    RESPONSE_HEADER = "response.header"
    RESPONSE_JSON = "response.json"
    REQUEST_JSON = "request.json"
    EVENT = "event"  # fed only by usage records (POST /admin/events), never by an exchange


class Phase(enum.Enum):
    """When a meter reading a source is charged."""

    REQUEST = "request"  # at admission, atomically with the check: the amount is the feature's cost
    RESPONSE = "response"  # when the exchange ends, with what it measured
    RECORD = "record"  # only when a usage record reports it; an exchange charges none of it


@dataclass(frozen=True, slots=True)
class Argument:
    """What follows the colon of ``kind:argument``: the rule it must match, and how hints write it."""

    rule: re.Pattern[str]
    placeholder: str


HEADER_NAME = Argument(re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"), "NAME")  # an RFC 9110 token
JSON_PATH = Argument(re.compile(r"[^.\s]+(?:\.[^.\s]+)*"), "a.b.c")


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceTraits:
    """What the policy knows of one source kind.

    ``phase`` None: no meter may read it, only a reservation (read before forwarding, like every
    source a reservation reads). ``body``: it reads a JSON body, which for a meter is the
    response's (captured while it streams) and for a reservation the request's (read ahead).
    """

    argument: Argument | None = None
    phase: Phase | None
    reserve: bool = False
    body: bool = False


SOURCE_KINDS: Mapping[SourceKind, SourceTraits] = MappingProxyType(
    {
        SourceKind.REQUEST: SourceTraits(phase=Phase.REQUEST),
        SourceKind.REQUEST_BYTES: SourceTraits(phase=Phase.RESPONSE),
        SourceKind.RESPONSE_BYTES: SourceTraits(phase=Phase.RESPONSE),
        SourceKind.RESPONSE_DURATION_MS: SourceTraits(phase=Phase.RESPONSE),
        SourceKind.REQUEST_HEADER: SourceTraits(argument=HEADER_NAME, phase=Phase.RESPONSE, reserve=True),
        SourceKind.RESPONSE_HEADER: SourceTraits(argument=HEADER_NAME, phase=Phase.RESPONSE),
        SourceKind.RESPONSE_JSON: SourceTraits(argument=JSON_PATH, phase=Phase.RESPONSE, body=True),
        SourceKind.REQUEST_JSON: SourceTraits(argument=JSON_PATH, phase=None, reserve=True, body=True),
        SourceKind.EVENT: SourceTraits(phase=Phase.RECORD),
    }
)
_BY_NAME = {kind.value: kind for kind in SOURCE_KINDS}


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """Where a meter's amount comes from; ``argument`` is the header name or JSON path."""

    kind: SourceKind
    argument: str | None = None

    @property
    def traits(self) -> SourceTraits:
        return SOURCE_KINDS[self.kind]

    @property
    def at_request_time(self) -> bool:
        """Known before forwarding, so it is checked and charged atomically at admission."""
        return SOURCE_KINDS[self.kind].phase is Phase.REQUEST

    @property
    def measured(self) -> bool:
        """Read from an exchange when it ends (the proxy measures it and charges it then)."""
        return SOURCE_KINDS[self.kind].phase is Phase.RESPONSE

    @property
    def from_records(self) -> bool:
        """Fed only by usage records: a limit on it gates requests while records leave it room."""
        return SOURCE_KINDS[self.kind].phase is Phase.RECORD

    def __str__(self) -> str:
        return self.kind.value if self.argument is None else f"{self.kind.value}:{self.argument}"


def parse_source(text: str, allowed: Callable[[SourceTraits], bool]) -> Source | None:
    """The source ``text`` names (``kind`` or ``kind:argument``) if its kind is ``allowed``;
    None for anything else, so the caller reports one message for every way it can be wrong."""
    name, colon, argument = text.partition(":")
    kind = _BY_NAME.get(name)
    if kind is None or not allowed(SOURCE_KINDS[kind]):
        return None
    spec = SOURCE_KINDS[kind].argument
    if spec is None:
        return None if colon else Source(kind=kind)
    return Source(kind=kind, argument=argument) if colon and spec.rule.fullmatch(argument) else None


def spellings(allowed: Callable[[SourceTraits], bool]) -> list[str]:
    """How a policy writes each allowed kind, in table order, for the loader's hints."""
    return [
        kind.value if traits.argument is None else f"{kind.value}:{traits.argument.placeholder}"
        for kind, traits in SOURCE_KINDS.items()
        if allowed(traits)
    ]


def is_meter_source(traits: SourceTraits) -> bool:
    return traits.phase is not None


def is_reserve_source(traits: SourceTraits) -> bool:
    return traits.reserve
