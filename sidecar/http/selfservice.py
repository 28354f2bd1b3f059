"""`GET /_sidecar/usage` on the proxy port: a customer reads its own usage with its own API key.

The `/_sidecar/` prefix belongs to the sidecar; such a path never reaches the upstream.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.admission.identity import identify
from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.admin import usage_answer
from sidecar.http.components import COMPONENTS

PATH = "/_sidecar/usage"


async def own_usage(request: web.Request) -> web.Response:
    components = request.app[COMPONENTS]
    policy = components.holder.current
    try:
        customer = await identify(request.headers, policy, components.directory)
    except StoreUnavailable:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    if customer is None:
        return problems.unauthorized(policy.identity.api_key_headers)
    return await usage_answer(components, policy, customer)
