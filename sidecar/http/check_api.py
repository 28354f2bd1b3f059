"""POST /admin/customers/{id}/check: would a request (or usage records) be admitted now? The
question and its answer are admission/check.py's; this reads the body and answers."""

from __future__ import annotations

from aiohttp import web

from sidecar.admission.check import check, parse_question
from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.components import COMPONENTS
from sidecar.http.lookup import named_customer


async def post_check(request: web.Request) -> web.Response:
    """200 with ``allowed`` and the rows looked at; 404 unknown customer, 422 a bad body, 503
    when the store cannot be read. Records nothing."""
    customer = await named_customer(request)
    if isinstance(customer, web.Response):
        return customer
    components = request.app[COMPONENTS]
    policy = components.holder.current
    try:
        body = await request.json()
    except ValueError:
        body = None
    question = parse_question(body, policy)
    if isinstance(question, list):
        return problems.problem(422, "Invalid check", "nothing was checked", errors=question)
    try:
        answer = await check(policy, components.store, customer, question)
    except StoreUnavailable:
        components.metrics.store_errors.labels("read_limits").inc()
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    return web.json_response(answer)
