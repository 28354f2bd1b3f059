"""The proxy under Hypothesis-made malformed requests, sent on raw sockets to a real sidecar.

The sidecar runs as `sidecar run` serves it (the proxy app behind intake.GuardedSite) with a real
upstream and real Redis, on 127.0.0.1, in a thread of its own with its own event loop; the test
talks to it with blocking sockets. Requests mix random methods, request targets full of dot
segments, percent-encodings and odd bytes, random versions, header garbage (names, values,
counts, identity and hop-by-hop headers) and bodies framed well or badly. Every request is
complete on the wire, so each must get an answer: never a 5xx (the client is at fault, or
nothing is), never a hang, and never an error or a traceback in the log.

Bounded and deterministic: a fixed number of examples from a derandomized generator.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.http.app import build_proxy_app
from sidecar.http.intake import GuardedSite
from sidecar.store.redis.embedded import EmbeddedRedis
from tests.conftest import key_hash, make_components, write_policy

KEY = "fuzz-key-1"
ANSWER_TIMEOUT = 5.0
START_TIMEOUT = 20.0
LIMITS = {"max_headers": 40, "max_header_size": 8192, "max_body_size": 4096, "header_timeout": 0.5}


class Failures(logging.Handler):
    """Log records that mean something went wrong inside: errors, tracebacks, sidecar warnings."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        warning = record.levelno >= logging.WARNING and record.name.startswith("sidecar")
        if record.levelno >= logging.ERROR or record.exc_info or warning:
            self.records.append(record)

    def take(self) -> list[str]:
        taken = [f"{r.name} {r.levelname}: {self.format(r)}" for r in self.records]
        self.records.clear()
        return taken


async def upstream_echo(request: web.Request) -> web.Response:
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
    except ConnectionError:  # the sidecar cut an upload off (a body past the limit): expected
        return web.Response(status=499)
    return web.json_response({"path": request.path, "bytes": size})


@dataclass
class Sidecar:
    """The sidecar and its upstream on their own loop in a thread; stopped by `close`."""

    policy: Path
    redis_url: str
    port: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fuzzed-sidecar", daemon=True)
        self._thread.start()
        if not self.ready.wait(START_TIMEOUT) or self.failure is not None:
            raise RuntimeError(f"the fuzzed sidecar did not start: {self.failure!r}")

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:
            self.failure = error
            self.ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        upstream = web.Application(handler_args={"auto_decompress": False})
        upstream.router.add_route("*", "/{tail:.*}", upstream_echo)
        upstream_runner = web.AppRunner(upstream, access_log=None, handle_signals=False)
        await upstream_runner.setup()
        upstream_site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
        await upstream_site.start()
        components = make_components(
            self.policy, f"http://127.0.0.1:{upstream_site.port}", self.redis_url, **LIMITS
        )
        runner = web.AppRunner(
            build_proxy_app(components), access_log=None, shutdown_timeout=1, handle_signals=False
        )
        await runner.setup()
        site = GuardedSite(runner, "127.0.0.1", 0, settings=components.settings, metrics=components.metrics)
        await site.start()
        self.port = site.port
        self.ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await components.store.close()
            await upstream_runner.cleanup()


@pytest.fixture(scope="module")
def sidecar(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    policy = write_policy(
        tmp_path_factory.mktemp("fuzz"),
        f"""
        version: 1
        meters: {{requests: {{aggregation: count}}}}
        features:
          - {{name: open, match: {{path: "/public/{{x}}"}}, public: true}}
          - {{name: files, match: {{path: "/v1/{{x}}"}}}}
          - {{name: nested, match: {{path: "/v1/{{x}}/{{y}}"}}}}
        plans:
          p: {{features: [files, nested], limits: [{{meter: requests, limit: 1000000000, period: day}}]}}
        customers:
          acme: {{plan: p, api_keys: ["{key_hash(KEY)}"]}}
        """,
    )
    served = Sidecar(policy, redis_server.url)
    served.start()
    yield served
    served.close()


@pytest.fixture(scope="module")
def failures() -> Iterator[Failures]:
    handler = Failures()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


# --- requests ---------------------------------------------------------------------------------

LINE_SAFE = st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"])
TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=10)
METHODS = st.sampled_from(
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PRI", "get", "FOO"]
) | st.text(alphabet=LINE_SAFE, max_size=6)
PREFIXES = st.sampled_from(
    ["/v1/", "/public/", "/_sidecar/usage", "/", "", "*", "//", "http://evil.example/v1/", "v1/", "/v1"]
)
SEGMENTS = st.sampled_from(
    [".", "..", "%2e", "%2E%2e", ".%2e", "%2f", "%2F..", "%00", "%ff", "%c3%a9", "%", "%z", "%%", "~u",
     ";p=1", "a b", "é", "\x7f", "\x01", "//", "\\", "*", "@", ":", "#frag", "name"]
) | st.text(alphabet=LINE_SAFE, max_size=6)  # fmt: skip
QUERIES = st.none() | st.text(alphabet=LINE_SAFE, max_size=12).map(lambda text: "?" + text)
VERSIONS = st.sampled_from(
    ["HTTP/1.1"] * 8
    + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "http/1.1", "HTTP/1", "HTTP/1.1 x", "", "HTTP/11"]
)
HEADER_NAMES = st.sampled_from(
    ["Host", "host", "X-API-Key", "x-api-key", "Authorization", "Connection", "Keep-Alive", "Upgrade",
     "Expect", "Content-Encoding", "Forwarded", "X-Forwarded-For", "X-Customer-Id", "X-Customer-Plan",
     "Cookie", "Accept", "TE", "Trailer", "Proxy-Connection", "Accept-Encoding", "Range"]
) | TOKEN | st.text(alphabet=LINE_SAFE, max_size=8)  # fmt: skip
HEADER_VALUES = st.sampled_from(
    [KEY, f"Bearer {KEY}", "Bearer", "Basic Zm9vOmJhcg==", "close", "keep-alive", "Upgrade", "websocket",
     "h2c", "100-continue", "gzip", "chunked", "trailers", "0", "-1", "a, b", "", " ", "\t", "x" * 9000]
) | st.text(alphabet=LINE_SAFE, max_size=40)  # fmt: skip
FRAMINGS = st.sampled_from(["none", "length", "chunked", "short-length", "bad-chunk", "both", "two-lengths"])


