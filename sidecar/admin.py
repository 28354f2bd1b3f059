"""The admin port: health, readiness, Prometheus metrics and the bearer-protected /admin/ API."""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar import problems
from sidecar.components import COMPONENTS, Components
from sidecar.customers import parse_customer
from sidecar.errors import StoreUnavailable
from sidecar.policy.model import Customer, Policy
from sidecar.reloading import reload_policy
from sidecar.usage import usage_document


async def reload(request: web.Request) -> web.Response:
    """200 once the new policy is in force; 422 with every located error when it is refused."""
    components = request.app[COMPONENTS]
    refused = await reload_policy(components)
    if refused is not None:
        return problems.problem(
            422,
            "Policy refused",
            "the policy files are invalid; the policy in force is unchanged",
            errors=[str(error) for error in refused.errors],
        )
    return web.json_response({"status": "applied", "policy": components.holder.current.summary()})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when a policy is loaded (always, once started) and the store answers."""
    components = request.app[COMPONENTS]
    try:
        await components.store.ping()
    except StoreUnavailable as error:
        components.metrics.store_errors.labels("ping").inc()
        return web.json_response({"status": "unavailable", "store": str(error)}, status=503)
    return web.json_response({"status": "ready", "policy": components.holder.current.summary()})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[COMPONENTS].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def customer_usage(request: web.Request) -> web.Response:
    components = request.app[COMPONENTS]
    policy = components.holder.current
    customer = components.directory.all(policy).get(request.match_info["customer"])
    if customer is None:
        return problems.problem(404, "Not Found", f"no customer '{request.match_info['customer']}'")
    return await usage_answer(components, policy, customer)


async def usage_answer(components: Components, policy: Policy, customer: Customer) -> web.Response:
    """The usage document of SPEC §7, or 503 when the store cannot be read."""
    try:
        document = await usage_document(policy, components.store, customer)
    except StoreUnavailable:
        components.metrics.store_errors.labels("read_limits").inc()
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response(document)


async def put_customer(request: web.Request) -> web.Response:
    """Create or change a customer in Redis; every replica serves it within about a second."""
    components = request.app[COMPONENTS]
    policy = components.holder.current
    try:
        body = await request.json()
    except ValueError:
        body = None
    parsed = parse_customer(request.match_info["customer"], body, policy, components.directory)
    if isinstance(parsed, list):
        return problems.problem(422, "Invalid customer", "the customer was not stored", errors=parsed)
    try:
        await components.directory.put(parsed)
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response({"customer": parsed.id, "plan": parsed.plan, "stored": True})


async def dead_letters(request: web.Request) -> web.Response:
    """Summaries billing refused for good, with the answer it gave."""
    components = request.app[COMPONENTS]
    try:
        letters = await components.outbox.dead_letters()
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response({"dead_letters": letters})


async def redrive(request: web.Request) -> web.Response:
    """Put every dead letter back in its outbox, unchanged, to be pushed again (after a fix)."""
    components = request.app[COMPONENTS]
    try:
        moved = await components.outbox.redrive(int(components.store.time() * 1000))
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response({"redriven": moved})


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under /admin/, a configured SIDECAR_ADMIN_TOKEN must be presented as a Bearer token."""
    token = request.app[COMPONENTS].settings.admin_token
    if token and request.path.startswith("/admin/"):
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token.encode()):
            return problems.problem(
                401,
                "Unauthorized",
                "the admin API needs Authorization: Bearer <SIDECAR_ADMIN_TOKEN>",
                headers={"WWW-Authenticate": 'Bearer realm="sidecar-admin"'},
            )
    return await handler(request)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/customers/{customer}/usage", customer_usage)
    app.router.add_put("/admin/customers/{customer}", put_customer)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/billing/dead-letters", dead_letters)
    app.router.add_post("/admin/billing/dead-letters/redrive", redrive)
