"""resp.evalsha: the bytes redis-py would send, whatever its memo of encoded arguments holds."""

from __future__ import annotations

import pytest

from sidecar.store.redis import resp


def plain(sha: str, keys: list[str], args: list[resp.Arg]) -> bytes:
    parts: list[bytes] = [b"EVALSHA", sha.encode(), b"%d" % len(keys), *(k.encode() for k in keys)]
    for value in args:
        parts.append(
            value
            if isinstance(value, bytes)
            else str(value).encode()
            if not isinstance(value, float)
            else repr(value).encode()
        )
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def test_evalsha_matches_a_plain_encoding_with_the_memo_warm_and_cold() -> None:
    keys = ["sc:{c:ü}:u", "k2"]
    args: list[resp.Arg] = [60, "", 0, "h", 1.0, 1, b"\x00raw", "ü", 10**12]
    expected = plain("a" * 40, keys, args)
    assert resp.evalsha("a" * 40, keys, args) == expected
    assert resp.evalsha("a" * 40, keys, args) == expected, "the same from the memo"


def test_a_float_and_an_int_that_compare_equal_keep_their_own_encodings() -> None:
    first = resp.evalsha("a" * 40, [], [1])
    assert resp.evalsha("a" * 40, [], [1.0]).endswith(b"$3\r\n1.0\r\n")
    assert resp.evalsha("a" * 40, [], [1]) == first


def test_a_bool_is_refused_even_when_its_int_is_remembered() -> None:
    resp.evalsha("a" * 40, [], [1])
    with pytest.raises(TypeError):
        resp.evalsha("a" * 40, [], [True])


def test_appended_arguments_are_counted_in_the_array_length() -> None:
    assert resp.evalsha("a" * 40, ["k"], ["v"], appended=3).startswith(b"*8\r\n")
