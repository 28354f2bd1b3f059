"""Hostile input (issue 6 part 3) against a real sidecar served as `sidecar run` serves it.

Each test runs the proxy app behind `intake.GuardedSite` (the connection protocol `sidecar run`
uses) on 127.0.0.1, a real upstream that records what reaches it, and real Redis; requests are
written byte for byte on raw sockets, because no HTTP client will send a malformed one.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.http.app import build_proxy_app
from sidecar.http.components import Components
from sidecar.http.intake import GuardedSite
from tests.conftest import make_components
from tests.helpers import ServerFactory, answering, key_hash, serve, write_policy

KEY = "acme-key-1"
READ_TIMEOUT = 5.0


@dataclass
class Recorder:
    """A real upstream on loopback: what reached it, whole or cut off."""

    url: str = ""
    seen: list[dict[str, object]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        record: dict[str, object] = {"path": request.path, "complete": False, "bytes": 0}
        self.seen.append(record)
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            record["bytes"] = len(body)
        record.update(complete=True, body=bytes(body), headers=[[k, v] for k, v in request.headers.items()])
        return web.json_response({"path": request.path, "bytes": len(body)})

    def completed(self) -> list[dict[str, object]]:
        return [record for record in self.seen if record["complete"]]


@pytest.fixture
async def recorder(aiohttp_server: ServerFactory) -> Recorder:
    recorder = Recorder()
    # The upstream, too, leaves bodies undecoded: what it records is what the sidecar sent.
    app = answering(recorder.handle, handler_args={"auto_decompress": False})
    recorder.url = await serve(aiohttp_server, app)
    return recorder


def policy_text(daily_limit: int) -> str:
    return f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features:
          - {{name: files, match: {{path: "/v1/{{name}}"}}}}
        plans:
          p: {{features: [files], limits: [{{meter: requests, limit: {daily_limit}, period: day}}]}}
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}
        """


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path, policy_text(1_000_000))


@dataclass
class Guarded:
    port: int
    components: Components

    def refused(self, fault: str) -> float:
        registry = self.components.metrics.registry
        return registry.get_sample_value("sidecar_refused_input_total", {"fault": fault}) or 0.0


GuardedFactory = Callable[..., Awaitable[Guarded]]


@pytest.fixture
async def guarded(redis_url: str) -> AsyncIterator[GuardedFactory]:
    """Starts sidecar proxy apps behind GuardedSite; settings overrides as keyword arguments."""
    runners: list[web.AppRunner] = []

    async def start(policy_path: Path, upstream_url: str, **settings: object) -> Guarded:
        components = make_components(policy_path, upstream_url, redis_url, **settings)
        app = build_proxy_app(components)
        app.on_cleanup.append(lambda _: components.store.close())
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        site = GuardedSite(runner, "127.0.0.1", 0, settings=components.settings, metrics=components.metrics)
        await site.start()
        return Guarded(site.port, components)

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class Answer:
    version: str
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        """The answer says the connection ends with it (HTTP/1.1 keeps it by default)."""
        return self.version != "HTTP/1.1" or self.headers.get("connection", "").lower() == "close"

    def problem(self) -> dict[str, object]:
        assert self.headers["content-type"] == "application/problem+json"
        document: dict[str, object] = json.loads(self.body)
        assert document["status"] == self.status
        return document


async def read_answer(reader: asyncio.StreamReader) -> Answer | None:
    """One response (1xx skipped), or None when the connection closed first."""
    while True:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.IncompleteReadError:
            return None
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if status >= 200:
            break
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status_line.split()[0], status, headers, body)


