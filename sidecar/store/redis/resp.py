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


# Each argument's RESP, by value (bounded: cleared when full). A metering call's arguments are
# mostly the same few values (kinds, modes, ceilings, window bounds, the customer's keys), and
# formatting each one anew cost more than the rest of the encoding (bench/hotpath.py).
_ENCODED: dict[Arg, bytes] = {}
_ENCODED_MAX = 65_536


def _cached_bulk(value: Arg) -> bytes:
    if type(value) is float or type(value) is bool:  # 1.0 == True == 1: not an int's encoding
        return bulk(value)
    part = _ENCODED.get(value)
    if part is None:
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.clear()
        part = _ENCODED[value] = bulk(value)
    return part


def evalsha(sha: str, keys: Sequence[str], args: Sequence[Arg], appended: int = 0) -> bytes:
    """EVALSHA sha numkeys key... arg... in RESP; the array's length counts ``appended`` more
    arguments, written after these (a named call's name). This runs once per request."""
    length = 3 + len(keys) + len(args) + appended
    out = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (length, sha.encode())]
    out += [_cached_bulk(value) for value in (len(keys), *keys, *args)]
    return b"".join(out)
