"""`python -m bench.forward`: CPU µs per forwarded small GET, aiohttp's ClientSession against the
sidecar's UpstreamPool (sidecar/http/upstream.py), and what is left when nothing is forwarded.

Three proxies with no metering, each served in turn by this process on 127.0.0.1:

* ``local``: answers every request itself with a canned small JSON body; the floor (aiohttp's
  server: parse, route, write), which the other two pay too.
* ``session``: bench.bare_proxy's handler, unchanged: ClientSession, a StreamResponse.
* ``pool``: the same forwarding over UpstreamPool, a small answer that has all arrived written
  back in one web.Response, as sidecar/http/proxy.py does.

The upstream (bench.upstream, GET /hello) and the load (wrk, else bench.pyload; 10 keep-alive
connections) run in processes of their own, so this process's CPU time over a run, divided by the requests it
answered, is the proxy's own cost per request; minus ``local``'s, the forwarding path's (the
upstream call and writing the answer back). Rounds alternate the variants so that the
neighbours' load on a shared machine falls on each alike; report the range over rounds.

    python -m bench.forward [--rounds 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

from bench import bare_proxy, procs
from sidecar.http.headers import HOP_BY_HOP, connection_listed
from sidecar.http.proxy import CHUNK_SIZE, SMALL_ANSWER
from sidecar.http.upstream import Answer, Outbound, UpstreamPool

POOL = web.AppKey("pool", UpstreamPool)
ANSWERED = web.AppKey("answered", list)
CANNED = b'{"hello": "customer-0", "plan": "starter"}'
CONNECTIONS = 10
WRK = shutil.which("wrk")
MAX_SECONDS = 5.0  # per run: the whole bench stays within about 20 s at the defaults


async def local(request: web.Request) -> web.Response:
    return web.Response(body=CANNED, content_type="application/json")


async def pooled(request: web.Request) -> web.StreamResponse:
    dropped = HOP_BY_HOP | connection_listed(request.headers) | bare_proxy.FORWARDING
    headers = CIMultiDict((n, v) for n, v in request.headers.items() if n.lower() not in dropped)
    headers["X-Forwarded-For"] = request.remote or "unknown"
    headers["X-Forwarded-Proto"] = request.scheme
    body = request.content.iter_chunked(CHUNK_SIZE) if request.body_exists else None
    answer = await request.app[POOL].send(
        Outbound(request.method, request.rel_url.raw_path_qs, headers, body)
    )
    try:
        return await _answer_back(request, answer)
    finally:
        answer.release()


async def _answer_back(request: web.Request, answer: Answer) -> web.StreamResponse:
    dropped = HOP_BY_HOP | connection_listed(answer.headers)
    fields = [(n, v) for n, v in answer.headers.items() if n.lower() not in dropped]
    whole = answer.whole(SMALL_ANSWER)
    if whole is not None:
        response = web.Response(status=answer.status, reason=answer.reason, body=whole)
        response.headers.extend(fields)
        return response
    streamed = web.StreamResponse(status=answer.status, reason=answer.reason)
    streamed.headers.extend(fields)
    await streamed.prepare(request)
    while chunk := await answer.read(CHUNK_SIZE):
        await streamed.write(chunk)
    await streamed.write_eof()
    return streamed


def counted(app: web.Application) -> web.Application:
    """``app``, its every response counted in app[ANSWERED] (the same small cost in every variant)."""

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        answered.append(None)

    answered: list[None] = []
    app[ANSWERED] = answered
    app.on_response_prepare.append(count)
    return app


def build(variant: str, upstream: str) -> web.Application:
    if variant == "session":
        return counted(bare_proxy.build_app(upstream))
    app = web.Application(handler_args={"max_field_size": 16384})  # as the bare proxy's
    app.router.add_route("*", "/{tail:.*}", local if variant == "local" else pooled)
    if variant == "pool":

        async def pool(app: web.Application) -> AsyncIterator[None]:
            app[POOL] = UpstreamPool(upstream, bare_proxy.UPSTREAM_TIMEOUT, 1000)
            yield
            await app[POOL].close()

        app.cleanup_ctx.append(pool)
    return counted(app)


def load_command(url: str, keys: Path, seconds: float) -> list[str]:
    """wrk when installed (C: it saturates the proxy, as the product benchmark does), else bench.pyload."""
    if WRK:
        return [WRK, "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", url]
    options = ["--keys", str(keys), "--connections", str(CONNECTIONS), "--seconds", str(seconds)]
    return [sys.executable, "-m", "bench.pyload", "--url", url, *options]


@dataclass(frozen=True)
class Cost:
    """CPU µs per request: in Python and the C it calls (user), in the kernel (system: the
    syscalls, and loopback TCP delivering what this process sends)."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system