async def exchange(port: int, raw: bytes) -> tuple[Answer | None, bool]:
    """Send `raw`, read one answer; and whether the sidecar said Connection: close and did close
    (a kept-alive connection is not waited on)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        answer = await read_answer(reader)
        closing = answer is None or answer.closes
        closed = closing and await asyncio.wait_for(reader.read(1), READ_TIMEOUT) == b""
    finally:
        writer.close()
    return answer, closed


def head(first_line: str, *fields: str, body: bytes = b"") -> bytes:
    """A request with Host and the API key, plus `fields`, exactly as written."""
    lines = [first_line, "Host: sidecar", f"X-API-Key: {KEY}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: sidecar\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n"

# (request, who refuses it): every one is answered 400 and nothing of it reaches the upstream.
SMUGGLING = [
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Content-Length: 4", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        "llhttp",
        id="content-length-then-transfer-encoding",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding: chunked", "Content-Length: 35", body=b"0\r\n\r\n")
        + SMUGGLED,
        "llhttp",
        id="transfer-encoding-then-content-length-hiding-a-request",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Content-Length: 0", "Content-Length: 60", body=SMUGGLED),
        "llhttp",
        id="duplicate-content-length",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Content-Length: 4", "content-length: 4", body=b"abcd"),
        "llhttp",
        id="duplicate-content-length-same-value-other-case",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Content-Length: 4, 4", body=b"abcd"), "llhttp", id="content-length-list"
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Content-Length: +4", body=b"abcd"), "llhttp", id="content-length-signed"
    ),
    pytest.param(head("GET /v1/a HTTP/1.1", "Host: evil"), "llhttp", id="duplicate-host"),
    pytest.param(head("GET /v1/a HTTP/1.1", "hOsT: evil"), "llhttp", id="duplicate-host-other-case"),
    pytest.param(
        head(
            "POST /v1/a HTTP/1.1",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: identity",
            body=b"0\r\n\r\n",
        ),
        "llhttp",
        id="duplicate-transfer-encoding",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
        "llhttp",
        id="transfer-encoding-chunked-not-last",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
        "llhttp",
        id="transfer-encoding-unknown",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
        "llhttp",
        id="transfer-encoding-space-before-colon",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n"),
        "llhttp",
        id="transfer-encoding-vertical-tab",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding:", " chunked", body=b"0\r\n\r\n"),
        "llhttp",
        id="transfer-encoding-obs-fold",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding: chunked", body=b"0\r\nContent-Length: 60\r\n\r\n"),
        "llhttp",
        id="content-length-in-trailer",
    ),
    pytest.param(
        b"GET /v1/a HTTP/1.1\nHost: sidecar\nX-API-Key: " + KEY.encode() + b"\n\n", "llhttp", id="bare-lf"
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
        "guard",
        id="transfer-encoding-gzip-chunked",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.1", "Transfer-Encoding:", "Content-Length: 0"),
        "guard",
        id="transfer-encoding-empty",
    ),
    pytest.param(
        head("POST /v1/a HTTP/1.0", "Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
        "guard",
        id="transfer-encoding-on-http-1.0",
    ),
    pytest.param(
        head("GET /v1/a HTTP/1.1").replace(b"sidecar", b"a.example, b.example"), "guard", id="host-list"
    ),
    pytest.param(
        head("GET /v1/a HTTP/1.1").replace(b"sidecar", b"a.example b"), "guard", id="host-with-space"
    ),
    pytest.param(head("GET /v1/a HTTP/1.1", "X-API-Key: other-key"), "guard", id="api-key-twice"),
    pytest.param(head("GET /v1/a HTTP/2.0"), "guard", id="http-2.0-in-http-1-syntax"),
    pytest.param(b"GET /v1/a\r\n\r\n", "guard", id="http-0.9"),
    pytest.param(head("CONNECT upstream:443 HTTP/1.1"), "guard", id="connect-authority-form"),
    pytest.param(head("GET /v1/a HTTP/1.1", "X-Note: caf\xe9"), "guard", id="header-value-not-utf8"),
]


@pytest.mark.parametrize(("raw", "refused_by"), SMUGGLING)
async def test_smuggling_and_framing_attempts_are_refused_400_and_never_forwarded(
    guarded: GuardedFactory, policy: Path, recorder: Recorder, raw: bytes, refused_by: str
) -> None:
    sidecar = await guarded(policy, recorder.url)
    answer, closed = await exchange(sidecar.port, raw)
    assert answer is not None
    assert answer.status == 400
    assert answer.problem()["title"] == "Bad Request"
    assert closed  # the rest of the bytes on that connection are never read as another request
    await asyncio.sleep(0.05)
    assert recorder.seen == []
    assert sidecar.refused("malformed") == 1


async def test_the_same_requests_well_framed_are_forwarded(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    """The control for the table above: the harness does see what gets through."""
    sidecar = await guarded(policy, recorder.url)
    chunked = head("POST /v1/a HTTP/1.1", "Transfer-Encoding: chunked", body=b"4\r\nabcd\r\n0\r\n\r\n")
    for raw in (
        head("POST /v1/a HTTP/1.1", "Content-Length: 4", body=b"abcd"),
        chunked,
        head("GET /v1/a HTTP/1.0"),
    ):
        answer, _ = await exchange(sidecar.port, raw)
        assert answer is not None and answer.status == 200
    assert [record["bytes"] for record in recorder.completed()] == [4, 4, 0]


async def test_parser_refusals_quote_none_of_the_request(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url)
    answer, _ = await exchange(sidecar.port, head("GET /v1/a HTTP/1.1", f"X-Other: {KEY}\x00"))
    assert answer is not None and answer.status == 400
    assert answer.problem()["detail"] == "the request is not valid HTTP/1.1: Invalid header value char"
    assert KEY.encode() not in answer.body


# --- header count and size: 431 --------------------------------------------------------------


async def test_more_header_fields_than_max_headers_is_431(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, max_headers=10)
    at_limit = [f"X-F{i}: v" for i in range(8)]  # + Host and X-API-Key = 10
    answer, _ = await exchange(sidecar.port, head("GET /v1/a HTTP/1.1", *at_limit))
    assert answer is not None and answer.status == 200
    answer, closed = await exchange(sidecar.port, head("GET /v1/a HTTP/1.1", *at_limit, "X-One-More: v"))
    assert answer is not None and answer.status == 431
    assert answer.problem()["detail"] == "more than 10 header fields"
    assert closed and len(recorder.seen) == 1
    assert sidecar.refused("headers_too_large") == 1


async def test_one_header_line_longer_than_max_header_size_is_431(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, max_header_size=4096)
    answer, _ = await exchange(sidecar.port, head("GET /v1/a HTTP/1.1", "X-Big: " + "v" * 5000))
    assert answer is not None and answer.status == 431
    assert answer.problem()["title"] == "Request Header Fields Too Large"
    assert recorder.seen == []


async def test_many_small_headers_over_max_header_size_in_total_are_431(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    """llhttp limits each line; the total is the sidecar's own count."""
    sidecar = await guarded(policy, recorder.url, max_header_size=4096, max_headers=100)
    fields = [f"X-F{i:02}: {'v' * 90}" for i in range(50)]  # 50 lines of ~100 bytes: each fits, 5 KB in all
    answer, closed = await exchange(sidecar.port, head("GET /v1/a HTTP/1.1", *fields))
    assert answer is not None and answer.status == 431
    assert (
        answer.problem()["detail"] == "the request line and header fields together are larger than 4096 bytes"
    )
    assert closed and recorder.seen == []


