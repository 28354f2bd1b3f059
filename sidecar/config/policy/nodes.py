"""YAML nodes read with their positions: where a node is, its shape and its scalar types.

Every reader reports into the error list carried by ``At`` and returns None for a bad value, so
one pass collects every problem of a file. Nothing here knows the policy's sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sidecar.errors import PolicyError

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

_TAG = "tag:yaml.org,2002:"
_CONSTRUCTOR = SafeConstructor()


# -- where a node is, and the errors it reports into -------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class At:
    """A node, where it sits (file and dotted path), and the error list it reports into."""

    file: str
    path: str
    node: Node
    errors: list[PolicyError]

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    @property
    def col(self) -> int:
        return int(self.node.start_mark.column) + 1

    @property
    def where(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line}:{self.col}"

    @property
    def tag(self) -> str:
        return str(self.node.tag).removeprefix(_TAG)

    def error(self, message: str) -> None:
        self.errors.append(PolicyError(self.file, self.line, self.col, self.path, message))

    def field(self, key: str, node: Node) -> At:
        path = f"{self.path}.{key}" if self.path else key
        return At(self.file, path, node, self.errors)  # not dataclasses.replace: 5x slower

    def item(self, index: int, node: Node) -> At:
        return At(self.file, f"{self.path}[{index}]", node, self.errors)


# -- files and YAML ---------------------------------------------------------------------------


def policy_files(path: str, errors: list[PolicyError]) -> list[str]:
    if not os.path.exists(path):
        errors.append(PolicyError(path, 1, 1, "", "no such file or directory"))
        return []
    if not os.path.isdir(path):
        return [path]
    names = _yaml_names(path, errors)
    if names is None:
        return []
    files = [os.path.join(path, name) for name in sorted(names)]
    files = [file for file in files if os.path.isfile(file)]
    if not files:
        errors.append(PolicyError(path, 1, 1, "", "no *.yaml or *.yml files in this directory"))
    return files


def _yaml_names(directory: str, errors: list[PolicyError]) -> list[str] | None:
    try:
        names = os.listdir(directory)
    except OSError as exc:
        errors.append(PolicyError(directory, 1, 1, "", f"cannot read directory: {exc.strerror}"))
        return None
    return [n for n in names if n.endswith((".yaml", ".yml")) and not n.startswith(".")]


def compose(file: str, errors: list[PolicyError]) -> Node | None:
    text = _read_text(file, errors)
    if text is None:
        return None
    try:
        root: Node | None = yaml.compose(text, Loader=_FAST_LOADER)
    except yaml.YAMLError:
        try:  # libyaml words its errors differently: the pure-Python parser gives the message
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            errors.append(_yaml_error(file, text, exc))
            return None
    if root is None:
        errors.append(PolicyError(file, 1, 1, "", _EMPTY))
    return root


_EMPTY = "empty policy file; expected a mapping with version: 1"
# libyaml's composer, about 5 times faster than the pure-Python one (24 s against 4.7 s for a file
# of 100,000 customers), with the same nodes, tags and marks; the pure-Python one where PyYAML was
# built without libyaml.
_FAST_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_text(file: str, errors: list[PolicyError]) -> str | None:
    try:
        with open(file, encoding="utf-8") as stream:
            return stream.read()
    except OSError as exc:
        errors.append(PolicyError(file, 1, 1, "", f"cannot read file: {exc.strerror}"))
    except UnicodeDecodeError as exc:
        errors.append(PolicyError(file, 1, 1, "", f"file is not UTF-8 text: {exc.reason}"))
    return None


def _yaml_error(file: str, text: str, exc: yaml.YAMLError) -> PolicyError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
        context = f"{exc.context}, " if exc.context else ""
        message = f"invalid YAML: {context}{exc.problem}"
        return PolicyError(file, mark.line + 1, mark.column + 1, "", message)
    position = getattr(exc, "position", 0)
    line = text.count("\n", 0, position) + 1
    col = position - text.rfind("\n", 0, position)
    return PolicyError(file, line, col, "", f"invalid YAML: {getattr(exc, 'reason', exc)}")


# -- node shapes and scalar types -------------------------------------------------------------


def describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = str(node.tag).removeprefix(_TAG)
    if kind == "null":
        return "null"
    return f"'{node.value}'" if kind == "str" else f"{kind} {node.value}"


def report_expected(at: At, what: str) -> None:
    at.error(f"expected {what}, got {describe(at.node)}")


def is_tag(at: At, kind: str) -> bool:
    return isinstance(at.node, ScalarNode) and at.tag == kind


def read_int(at: At, minimum: int = 0) -> int | None:
    what = f"an integer >= {minimum}"
    if not is_tag(at, "int"):
        report_expected(at, what)
        return None
    try:
        value = int(_CONSTRUCTOR.construct_yaml_int(cast(ScalarNode, at.node)))
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        at.error(f"expected {what}, got an integer {len(at.node.value)} characters long")
        return None
    if value < minimum:
        at.error(f"expected {what}, got {value}")
        return None
    return value


def read_bool(at: At) -> bool | None:
    if is_tag(at, "bool"):
        return bool(_CONSTRUCTOR.construct_yaml_bool(cast(ScalarNode, at.node)))
    report_expected(at, "true or false")
    return None


def read_str(at: At, what: str = "a non-empty string") -> str | None:
    if is_tag(at, "str") and at.node.value:
        return str(at.node.value)
    report_expected(at, what)
    return None


def read_word(at: At, noun: str, choices: Sequence[str], fold: Callable[[str], str] = str) -> str | None:
    expected = f"one of {', '.join(choices)}"
    if not isinstance(at.node, ScalarNode):
        report_expected(at, expected)
        return None
    word = fold(at.node.value)
    if at.tag == "str" and word in choices:
        return word
    at.error(f"unknown {noun} '{at.node.value}'; expected {expected}")
    return None


def read_choice(at: At, kind: type[E], noun: str) -> E | None:
    word = read_word(at, noun, [member.value for member in kind])
    return None if word is None else kind(word)


def read_items(at: At) -> list[At]:
    if isinstance(at.node, SequenceNode):
        return [at.item(index, node) for index, node in enumerate(at.node.value)]
    report_expected(at, "a list")
    return []


def read_pairs(at: At) -> list[tuple[str, At, At]] | None:
    """(key, key position, value position) per entry; reports odd and duplicate keys."""
    if not isinstance(at.node, MappingNode):
        report_expected(at, "a mapping")
        return None
    seen: dict[str, At] = {}
    pairs = []
    for key_node, value_node in at.node.value:
        key = _key(at, key_node)
        if key is None:
            continue
        key_at = at.field(key, key_node)
        if key in seen:
            key_at.error(f"duplicate key '{key}' (first at line {seen[key].line})")
            continue
        seen[key] = key_at
        pairs.append((key, key_at, at.field(key, value_node)))
    return pairs


def _key(at: At, node: Node) -> str | None:
    if isinstance(node, ScalarNode) and node.value:
        return str(node.value)
    dataclasses.replace(at, node=node).error(f"expected a name as key, got {describe(node)}")
    return None


def read_fields(at: At, allowed: Sequence[str], required: Sequence[str] = ()) -> dict[str, At] | None:
    pairs = read_pairs(at)
    if pairs is None:
        return None
    fields = {}
    for key, key_at, value_at in pairs:
        if key in allowed:
            fields[key] = value_at
        else:
            key_at.error(unknown_key_message(key, allowed))
    for key in required:
        if key not in fields:
            at.error(f"missing required key '{key}'")
    return fields


def unknown_key_message(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key '{key}'; did you mean '{close[0]}'?"
    return f"unknown key '{key}'; valid keys are {', '.join(allowed)}"


def read_required(fields: dict[str, At], key: str, parse: Callable[[At], T | None]) -> T | None:
    """The parsed value, or None when missing (already reported) or invalid."""
    return parse(fields[key]) if key in fields else None


def read_optional(fields: dict[str, At], key: str, parse: Callable[[At], T | None], default: T) -> T:
    """The parsed value, or the default when absent or invalid (an error is then recorded)."""
    value = parse(fields[key]) if key in fields else None
    return default if value is None else value
