"""The inspection page (SPEC §10) on the admin port: ``/ui/`` serves three files of plain HTML,
CSS and JavaScript (http/static/ui), no build step and nothing from elsewhere, under a strict
Content-Security-Policy (same-origin scripts, styles and fetches only; no inline code, no frames,
no forms posted anywhere). The page holds no data: it reads the bearer-guarded ``/admin/`` API
with the token the operator enters, kept in the tab's sessionStorage and sent only as an
Authorization header. ``GET /admin/billing/outbox`` (what waits and what is dead, for the page's
outbox view) is registered here too, under the admin token like every ``/admin/`` call.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.components import COMPONENTS

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
FILES = {
    "": ("index.html", "text/html"),
    "app.js": ("app.js", "text/javascript"),
    "app.css": ("app.css", "text/css"),
}


def _read(name: str) -> bytes:
    return resources.files("sidecar.http").joinpath("static", "ui", name).read_bytes()


async def page(request: web.Request) -> web.Response:
    """One of the page's files, with the security headers; anything else under /ui/ is 404."""
    entry = FILES.get(request.match_info.get("file", ""))
    if entry is None:
        return problems.problem(404, "Not Found", "no such file of the inspection page")
    name, content_type = entry
    return web.Response(
        body=_read(name), content_type=content_type, charset="utf-8", headers=SECURITY_HEADERS
    )


async def to_page(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/ui/")


async def outbox_summary(request: web.Request) -> web.Response:
    """Summaries waiting for billing (of up to 1,000 pending customers), billing dead letters,
    customers with notifications waiting, notification dead letters."""
    components = request.app[COMPONENTS]
    try:
        pending = await components.outbox.pending_summaries()
        billing_dead = len(await components.outbox.dead_letters())
        waiting = await components.store.notifications.waiting()
        notify_dead = len(await components.store.notifications.dead_letters())
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response(
        {
            "pending_summaries": pending,
            "billing_dead_letters": billing_dead,
            "notifications_waiting": waiting,
            "notification_dead_letters": notify_dead,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", to_page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/{file}", page)
    app.router.add_get("/admin/billing/outbox", outbox_summary)
