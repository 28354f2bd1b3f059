"""The admin port: health, readiness, Prometheus metrics and the bearer-protected /admin/ API."""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.admission.grants import parse_grant
from sidecar.admission.record_customers import RecentCustomers
from sidecar.admission.usage import usage_document
from sidecar.config.policy.model import Customer, Policy
from sidecar.config.policy.windows import rfc3339
from sidecar.errors import StoreUnavailable
from sidecar.http import check_api, customers_api, events_api, problems
from sidecar.http.components import COMPONENTS, Components
from sidecar.http.history_api import add_admin_routes as add_history_routes
from sidecar.http.lookup import named_customer
from sidecar.http.notifications_api import add_routes as add_notification_routes
from sidecar.http.reloading import reload_policy
from sidecar.http.ui import add_routes as add_ui_routes
from sidecar.store.port import GrantOutcome


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
    """Ready (200) when a policy is loaded (always, once started) and the store answers; 503 while
    it does not. Either way the body says whether the circuit breaker is open and how much usage
    waits in the local journal, so a probe shows a degraded sidecar and its recovery."""
    components = request.app[COMPONENTS]
    try:
        await components.store.ping()
    except StoreUnavailable as error:
        components.metrics.store_errors.labels("ping").inc()
        answer = {"status": "unavailable", "store": str(error), **_degradation(components)}
        return web.json_response(answer, status=503)
    policy = components.holder.current.summary()
    return web.json_response({"status": "ready", "policy": policy, **_degradation(components)})


def _degradation(components: Components) -> dict[str, object]:
    journal = components.journal
    return {
        "circuit": "open" if components.store.circuit_open else "closed",
        "journal_pending": journal.pending if journal is not None else 0,
    }


async def metrics(request: web.Request) -> web.Response:
    components = request.app[COMPONENTS]
    components.metrics.store_circuit_open.set(1 if components.store.circuit_open else 0)
    if components.journal is not None:
        components.metrics.journal_pending.set(components.journal.pending)
    body = components.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def customer_usage(request: web.Request) -> web.Response:
    customer = await named_customer(request)
    if isinstance(customer, web.Response):
        return customer
    components = request.app[COMPONENTS]
    return await usage_answer(components, components.holder.current, customer)


async def usage_answer(components: Components, policy: Policy, customer: Customer) -> web.Response:
    """The usage document of SPEC §7, or 503 when the store cannot be read."""
    try:
        document = await usage_document(policy, components.store, customer)
    except StoreUnavailable:
        components.metrics.store_errors.labels("read_limits").inc()
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response(document)


async def post_grant(request: web.Request) -> web.Response:
    """Add prepaid credit: 201 added, 200 when this grant id was added before, 409 when the id
    names a different grant, 422 for a bad body."""
    known = await named_customer(request)
    if isinstance(known, web.Response):
        return known
    components = request.app[COMPONENTS]
    policy = components.holder.current
    customer_id = known.id
    try:
        body = await request.json()
    except ValueError:
        body = None
    grant = parse_grant(body, policy, components.store.time())
    if isinstance(grant, list):
        return problems.problem(422, "Invalid grant", "the grant was not added", errors=grant)
    try:
        outcome = await components.store.grant(customer_id, grant)
    except StoreUnavailable:
        components.metrics.store_errors.labels("grant").inc()
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    components.denials.forget(customer_id)  # this replica at once; others within VOLATILE_SECONDS
    if outcome is GrantOutcome.CONFLICT:
        return problems.problem(
            409, "Conflict", f"grant id '{grant.id}' was used before for a different grant; use a new id"
        )
    answer = {"customer": customer_id, "id": grant.id, "meter": grant.meter, "amount": grant.amount}
    answer["expires_at"] = rfc3339(grant.expires_at) if grant.expires_at is not None else None
    answer["status"] = outcome.value
    return web.json_response(answer, status=201 if outcome is GrantOutcome.ADDED else 200)


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


# Paths the admin token guards: the admin API, and the OpenMeter-compatible ingestion path.
GUARDED = ("/admin/", "/api/")


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under /admin/ and /api/, a configured SIDECAR_ADMIN_TOKEN must be presented as a Bearer token."""
    token = request.app[COMPONENTS].settings.admin_token
    if token and request.path.startswith(GUARDED):
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not _same_token(presented, token):
            return problems.problem(
                401,
                "Unauthorized",
                "the admin API needs Authorization: Bearer <SIDECAR_ADMIN_TOKEN>",
                headers={"WWW-Authenticate": 'Bearer realm="sidecar-admin"'},
            )
    return await handler(request)


def _same_token(presented: str, token: str) -> bool:
    """In constant time, and for any bytes a client sends (aiohttp decodes them with surrogateescape)."""
    return hmac.compare_digest(_raw(presented), _raw(token))


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/customers/{customer}/usage", customer_usage)
    app.router.add_post("/admin/customers/{customer}/grants", post_grant)
    app.router.add_post("/admin/customers/{customer}/check", check_api.post_check)
    app[events_api.RECENT] = RecentCustomers()  # customers records named in the last second
    app.router.add_post("/admin/events", events_api.post_events)
    app.router.add_post(events_api.OPENMETER_PATH, events_api.post_events)  # OpenMeter's SDKs post here
    app.router.add_post("/admin/reload", reload)
    customers_api.add_routes(app)  # list, get, put, delete, keys, import (SPEC §7)
    app.router.add_get("/admin/billing/dead-letters", dead_letters)
    app.router.add_post("/admin/billing/dead-letters/redrive", redrive)
    add_notification_routes(app)
    add_history_routes(app)
    add_ui_routes(app)