async def test_kept_alive_heads_arriving_whole_are_served_unwatched_and_an_oversized_one_still_431(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    """A kept-alive request whose whole head comes in one read is not watched (no head timer per
    request, intake._whole_head); one whose whole head is over the limit is still refused."""
    sidecar = await guarded(policy, recorder.url, max_header_size=4096, max_headers=100)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    statuses = await kept_alive(reader, writer, 3)
    fields = [f"X-F{i:02}: {'v' * 90}" for i in range(50)]  # each line fits, 5 KB in all
    writer.write(head("GET /v1/b HTTP/1.1", *fields))
    oversized = await read_answer(reader)
    writer.close()
    assert statuses == [200, 200, 200]
    assert oversized is not None and oversized.status == 431
    assert [record["path"] for record in recorder.seen] == ["/v1/a"] * 3


async def test_a_head_growing_past_max_header_size_is_refused_before_it_ends(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    """No blank line is ever sent: the sidecar answers 431 once the head passes the limit, without
    buffering the rest (or waiting for the head deadline)."""
    sidecar = await guarded(policy, recorder.url, max_header_size=4096, header_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(b"GET /v1/a HTTP/1.1\r\nHost: sidecar\r\n")
    for i in range(10):
        writer.write(f"X-F{i}: {'v' * 1000}\r\n".encode())
    started = time.monotonic()
    answer = await read_answer(reader)
    writer.close()
    assert answer is not None and answer.status == 431
    assert time.monotonic() - started < 5


async def test_a_request_line_and_headers_just_under_the_limits_pass(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, max_header_size=4096)
    raw = head("GET /v1/a HTTP/1.1", "X-Pad: ")
    padded = raw.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (4096 - len(raw) - 8))
    assert len(padded) < 4096
    answer, _ = await exchange(sidecar.port, padded)
    assert answer is not None and answer.status == 200


# --- body size: 413 ---------------------------------------------------------------------------


async def test_declared_body_above_max_body_size_is_413_before_admission_and_costs_nothing(
    guarded: GuardedFactory, tmp_path: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(write_policy(tmp_path, policy_text(1)), recorder.url, max_body_size=1000)
    answer, closed = await exchange(
        sidecar.port, head("POST /v1/a HTTP/1.1", "Content-Length: 1001", body=b"x" * 1001)
    )
    assert answer is not None and answer.status == 413
    assert answer.problem() == {
        "type": "about:blank",
        "title": "Content Too Large",
        "status": 413,
        "detail": "the request body is larger than 1000 bytes",
    }
    assert closed and recorder.seen == []
    answer, _ = await exchange(
        sidecar.port, head("POST /v1/a HTTP/1.1", "Content-Length: 1000", body=b"x" * 1000)
    )
    assert answer is not None and answer.status == 200  # the day's one request was still there
    assert sidecar.refused("body_too_large") == 1


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


async def test_chunked_body_growing_past_max_body_size_is_413_and_never_forwarded_whole(
    guarded: GuardedFactory, tmp_path: Path, recorder: Recorder
) -> None:
    """The body streams to the upstream as it comes; once it passes the limit the upstream request
    is cut off (the upstream never sees its end), the client gets 413, and the admission charge
    stands, as for any admitted request the upstream did not complete."""
    sidecar = await guarded(write_policy(tmp_path, policy_text(1)), recorder.url, max_body_size=64 * 1024)
    body = chunked([bytes([i]) * 16 * 1024 for i in range(10)])  # 160 KiB in all
    answer, closed = await exchange(
        sidecar.port, head("PUT /v1/a HTTP/1.1", "Transfer-Encoding: chunked", body=body)
    )
    assert answer is not None and answer.status == 413
    assert answer.problem()["detail"] == "the request body is larger than 65536 bytes"
    assert closed
    await asyncio.sleep(0.2)
    assert recorder.completed() == []
    assert all(int(str(record["bytes"])) <= 64 * 1024 for record in recorder.seen)
    answer, _ = await exchange(sidecar.port, head("GET /v1/a HTTP/1.1"))
    assert answer is not None and answer.status == 429


async def test_a_bad_chunk_after_forwarding_began_is_400_at_once_and_the_upstream_never_gets_it_whole(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    """aiohttp drops the body it was feeding when a later chunk is malformed; without the sidecar's
    fix the upload would hang until --upstream-timeout and end as a 504 blamed on the upstream."""
    sidecar = await guarded(policy, recorder.url, upstream_timeout=20)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(head("PUT /v1/a HTTP/1.1", "Transfer-Encoding: chunked", body=b"4\r\nabcd\r\n"))
    await asyncio.sleep(0.3)  # the upstream request is under way
    started = time.monotonic()
    writer.write(b"zz\r\nnot a chunk\r\n0\r\n\r\n")
    answer = await read_answer(reader)
    writer.close()
    assert answer is not None and answer.status == 400
    assert (
        answer.problem()["detail"]
        == "the request body is not valid HTTP/1.1: Invalid character in chunk size"
    )
    assert time.monotonic() - started < 3
    await asyncio.sleep(0.1)
    assert len(recorder.seen) == 1 and recorder.completed() == []
    assert sidecar.refused("malformed") == 1
    registry = sidecar.components.metrics.registry
    assert registry.get_sample_value("sidecar_upstream_errors_total", {"kind": "refused"}) is None


async def test_chunked_body_within_max_body_size_is_forwarded_whole(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, max_body_size=64 * 1024)
    body = chunked([b"a" * 32 * 1024, b"b" * 32 * 1024])  # exactly the limit
    answer, _ = await exchange(
        sidecar.port, head("PUT /v1/a HTTP/1.1", "Transfer-Encoding: chunked", body=body)
    )
    assert answer is not None and answer.status == 200
    assert [record["bytes"] for record in recorder.completed()] == [64 * 1024]


# --- slow clients: the head deadline ----------------------------------------------------------


async def kept_alive(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, times: int, pause: float = 0.0
) -> list[int | None]:
    """The statuses of `times` GET /v1/a sent one after another on one connection, each answer
    read before the next is sent, `pause` seconds after each answer."""
    statuses = []
    for _ in range(times):
        writer.write(head("GET /v1/a HTTP/1.1"))
        answer = await read_answer(reader)
        statuses.append(answer.status if answer else None)
        await asyncio.sleep(pause)
    return statuses


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
    for byte in data:
        if writer.is_closing():
            return
        writer.write(bytes([byte]))
        await asyncio.sleep(pause)


async def test_a_head_sent_byte_by_byte_is_cut_off_at_the_header_timeout(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    started = time.monotonic()
    slowloris = asyncio.create_task(
        trickle(writer, head("GET /v1/a HTTP/1.1", *[f"X-{i}: v" for i in range(99)]), 0.02)
    )
    answer = await read_answer(reader)
    elapsed = time.monotonic() - started
    closed = await asyncio.wait_for(reader.read(1), READ_TIMEOUT) == b""
    slowloris.cancel()
    writer.close()
    assert answer is not None and answer.status == 408
    assert answer.problem()["detail"] == "the request head did not arrive within 0.5 seconds"
    assert closed and 0.45 < elapsed < 2.0
    assert recorder.seen == [] and sidecar.refused("head_timeout") == 1


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), READ_TIMEOUT) == b""  # closed without an answer
    writer.close()
    assert 0.45 < time.monotonic() - started < 2.0


async def test_a_second_request_trickled_on_a_kept_alive_connection_is_cut_off(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(head("GET /v1/first HTTP/1.1"))
    first = await read_answer(reader)
    slowloris = asyncio.create_task(
        trickle(writer, head("GET /v1/second HTTP/1.1", "X-Pad: " + "p" * 200), 0.02)
    )
    second = await read_answer(reader)
    slowloris.cancel()
    writer.close()
    assert first is not None and first.status == 200
    assert second is not None and second.status == 408
    assert [record["path"] for record in recorder.seen] == ["/v1/first"]


async def test_an_idle_kept_alive_connection_is_not_cut_by_the_head_deadline(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    """The deadline runs from a head's first byte; idle keep-alive is aiohttp's keep-alive timeout."""
    sidecar = await guarded(policy, recorder.url, header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    statuses = await kept_alive(reader, writer, 2, pause=0.6)
    writer.close()
    assert statuses == [200, 200]


async def test_a_slow_body_after_a_prompt_head_is_not_cut_by_the_head_deadline(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(head("POST /v1/a HTTP/1.1", "Content-Length: 8"))
    await trickle(writer, b"12345678", 0.1)  # 0.8 s of body
    answer = await read_answer(reader)
    writer.close()
    assert answer is not None and answer.status == 200
    assert [record["bytes"] for record in recorder.completed()] == [8]


async def test_a_body_that_stalls_after_admission_is_408_at_the_body_timeout_and_never_forwarded_whole(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, body_timeout=0.3, upstream_timeout=20)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(head("POST /v1/a HTTP/1.1", "Content-Length: 8", body=b"1234"))  # then nothing
    started = time.monotonic()
    answer = await read_answer(reader)
    waited = time.monotonic() - started
    writer.close()
    assert answer is not None and answer.status == 408 and answer.closes
    assert answer.problem()["detail"] == "no byte of the request body came for 0.3 seconds"
    assert 0.3 <= waited < 3
    await asyncio.sleep(0.1)
    assert len(recorder.seen) == 1 and recorder.completed() == []
    assert sidecar.refused("body_timeout") == 1


async def test_a_body_read_ahead_for_a_reserve_that_stalls_is_408_before_admission_and_costs_nothing(
    guarded: GuardedFactory, tmp_path: Path, recorder: Recorder
) -> None:
    policy = write_policy(
        tmp_path,
        f"""
        version: 1
        meters:
          requests: {{aggregation: count}}
          tokens: {{aggregation: sum, source: "response.header:X-Tokens", reserve: "request.json:max_tokens",
                    reserve_default: 10}}
        features:
          - {{name: files, match: {{path: "/v1/{{name}}"}}}}
        plans:
          p: {{features: [files], limits: [{{meter: requests, limit: 5, period: day}},
                                            {{meter: tokens, limit: 1000, period: day}}]}}
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}
        """,
    )
    sidecar = await guarded(policy, recorder.url, body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(head("POST /v1/a HTTP/1.1", "Content-Length: 40", body=b'{"max_tokens": '))
    answer = await read_answer(reader)
    writer.close()
    assert answer is not None and answer.status == 408
    assert recorder.seen == []
    assert await sidecar.components.store.client.keys("sc:{c:acme}:*") == []  # nothing charged or held


async def test_pipelined_requests_with_bodies_are_all_answered(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url, header_timeout=0.3, max_header_size=1024)
    one = head("POST /v1/one HTTP/1.1", "Content-Length: 3000", body=b"1" * 3000)
    two = head("POST /v1/two HTTP/1.1", "Content-Length: 3000", body=b"2" * 3000)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(one + two + head("GET /v1/three HTTP/1.1"))
    answers = [await read_answer(reader) for _ in range(3)]
    writer.close()
    assert [answer.status if answer else None for answer in answers] == [200, 200, 200]
    assert [record["path"] for record in recorder.completed()] == ["/v1/one", "/v1/two", "/v1/three"]


# --- bodies pass undecoded; spoofed identity and forwarding headers are dropped ---------------


async def test_a_gzip_request_body_reaches_the_upstream_byte_identical_with_its_content_encoding(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    """aiohttp's server would inflate it by default (a decompression bomb, and a changed body)."""
    compressed = gzip.compress(b"usage " * 10_000)
    raw = head("POST /v1/a HTTP/1.1", "Content-Encoding: gzip", f"Content-Length: {len(compressed)}")
    answer, _ = await exchange((await guarded(policy, recorder.url)).port, raw + compressed)
    assert answer is not None and answer.status == 200
    [record] = recorder.completed()
    assert record["body"] == compressed
    assert ["Content-Encoding", "gzip"] in record["headers"]  # type: ignore[operator]


async def test_spoofed_customer_and_forwarded_headers_never_reach_the_upstream(
    guarded: GuardedFactory, policy: Path, recorder: Recorder
) -> None:
    sidecar = await guarded(policy, recorder.url)
    answer, _ = await exchange(
        sidecar.port,
        head(
            "GET /v1/a HTTP/1.1",
            "X-Customer-Id: root",
            "x-customer-plan: enterprise",
            "X-Customer-Tier: gold",
            "X-CUSTOMER-ROLES: admin",
            "Forwarded: for=10.0.0.1;by=trusted;proto=https",
            "forwarded: for=10.0.0.2",
            "X-Forwarded-For: 10.9.9.9",
        ),
    )
    assert answer is not None and answer.status == 200
    [record] = recorder.completed()
    seen: dict[str, list[str]] = {}
    for name, value in record["headers"]:  # type: ignore[attr-defined]
        seen.setdefault(name.lower(), []).append(value)
    assert "forwarded" not in seen
    assert {name for name in seen if name.startswith("x-customer-")} == {"x-customer-id", "x-customer-plan"}
    assert (seen["x-customer-id"], seen["x-customer-plan"]) == (["acme"], ["p"])
    assert seen["x-forwarded-for"] == ["10.9.9.9, 127.0.0.1"]  # appended to, as before