async def run(variant: str, upstream: str, keys: Path, seconds: float) -> Cost:
    """One run of ``variant`` under load: this process's CPU per request answered."""
    app = build(variant, upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = procs.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        load = await asyncio.create_subprocess_exec(
            *load_command(f"http://127.0.0.1:{port}/hello", keys, seconds),
            stdout=asyncio.subprocess.PIPE,
            env=procs.child_env(),
        )
        started, before = len(app[ANSWERED]), resource.getrusage(resource.RUSAGE_SELF)
        out, _ = await asyncio.wait_for(load.communicate(), seconds + 30)
        after, answered = resource.getrusage(resource.RUSAGE_SELF), len(app[ANSWERED]) - started
    finally:
        await runner.cleanup()
    failed = b"Non-2xx" in out if WRK else b'"non_2xx": 0,' not in out
    if load.returncode or not answered or failed:
        raise RuntimeError(f"{variant}: the load failed: {out.decode()[-500:]}")
    per = 1e6 / answered
    return Cost((after.ru_utime - before.ru_utime) * per, (after.ru_stime - before.ru_stime) * per)


async def measure(upstream: str, rounds: int, seconds: float) -> dict[str, list[Cost]]:
    with tempfile.TemporaryDirectory() as directory:
        keys = Path(directory) / "keys.txt"
        keys.write_text("customer-key\n")
        costs: dict[str, list[Cost]] = {"local": [], "session": [], "pool": []}
        for _ in range(rounds):
            for variant, found in costs.items():
                found.append(await run(variant, upstream, keys, seconds))
    return costs


def span(values: list[float]) -> str:
    return f"{min(values):.0f} to {max(values):.0f}"


def report(costs: dict[str, list[Cost]]) -> str:
    """A Markdown table: each variant's range over the rounds, and the forwarding path's (the
    variant's cost minus local's in the same round)."""
    floor = costs["local"]
    lines = [
        "| proxy | µs CPU per request | of which user | forwarding path | of which user |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, found in costs.items():
        row = [span([c.total for c in found]), span([c.user for c in found])]
        if variant != "local":
            row.append(span([c.total - b.total for c, b in zip(found, floor, strict=True)]))
            row.append(span([c.user - b.user for c, b in zip(found, floor, strict=True)]))
        else:
            row += ["—", "—"]
        lines.append(f"| {variant} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.forward")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per run (at most 5)")
    args = parser.parse_args()
    port = procs.free_port()
    with tempfile.TemporaryDirectory() as directory:
        argv = [sys.executable, "-m", "bench.upstream", "--listen", f"127.0.0.1:{port}"]
        upstream = procs.Proc("upstream", argv, core=None, log=Path(directory) / "upstream.log")
        try:
            upstream.wait_listening(port, 15)
            seconds = min(args.seconds, MAX_SECONDS)
            costs = asyncio.run(measure(f"http://127.0.0.1:{port}", args.rounds, seconds))
        finally:
            procs.stop_all()
    print(report(costs))


if __name__ == "__main__":
    main()
