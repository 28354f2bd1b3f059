"""guard.py as plain functions: which parsed heads are refused, and how parser errors are worded."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, InvalidHeader, LineTooLong
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import BodyTooLarge
from sidecar.http.guard import Fault, Head, body_refusal, capped, parser_refusal, screen, spoofable
from sidecar.http.intake import HeadWatch

KEY_HEADERS = ("X-API-Key", "Authorization")


def parsed(*fields: tuple[str, str], version: tuple[int, int] = (1, 1), target: str = "/v1/a") -> Head:
    raw = tuple((name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in fields)
    return Head(
        version=version,
        method="GET",
        target=target,
        raw_headers=raw,
        headers=CIMultiDictProxy(CIMultiDict(fields)),
    )


def fault_of(head: Head, max_header_size: int = 32 * 1024, max_body_size: int = 1000) -> Fault | None:
    refusal = screen(head, KEY_HEADERS, max_header_size, max_body_size)
    return None if refusal is None else refusal.fault


OK = ("Host", "api.example:8443")

SCREEN = [
    (parsed(OK), None),
    (parsed(OK, version=(1, 0)), None),
    (parsed(OK, target="http://api.example/v1/a"), None),
    (parsed(("Host", "")), None),  # RFC 9112 §3.2: an empty Host is allowed
    (parsed(("Host", "[::1]:80")), None),
    (parsed(OK, ("Transfer-Encoding", "Chunked")), None),
    (parsed(OK, ("Content-Length", "1000")), None),
    (parsed(OK, ("X-API-Key", "k"), ("Authorization", "Bearer k")), None),  # two headers, one each
    (parsed(OK, ("X-Note", "café")), None),  # UTF-8 is fine
    (parsed(OK, version=(0, 9)), Fault.MALFORMED),
    (parsed(OK, version=(2, 0)), Fault.MALFORMED),
    (parsed(OK, target="*"), Fault.MALFORMED),
    (parsed(OK, target="api.example:443"), Fault.MALFORMED),
    (parsed(OK, ("X-Note", "caf\udce9")), Fault.MALFORMED),  # latin-1 é, as aiohttp decodes it
    (parsed(OK, ("Transfer-Encoding", "gzip, chunked")), Fault.MALFORMED),
    (parsed(OK, ("Transfer-Encoding", "")), Fault.MALFORMED),
    (parsed(OK, ("Transfer-Encoding", "chunked"), version=(1, 0)), Fault.MALFORMED),
    (parsed(("Host", "a.example, b.example")), Fault.MALFORMED),
    (parsed(("Host", "user@a.example")), Fault.MALFORMED),
    (parsed(("Host", "a.example b")), Fault.MALFORMED),
    (parsed(OK, ("X-API-Key", "k1"), ("x-api-key", "k2")), Fault.MALFORMED),
    (parsed(OK, ("Authorization", "Bearer a"), ("Authorization", "Bearer b")), Fault.MALFORMED),
    (parsed(OK, ("Content-Length", "1001")), Fault.BODY_TOO_LARGE),
    (parsed(OK, *[(f"X-{i}", "v" * 100) for i in range(400)]), Fault.HEADERS_TOO_LARGE),
]


@pytest.mark.parametrize(("head", "fault"), SCREEN)
def test_screen(head: Head, fault: Fault | None) -> None:
    assert fault_of(head) == fault


def test_the_header_size_limit_counts_the_request_line_and_every_field() -> None:
    head = parsed(("Host", "h"), ("X-Pad", "p" * 70))
    # "GET /v1/a HTTP/1.1\r\n" 20 + "Host: h\r\n" 9 + "X-Pad: " 7 + 70 + "\r\n" 2 + "\r\n" 2 = 110
    assert fault_of(head, max_header_size=110) is None
    assert fault_of(head, max_header_size=109) is Fault.HEADERS_TOO_LARGE


PARSER_ERRORS = [
    (
        LineTooLong(b"vvvv", 8190),
        Fault.HEADERS_TOO_LARGE,
        "the request line or a header field is longer than 4096 bytes",
    ),
    (BadHttpMessage("Too many headers received"), Fault.HEADERS_TOO_LARGE, "more than 50 header fields"),
    (
        BadHttpMessage(
            "Content-Length can't be present with Transfer-Encoding:\n\n  b'Content-Length: 4'\n   ^"
        ),
        Fault.MALFORMED,
        "the request is not valid HTTP/1.1: Content-Length can't be present with Transfer-Encoding",
    ),
    (
        BadHttpMessage("Duplicate 'Host' header found."),
        Fault.MALFORMED,
        "the request is not valid HTTP/1.1: Duplicate 'Host' header found.",
    ),
    (
        InvalidHeader(b"X-API-Key: secret\x00"),
        Fault.MALFORMED,
        "the request is not valid HTTP/1.1: Invalid HTTP header",
    ),
    (
        BadStatusLine("GET /secret-key HTTP/1.1 x"),
        Fault.MALFORMED,
        "the request is not valid HTTP/1.1: malformed request",
    ),
]


@pytest.mark.parametrize(("error", "fault", "detail"), PARSER_ERRORS)
def test_parser_refusals_say_why_without_quoting_the_request(
    error: BadHttpMessage, fault: Fault, detail: str
) -> None:
    refusal = parser_refusal(error, max_header_size=4096, max_headers=50)
    assert (refusal.fault, refusal.detail) == (fault, detail)
    assert "secret" not in refusal.detail


async def chunks_of(*sizes: int) -> AsyncIterator[bytes]:
    for size in sizes:
        yield b"x" * size


async def test_capped_passes_a_body_up_to_the_limit() -> None:
    assert [len(chunk) async for chunk in capped(chunks_of(400, 600), 1000)] == [400, 600]


async def test_capped_stops_before_the_chunk_that_passes_the_limit() -> None:
    passed = []
    with pytest.raises(BodyTooLarge) as raised:
        async for chunk in capped(chunks_of(400, 600, 1), 1000):
            passed.append(len(chunk))
    assert passed == [400, 600]
    assert body_refusal(ConnectionError("upload failed")) is None  # any other failure is not a 413
    wrapped = ConnectionError("upload failed")  # as aiohttp's client reports a failed upload
    wrapped.__cause__ = raised.value
    refusal = body_refusal(wrapped)
    assert refusal is not None and refusal.fault is Fault.BODY_TOO_LARGE


@pytest.mark.parametrize(
    ("name", "dropped"),
    [
        ("X-Customer-Id", True),
        ("x-customer-tier", True),
        ("Forwarded", True),
        ("FORWARDED", True),
        ("X-Forwarded-For", False),
        ("X-Customer", False),
        ("X-API-Key", False),
    ],
)
def test_spoofable_headers(name: str, dropped: bool) -> None:
    assert spoofable(name) is dropped


class _Timer:
    def cancel(self) -> None:
        pass


@pytest.mark.parametrize(
    ("chunks", "size", "ended"),
    [
        ([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], 27, True),
        ([b"GET / HTTP/1.1\r\nHost: a\r\n\r", b"\n" + b"body" * 100], 27, True),  # blank line split
        ([b"GET / HTTP/1.1\r\nHost: a\r", b"\n\r\nbody"], 27, True),
        ([b"\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], 27, True),  # empty lines first are skipped
        ([b"GET / HTTP/1.1\r\n", b"Host: a\r\n"], 25, False),
    ],
)
def test_head_watch_counts_the_head_only(chunks: list[bytes], size: int, ended: bool) -> None:
    watch = HeadWatch(27, _Timer())  # type: ignore[arg-type]
    assert all(watch.feed(chunk) for chunk in chunks)
    assert (watch.size, watch.ended) == (size, ended)


def test_head_watch_refuses_a_head_past_its_limit_even_when_it_ends_in_the_same_chunk() -> None:
    watch = HeadWatch(26, _Timer())  # type: ignore[arg-type]
    assert not watch.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody")
