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
from sidecar.admission.identity import identify
from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.components import COMPONENTS, Components

SELF_PATH = "/_sidecar/history"


async def customer_history(request: web.Request) -> web.Response:
    components, customer_id = request.app[COMPONENTS], request.match_info["customer"]
    try:
        customer = await components.directory.customer(customer_id, components.holder.current)
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    if customer is None:
        return problems.problem(404, "Not Found", f"no customer '{customer_id}'")
    return await history_answer(components, customer.id, request.query)


async def own_history(request: web.Request) -> web.Response:
    components = request.app[COMPONENTS]
    policy = components.holder.current
    try:
        customer = await identify(request.headers, policy, components.directory)
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    if customer is None:
        return problems.unauthorized(policy.identity.api_key_headers)
    return await history_answer(components, customer.id, request.query)


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
