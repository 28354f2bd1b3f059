"""The policy loader under Hypothesis-made YAML: it loads, or it raises PolicyInvalid with located
errors; never anything else.

Three sources of documents: random YAML structures (policy words as keys, odd scalars), the
example policy with a subtree replaced or removed, and the example policy's text mutated line by
line (deleted, repeated, re-indented, cut, spliced with YAML syntax and stray bytes). Bounded and
deterministic: a fixed number of examples from a derandomized generator, no example database.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config.policy.loader import load_policy
from sidecar.errors import PolicyInvalid

EXAMPLE = Path(__file__).parents[2] / "policies" / "example.yaml"
EXAMPLE_TEXT = EXAMPLE.read_text()
EXAMPLE_DATA: dict[str, Any] = yaml.safe_load(EXAMPLE_TEXT)
WORDS = sorted(
    set(re.findall(r"[A-Za-z_][A-Za-z0-9_.:/-]*", EXAMPLE_TEXT.split("\n#", 1)[0] + str(EXAMPLE_DATA)))
)
YAML_SYNTAX = [
    "&a ", "*a", "<<: *a", "? ", ": ", "- ", "---\n", "...\n", "!!binary ", "!!python/object:os.system ",
    "!custom ", "%YAML 1.1\n", "{", "}", "[", "]", "'", '"', "|", ">", "#", "\t", "\x00", "\ufeff", "~",
    "null", ".nan", "-.inf", "0x1F", "0o17", "1_000", "1e400", "9" * 5000, "2026-02-30", "yes", "On",
]  # fmt: skip
ODD_VALUES = [
    "9" * 5000, "-1", "0", "1e400", "-0", "0x1F", "0o17", "0b101", "1_000", "+5", ".inf", ".nan", "1.5",
    "99999999999999999999999", "''", "null", "[]", "{}", "true", "2026-13-01", "*undefined",
]  # fmt: skip
FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_loads_or_locates(document: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "policy.yaml"
        path.write_bytes(document)
        try:
            load_policy(path)
        except PolicyInvalid as invalid:
            assert invalid.errors
            for error in invalid.errors:
                assert error.file == str(path), error
                assert error.line >= 1 and error.col >= 1, error
                assert error.message, error


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.dates(),
)
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=8), st.integers(), st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=20,
)


def dump(data: object) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode("utf-8", "surrogatepass")


@FUZZ
@given(st.dictionaries(keys, values, max_size=8) | values)
def test_random_structures(data: object) -> None:
    assert_loads_or_locates(dump(data))


def replaced(data: Any, path: list[int], value: object, delete: bool) -> Any:
    """`data` with the subtree at `path` (indices into its keys/items, wrapping) replaced or removed."""
    if not path or not isinstance(data, dict | list) or not data:
        return value
    index = path[0] % len(data)
    if isinstance(data, dict):
        key = list(data)[index]
        copy = dict(data)
        if delete and len(path) == 1:
            del copy[key]
        else:
            copy[key] = replaced(data[key], path[1:], value, delete)
        return copy
    items = list(data)
    if delete and len(path) == 1:
        del items[index]
    else:
        items[index] = replaced(items[index], path[1:], value, delete)
    return items


@FUZZ
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=5), values, st.booleans()), max_size=4
    )
)
def test_the_example_with_subtrees_replaced_or_removed(edits: list[tuple[list[int], object, bool]]) -> None:
    data: Any = EXAMPLE_DATA
    for path, value, delete in edits:
        data = replaced(data, path, value, delete)
    assert_loads_or_locates(dump(data))


LINES = EXAMPLE_TEXT.splitlines(keepends=True)
junk = st.sampled_from(YAML_SYNTAX) | st.text(max_size=10)
edit = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, len(LINES)), st.just("")),
    st.tuples(st.just("repeat"), st.integers(0, len(LINES)), st.just("")),
    st.tuples(st.just("indent"), st.integers(0, len(LINES)), st.sampled_from([" ", "  ", "\t", "-"])),
    st.tuples(st.just("dedent"), st.integers(0, len(LINES)), st.just("")),
    st.tuples(st.just("insert"), st.integers(0, 10_000), junk),
    st.tuples(st.just("replace"), st.integers(0, 10_000), junk),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just("")),
)


def mutate(lines: list[str], operation: str, at: int, text: str) -> list[str]:
    if not lines:
        return [text]
    row = at % len(lines)
    if operation == "delete":
        return lines[:row] + lines[row + 1 :]
    if operation == "repeat":
        return lines[: row + 1] + lines[row:]
    if operation == "indent":
        return [*lines[:row], text + lines[row], *lines[row + 1 :]]
    if operation == "dedent":
        return [*lines[:row], lines[row].lstrip(" "), *lines[row + 1 :]]
    whole = "".join(lines)
    column = at % (len(whole) + 1)
    if operation == "insert":
        whole = whole[:column] + text + whole[column:]
    elif operation == "replace":
        whole = whole[:column] + text + whole[column + len(text) :]
    else:
        whole = whole[:column]
    return whole.splitlines(keepends=True)


@FUZZ
@given(st.lists(edit, min_size=1, max_size=6), st.binary(max_size=3))
def test_the_example_text_mutated(edits: list[tuple[str, int, str]], stray: bytes) -> None:
    lines = list(LINES)
    for operation, at, text in edits:
        lines = mutate(lines, operation, at, text)
    document = "".join(lines).encode("utf-8", "surrogatepass")
    assert_loads_or_locates(document[: len(document) // 2] + stray + document[len(document) // 2 :])
    assert_loads_or_locates(document)


# Every scalar written after "key: " in the example, as (start, end) in its text.
VALUES = [match.span() for match in re.finditer(r"(?<=: )[^\s,{}\[\]#]+", EXAMPLE_TEXT)]


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALUES) - 1), st.sampled_from(ODD_VALUES) | junk), max_size=4))
def test_the_example_with_odd_values(edits: list[tuple[int, str]]) -> None:
    chosen = dict(edits)  # one new value per position; later edits of the same position win
    text, offset = EXAMPLE_TEXT, 0
    for index in sorted(chosen):
        start, end = VALUES[index]
        text = text[: start + offset] + chosen[index] + text[end + offset :]
        offset += len(chosen[index]) - (end - start)
    assert_loads_or_locates(text.encode("utf-8", "surrogatepass"))
