"""Who a handler is answering for: the customer an admin path names, or the one whose key came
with a self-service request. Each gives the customer, or the answer to send instead, so every
handler answers an unreachable store (503), an unknown id (404) and a missing key (401) alike."""

from __future__ import annotations

from aiohttp import web

from sidecar.admission.identity import identify
from sidecar.config.policy.model import Customer
from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.components import COMPONENTS


async def named_customer(request: web.Request) -> Customer | web.Response:
    """The customer of ``{customer}`` in the path, or 503 when the store cannot be read, 404 when
    no policy file or stored entry has that id."""
    components, customer_id = request.app[COMPONENTS], request.match_info["customer"]
    try:
        customer = await components.directory.customer(customer_id, components.holder.current)
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    if customer is None:
        return problems.problem(404, "Not Found", f"no customer '{customer_id}'")
    return customer


async def own_customer(request: web.Request) -> Customer | web.Response:
    """The customer whose API key came with the request, or 503 when the store cannot be read,
    401 when there is no key or nobody has it."""
    components = request.app[COMPONENTS]
    policy = components.holder.current
    try:
        customer = await identify(request.headers, policy, components.directory)
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    if customer is None:
        return problems.unauthorized(policy.identity.api_key_headers)
    return customer
