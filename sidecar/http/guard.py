"""Hostile input: which requests are refused before admission, and why (pure; no aiohttp.web).

aiohttp's C parser (llhttp, strict for requests) already refuses, with 400 and before any handler
runs: Content-Length together with Transfer-Encoding, a repeated or non-numeric Content-Length, a
repeated Host (in any spelling), a Transfer-Encoding that repeats or does not end in ``chunked``,
obs-fold, bare CR or LF, NUL and other control bytes, whitespace before a colon, more header
fields than ``max_headers`` and a line longer than ``max_header_size``. `parser_refusal` turns
those refusals into a fault the client can read, without echoing the bytes that caused it (they
may hold an API key).

`screen` refuses what llhttp lets through and a proxy must not forward:

* a version other than HTTP/1.0 and HTTP/1.1 (llhttp reads ``GET /`` as HTTP/0.9 and accepts
  ``HTTP/2.0`` in HTTP/1 syntax);
* a Transfer-Encoding other than exactly ``chunked`` (empty, or ``gzip, chunked``, a coding the
  sidecar would silently drop), or any Transfer-Encoding on HTTP/1.0 (RFC 9112 §6.1);
* a Host that is not one ``host[:port]`` (a list, spaces);
* an API key header sent more than once: the sidecar and the upstream could each read another;
* a request line and header fields above ``max_header_size`` in total (llhttp limits each line,
  not the sum);
* a Content-Length above ``max_body_size``: 413 before admission, so nothing is charged or sent.

A body without Content-Length (chunked) is counted as it streams: `capped` stops it with
BodyTooLarge once it passes ``max_body_size``, which cuts the upstream request short.
"""

from __future__ import annotations

import enum
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from itertools import chain

from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from multidict import MultiMapping

from sidecar.errors import BodyStalled, BodyTooLarge


class Fault(enum.Enum):
    """What was wrong with the input; the value is the metric label."""

    MALFORMED = "malformed"
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TOO_LARGE = "body_too_large"
    HEAD_TIMEOUT = "head_timeout"
    BODY_TIMEOUT = "body_timeout"


@dataclass(frozen=True, slots=True)
class Refusal:
    fault: Fault
    detail: str


@dataclass(frozen=True, slots=True)
class Head:
    """The parts of a parsed request head that screening reads."""

    version: tuple[int, int]
    method: str
    target: str  # the request target as sent
    raw_headers: tuple[tuple[bytes, bytes], ...]
    headers: MultiMapping[str]


# RFC 3986 reg-name / IPv4 / IP-literal, then an optional port; no list, no whitespace, no userinfo.
_HOST = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+;=%]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
_VERSIONS = ((1, 0), (1, 1))
_PROSE = re.compile(r"[A-Za-z0-9 '`,.\-]+")


def screen(
    head: Head, key_headers: Iterable[str], max_header_size: int, max_body_size: int
) -> Refusal | None:
    """The refusal for a parsed head that must not be admitted, or None."""
    fields = b"".join(chain.from_iterable(head.raw_headers))
    if head_size(head, len(fields)) > max_header_size:
        return Refusal(
            Fault.HEADERS_TOO_LARGE,
            f"the request line and header fields together are larger than {max_header_size} bytes",
        )
    headers = head.headers
    return (
        _version(head.version)
        or _target(head.target)
        or _undecodable(fields, head.raw_headers)
        or _transfer_encoding(headers.get("Transfer-Encoding"), head.version)
        or _host(headers.get("Host"))
        or _repeated_key(headers, key_headers)
        or _declared_length(headers.get("Content-Length"), max_body_size)
    )


def head_size(head: Head, fields_size: int) -> int:
    """Bytes of the head as sent (give or take whitespace around values), from the size of the
    header names and values together."""
    line = len(head.method) + len(head.target) + len("  HTTP/1.1\r\n")
    return line + fields_size + 4 * len(head.raw_headers) + 2


def _target(target: str) -> Refusal | None:
    """Origin-form (``/path``) or absolute-form (``http://host/path``); not CONNECT's or ``*``."""
    if target.startswith("/") or "://" in target:
        return None
    return Refusal(Fault.MALFORMED, "the request target must be a path such as /v1/search")


