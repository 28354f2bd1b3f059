"""`GET /_sidecar/usage` on the proxy port: a customer reads its own usage with its own API key.

The `/_sidecar/` prefix belongs to the sidecar; such a path never reaches the upstream.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.http.admin import usage_answer
from sidecar.http.components import COMPONENTS
from sidecar.http.lookup import own_customer

PATH = "/_sidecar/usage"


async def own_usage(request: web.Request) -> web.Response:
    customer = await own_customer(request)
    if isinstance(customer, web.Response):
        return customer
    components = request.app[COMPONENTS]
    return await usage_answer(components, components.holder.current, customer)
