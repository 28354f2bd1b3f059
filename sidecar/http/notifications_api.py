"""The admin API's notification calls (SPEC §9): dead letters and their redrive, what waits, and a
customer's recent notifications, each as the document the receiver gets (billing/notices.py)."""

from __future__ import annotations

from aiohttp import web

from sidecar.billing.notices import document
from sidecar.billing.notifier import namespace_of
from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.components import COMPONENTS


async def dead_letters(request: web.Request) -> web.Response:
    """Notifications the receiver refused for good, each with the answer it gave."""
    components = request.app[COMPONENTS]
    namespace = namespace_of(components.holder.current)
    try:
        letters = await components.store.notifications.dead_letters()
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    listed = [{"notification": document(notice, namespace), "reason": reason} for notice, reason in letters]
    return web.json_response({"dead_letters": listed})


async def redrive(request: web.Request) -> web.Response:
    """Every dead letter back in its outbox, unchanged (the same id), to be sent again at once."""
    components = request.app[COMPONENTS]
    try:
        moved = await components.store.notifications.redrive(int(components.store.time() * 1000))
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response({"redriven": moved})


async def waiting(request: web.Request) -> web.Response:
    """How many customers have notifications waiting to be sent, and how many dead letters."""
    components = request.app[COMPONENTS]
    try:
        customers = await components.store.notifications.waiting()
        dead = len(await components.store.notifications.dead_letters())
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response({"waiting_customers": customers, "dead_letters": dead})


async def recent(request: web.Request) -> web.Response:
    """The customer's latest notifications, newest first, as recorded (delivered or not)."""
    components = request.app[COMPONENTS]
    customer = request.match_info["customer"]
    namespace = namespace_of(components.holder.current)
    try:
        found = await components.store.notifications.recent(customer)
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response({"customer": customer, "notifications": [document(n, namespace) for n in found]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/notifications", waiting)
    app.router.add_get("/admin/notifications/dead-letters", dead_letters)
    app.router.add_post("/admin/notifications/dead-letters/redrive", redrive)
    app.router.add_get("/admin/customers/{customer}/notifications", recent)
