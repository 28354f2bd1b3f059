"""`sidecar demo`: a small product API on the upstream address, with the sidecar in front of it.

The demo upstream answers the routes of policies/example.yaml, so the README's quick start shows
identity, limits and rate-limit headers without any other software.
"""

from __future__ import annotations

import logging
import random

from aiohttp import web
from yarl import URL

from sidecar.config.policy.holder import PolicyHolder
from sidecar.config.settings import Settings
from sidecar.runtime.server import serve

log = logging.getLogger("sidecar.runtime.demo")


async def hello(request: web.Request) -> web.Response:
    customer = request.headers.get("X-Customer-Id", "stranger")
    return web.json_response({"hello": customer, "plan": request.headers.get("X-Customer-Plan")})


async def search(request: web.Request) -> web.Response:
    query = request.query.get("q", "")
    return web.json_response({"query": query, "results": [f"{query} result {i}" for i in range(3)]})


async def export(request: web.Request) -> web.Response:
    return web.json_response({"export": request.match_info["id"], "status": "queued"}, status=202)


async def complete(request: web.Request) -> web.Response:
    """Answers like an LLM API: the tokens used are in the body and in X-Usage-Tokens."""
    tokens = random.randint(50, 400)
    body = {"text": "lorem ipsum", "usage": {"total_tokens": tokens}}
    return web.json_response(body, headers={"X-Usage-Tokens": str(tokens)})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def demo_upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/v1/search", search)
    app.router.add_post("/v1/exports/{id}", export)
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/healthz", healthz)
    return app


async def receive_usage(request: web.Request) -> web.Response:
    """A stand-in billing endpoint: logs each summary the sidecar pushes (format json)."""
    body = await request.json()
    for summary in body.get("summaries", []):
        log.info(
            "billing received %s: %s %s=%s (%s..%s)",
            summary["id"][:12],
            summary["customer"],
            summary["meter"],
            summary["value"],
            summary["window_start"],
            summary["window_end"],
        )
    return web.json_response({"received": len(body.get("summaries", []))})


def demo_billing_app(path: str) -> web.Application:
    app = web.Application()
    app.router.add_post(path, receive_usage)
    return app


async def serve_demo(settings: Settings, holder: PolicyHolder) -> None:
    """Serve the demo upstream on --upstream's address and, when the policy bills to a loopback
    URL, a logging billing receiver there; then the sidecar until SIGTERM."""
    runners = [await _start(demo_upstream_app(), URL(settings.upstream))]
    billing = holder.current.billing
    if billing is not None and URL(billing.url).host in ("127.0.0.1", "localhost"):
        runners.append(await _start(demo_billing_app(URL(billing.url).path), URL(billing.url)))
    try:
        await serve(settings, holder)
    finally:
        for runner in runners:
            await runner.cleanup()


async def _start(app: web.Application, address: URL) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, address.host, address.port).start()
    return runner
