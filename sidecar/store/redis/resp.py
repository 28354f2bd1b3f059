"""RESP, the Redis wire format, as the script batcher (pipeline.py) writes it: commands only.

Replies are parsed by hiredis (link.py). Arguments are encoded as redis-py would send them, so a
script sees the same ARGV whichever client called it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.store.redis.topology import Arg


def encode(value: Arg | None) -> bytes:
    """An argument as redis-py would send it: str as UTF-8, numbers in decimal, bytes as they are."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode()
    raise TypeError(f"a script argument must be str, int, float or bytes, not {type(value).__name__}")


def bulk(value: Arg | None) -> bytes:
    data = encode(value)
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(parts: Sequence[Arg | None]) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(bulk(part) for part in parts)


def evalsha(sha: str, keys: Sequence[str], args: Sequence[Arg], appended: int = 0) -> bytes:
    """EVALSHA sha numkeys key... arg... in RESP, in one pass (the common types inline: this runs
    once per request, and a call per argument costs more than the encoding); the array's length
    counts ``appended`` more arguments, written after these (a named call's name)."""
    length = 3 + len(keys) + len(args) + appended
    out = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (length, sha.encode())]
    out.append(bulk(len(keys)))
    for key in keys:
        data = key.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    for value in args:
        if type(value) is str:
            data = value.encode()
        elif type(value) is int:
            data = b"%d" % value
        else:
            data = encode(value)
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
