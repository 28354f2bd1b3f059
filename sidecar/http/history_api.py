"""Usage history on both ports (SPEC §7): ``GET /admin/customers/{id}/history`` on the admin port,
and ``GET /_sidecar/history`` on the proxy port, where a customer reads its own with its own key.

Both take ``meter``, ``feature``, ``from``, ``to`` and ``step`` (admission/history.py); a bad
parameter is 400 with every problem, an unknown customer 404, an unreachable store 503. A
customer with no history (or none kept any more) answers an empty list of windows.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from sidecar.admission.history import history_document, parse_query
from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.components import COMPONENTS, Components
from sidecar.http.lookup import named_customer, own_customer

SELF_PATH = "/_sidecar/history"


async def customer_history(request: web.Request) -> web.Response:
    customer = await named_customer(request)
    if isinstance(customer, web.Response):
        return customer
    return await history_answer(request.app[COMPONENTS], customer.id, request.query)


async def own_history(request: web.Request) -> web.Response:
    customer = await own_customer(request)
    if isinstance(customer, web.Response):
        return customer
    return await history_answer(request.app[COMPONENTS], customer.id, request.query)


async def history_answer(components: Components, customer_id: str, params: Mapping[str, str]) -> web.Response:
    """The history document, 400 for a bad query, 503 when the store cannot be read."""
    policy = components.holder.current
    query = parse_query(params, components.store.time(), policy.history_days)
    if isinstance(query, list):
        return problems.problem(400, "Bad Request", "the history query is invalid", errors=query)
    try:
        document = await history_document(policy, components.store.history, customer_id, query)
    except StoreUnavailable:
        components.metrics.store_errors.labels("history").inc()
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response(document)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/customers/{customer}/history", customer_history)