def framed(framing: str, body: bytes) -> tuple[list[str], bytes]:
    """The framing header lines and the bytes after the head; every one is complete on the wire."""
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]) if part)
    return {
        "none": ([], b""),
        "length": ([f"Content-Length: {len(body)}"], body),
        "chunked": (["Transfer-Encoding: chunked"], chunks + b"0\r\n\r\n"),
        "short-length": ([f"Content-Length: {half}"], body),
        "bad-chunk": (["Transfer-Encoding: chunked"], chunks + b"zz\r\n" + body + b"\r\n0\r\n\r\n"),
        "both": ([f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"], body),
        "two-lengths": ([f"Content-Length: {len(body)}", f"Content-Length: {half}"], body),
    }[framing]


# The plausible counterpart of each part; a request breaks a few parts at most, so that many get
# past the parser to routing, identity, admission and forwarding.
PLAIN_METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
PLAIN_TARGETS = st.tuples(
    st.sampled_from(["/v1/", "/public/", "/v1/a/", "/nowhere/"]),
    st.text(alphabet=string.ascii_letters + string.digits + "-._~", min_size=1, max_size=8),
    st.sampled_from(["", "?q=1", "?a=1&a=2", "?x=%20y"]),
).map("".join)
PLAIN_FIELDS = st.lists(
    st.sampled_from(
        ["Accept: */*", "X-Forwarded-For: 10.0.0.9", "X-Customer-Id: root", "X-Customer-Tier: gold",
         "Forwarded: for=10.0.0.1", "Cookie: a=b", "Connection: keep-alive", "Connection: close",
         "Expect: 100-continue", "Content-Encoding: gzip", "Range: bytes=0-1", "TE: trailers",
         "Connection: Upgrade", "Upgrade: websocket", "Accept-Encoding: gzip, br", "X-Empty:"]
    ),
    max_size=6,
)  # fmt: skip
KEYS = st.sampled_from([f"X-API-Key: {KEY}", f"Authorization: Bearer {KEY}", "X-API-Key: wrong", ""])
PARTS = ("method", "target", "version", "fields", "host", "key", "framing", "encoding")
BODIES = st.binary(max_size=100) | st.integers(3000, 6000).map(bytes)  # small, or near the 4096 limit


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    broken = draw(st.sets(st.sampled_from(PARTS), max_size=3))

    def part(name: str, plain: st.SearchStrategy[str], odd: st.SearchStrategy[str]) -> str:
        return draw(odd if name in broken else plain)

    method = part("method", PLAIN_METHODS, METHODS)
    odd_target = st.tuples(
        PREFIXES, st.lists(SEGMENTS, max_size=4).map("/".join), QUERIES.map(lambda q: q or "")
    )
    target = part("target", PLAIN_TARGETS, odd_target.map("".join))
    version = part("version", st.sampled_from(["HTTP/1.1", "HTTP/1.0"]), VERSIONS)
    fields = draw(PLAIN_FIELDS)
    if "fields" in broken:
        fields += [
            f"{name}: {value}"
            for name, value in draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=45))
        ]
    fields.insert(
        0, part("host", st.just("Host: sidecar"), st.sampled_from(["", "Host: a, b", "Host: ", "host: x y"]))
    )
    fields.append(
        part("key", KEYS, st.sampled_from([f"X-API-Key: {KEY}\xe9", f"X-API-Key: {KEY}\r\nX-API-Key: x"]))
    )
    framing = part("framing", st.sampled_from(["none", "length", "chunked"]), FRAMINGS)
    framing_fields, body = framed(framing, draw(BODIES))
    first = f"{method} {target} {version}".rstrip()
    head = "\r\n".join([first, *[field for field in fields if field], *framing_fields]) + "\r\n\r\n"
    encoding = "latin-1" if "encoding" in broken else "utf-8"  # latin-1: header bytes that are not UTF-8
    return method, head.encode(encoding, "replace") + body


# --- answers ----------------------------------------------------------------------------------


def answer_status(port: int, method: str, raw: bytes) -> int | None:
    """The final status of the first answer (1xx skipped), or None if the sidecar closed first."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as connection:
        connection.sendall(raw)
        received = b""
        while True:
            head, found, rest = received.partition(b"\r\n\r\n")
            if found:
                status = int(head.split(b" ", 2)[1])
                if status >= 200:
                    return status
                received = rest
                continue
            chunk = connection.recv(65536)
            if not chunk:
                return None
            received += chunk


FUZZ = settings(
    max_examples=500,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(requests())
def test_malformed_requests_get_a_client_error_never_a_5xx_nor_a_traceback(
    sidecar: Sidecar, failures: Failures, request: tuple[str, bytes]
) -> None:
    method, raw = request
    try:
        status: int | str | None = answer_status(sidecar.port, method, raw)
    except TimeoutError:
        status = f"no answer within {ANSWER_TIMEOUT}s"
    logged = failures.take()
    assert isinstance(status, int), f"{status or 'closed without an answer'} for {raw[:300]!r}"
    assert status < 500, f"{status} for {raw[:300]!r}"
    assert logged == [], f"logged for {raw[:300]!r}"