def _undecodable(fields: bytes, raw_headers: tuple[tuple[bytes, bytes], ...]) -> Refusal | None:
    """A header value that is not UTF-8 would reach the upstream altered (aiohttp's client encodes
    header values as UTF-8), so it is refused rather than forwarded changed."""
    if fields.isascii():
        return None
    for name, value in raw_headers:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return Refusal(Fault.MALFORMED, f"the value of {_printable(name)} is not UTF-8")
    return None


def _printable(name: bytes) -> str:
    return name.decode("ascii", "replace")  # llhttp lets only token characters into a name


def _version(version: tuple[int, int]) -> Refusal | None:
    if version in _VERSIONS:
        return None
    major, minor = version
    return Refusal(Fault.MALFORMED, f"HTTP/{major}.{minor} is not accepted; send HTTP/1.1")


def _transfer_encoding(value: str | None, version: tuple[int, int]) -> Refusal | None:
    if value is None:
        return None
    if version == (1, 0):
        return Refusal(Fault.MALFORMED, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
    if value.strip().lower() != "chunked":
        return Refusal(Fault.MALFORMED, "Transfer-Encoding must be exactly 'chunked'")
    return None


def _host(value: str | None) -> Refusal | None:
    if value is None or _HOST.fullmatch(value):
        return None
    return Refusal(Fault.MALFORMED, "Host must be a single host[:port]")


def _repeated_key(headers: MultiMapping[str], key_headers: Iterable[str]) -> Refusal | None:
    if all(len(headers.getall(name, ())) < 2 for name in key_headers):
        return None
    return Refusal(Fault.MALFORMED, "an API key header was sent more than once; send exactly one key")


def _declared_length(value: str | None, max_body_size: int) -> Refusal | None:
    if value is None or not value.isdigit() or int(value) <= max_body_size:  # llhttp checked the digits
        return None
    return Refusal(Fault.BODY_TOO_LARGE, f"the request body is larger than {max_body_size} bytes")


def parser_refusal(error: HttpProcessingError, max_header_size: int, max_headers: int) -> Refusal:
    """What a request aiohttp's parser refused was faulted for, in words that quote none of its bytes."""
    if isinstance(error, LineTooLong):
        return Refusal(
            Fault.HEADERS_TOO_LARGE,
            f"the request line or a header field is longer than {max_header_size} bytes",
        )
    if error.message == "Too many headers received":
        return Refusal(Fault.HEADERS_TOO_LARGE, f"more than {max_headers} header fields")
    return Refusal(Fault.MALFORMED, f"the request is not valid HTTP/1.1: {_reason(error.message)}")


def _reason(message: str) -> str:
    """The parser's reason without the quoted input that follows its first colon."""
    reason = message.partition(":")[0].strip()
    return reason if _PROSE.fullmatch(reason) and "b'" not in reason else "malformed request"


async def capped(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The chunks, until their total passes `limit`: then BodyTooLarge, before the chunk is passed on."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        yield chunk


def body_refusal(error: BaseException) -> Refusal | None:
    """The client's fault in an upload that failed while the body streamed to the upstream: 413 when
    the body outgrew the limit, 400 when its framing broke (a bad chunk), 408 when it stalled; None
    when it was not the client's body that failed."""
    cause = error.__cause__
    if isinstance(cause, BodyStalled):
        return stalled(cause)
    if isinstance(cause, BodyTooLarge):
        return Refusal(Fault.BODY_TOO_LARGE, f"the request body is larger than {cause.limit} bytes")
    if isinstance(cause, HttpProcessingError):
        return Refusal(Fault.MALFORMED, f"the request body is not valid HTTP/1.1: {_reason(cause.message)}")
    return None


def stalled(error: BodyStalled) -> Refusal:
    return Refusal(Fault.BODY_TIMEOUT, str(error))


def spoofable(name: str) -> bool:
    """Headers a client must not be able to set for the upstream: identity and forwarding claims."""
    lowered = name.lower()
    return lowered.startswith("x-customer-") or lowered == "forwarded"
