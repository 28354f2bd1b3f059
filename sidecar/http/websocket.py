"""WebSocket upgrades: admitted like any request, then relayed both ways, message by message.

The sidecar is a WebSocket endpoint to each side (aiohttp's server socket to the client, its
client socket to the upstream), because each hop has its own masking, compression and pings:
messages are relayed whole, pings are answered on each hop, and a close on one side closes the
other with the same code. A message larger than MAX_MESSAGE closes both sides (1009).

Costs are charged by admission, at the upgrade. Measured meters are charged when the socket
closes: ``response.bytes`` is the payload bytes relayed upstream→client, ``request.bytes`` the
payload bytes relayed client→upstream, ``response.duration_ms`` the life of the socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.admission.verdict import Verdict
from sidecar.config.policy.model import Policy
from sidecar.http import problems
from sidecar.http.components import SESSION, Components
from sidecar.http.headers import connection_listed
from sidecar.http.metering import Tally, charge_response

log = logging.getLogger("sidecar.http.websocket")

MAX_MESSAGE = 4 * 1024 * 1024  # aiohttp's default on both sides: a relayed message is held whole
SWITCHING = 101
# Negotiated on each hop by its own endpoint, never passed through.
_HANDSHAKE_FIELDS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_ENDS = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def wants_websocket(request: web.Request) -> bool:
    """A WebSocket opening handshake (RFC 6455 §4.1). Other upgrades (h2c) are not taken: their
    Upgrade field is dropped as hop-by-hop and the request is forwarded as plain HTTP/1.1."""
    headers = request.headers
    return (
        request.method == "GET"
        and headers.get("Upgrade", "").strip().lower() == "websocket"
        and "upgrade" in connection_listed(headers)
    )


def bad_handshake(request: web.Request) -> web.Response | None:
    """400 for a handshake aiohttp could not complete (key, version), before admission charges it."""
    # Offered subprotocols listed, or aiohttp logs a warning that none overlaps, for every socket.
    if web.WebSocketResponse(protocols=_offered(request)).can_prepare(request).ok:
        return None
    return problems.bad_request("not a valid WebSocket opening handshake (RFC 6455 section 4.1)")


async def relay(
    request: web.Request,
    components: Components,
    admitted: tuple[Policy, Verdict],
    tally: Tally,
    outbound: CIMultiDict[str],
    fields: Mapping[str, str],
) -> web.StreamResponse:
    """Open the upstream socket, then the client's, relay until either closes, and charge the
    measured meters then, also when the handler is cancelled."""
    status = SWITCHING
    try:
        upstream = await _connect(request, components, outbound)
        if isinstance(upstream, web.Response):
            status = upstream.status
            return upstream
        async with upstream:
            return await _accept(request, upstream, tally, fields)
    finally:
        policy, verdict = admitted
        # A failed upstream (5xx, none at all) settles nothing, as for HTTP: reservations are released.
        exchange = tally.exchange(request.headers, _NO_HEADERS, status) if status < 500 else None
        await asyncio.shield(charge_response(components, policy, verdict, exchange))


async def _connect(
    request: web.Request, components: Components, outbound: CIMultiDict[str]
) -> aiohttp.ClientWebSocketResponse | web.Response:
    """The upstream's socket, or the answer the client gets when there is none."""
    offered = _offered(request)
    for name in _HANDSHAKE_FIELDS:
        outbound.popall(name, None)
    url = URL(components.settings.upstream + request.rel_url.raw_path_qs, encoded=True)
    try:
        return await request.app[SESSION].ws_connect(
            url, headers=outbound, protocols=offered, max_msg_size=MAX_MESSAGE
        )
    except aiohttp.WSServerHandshakeError as error:
        # The upstream answered, but not with an upgrade: its error status is passed on.
        status = error.status if error.status >= 400 else 502
        detail = f"the upstream did not accept the WebSocket upgrade (status {error.status})"
        return problems.problem(status, "WebSocket upgrade not accepted", detail)
    except TimeoutError:
        components.metrics.upstream_errors.labels("timeout").inc()
        return problems.gateway_timeout("the upstream did not answer in time")
    except aiohttp.ClientError as error:
        components.metrics.upstream_errors.labels("refused").inc()
        return problems.bad_gateway(f"the upstream is unreachable ({type(error).__name__})")


def _offered(request: web.Request) -> list[str]:
    """The subprotocols the client offers, in its order of preference."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    return [name.strip() for name in offered.split(",") if name.strip()]


async def _accept(
    request: web.Request, upstream: aiohttp.ClientWebSocketResponse, tally: Tally, fields: Mapping[str, str]
) -> web.StreamResponse:
    """Answer the client's handshake with the subprotocol the upstream chose, then relay."""
    chosen = upstream.protocol
    client = web.WebSocketResponse(protocols=(chosen,) if chosen else (), max_msg_size=MAX_MESSAGE)
    client.headers.extend(fields)
    try:
        await client.prepare(request)
    except ConnectionError:
        log.debug("client left before the WebSocket upgrade on %s", request.path)
        return client
    upward = asyncio.create_task(_pump(client, upstream, tally, to_client=False))
    downward = asyncio.create_task(_pump(upstream, client, tally, to_client=True))
    await asyncio.gather(upward, downward)
    return client


async def _pump(source: Socket, sink: Socket, tally: Tally, *, to_client: bool) -> None:
    """Relay one direction until its source closes, then close the sink with the same code (which
    also ends the other direction, whose source the sink is)."""
    try:
        async for message in source:
            if message.type in _ENDS:
                break
            size = await _send(sink, message)
            if to_client:
                tally.response_bytes += size
            else:
                tally.request_bytes += size
    except (ConnectionError, aiohttp.ClientError) as error:
        log.debug("WebSocket relay ended: %s", type(error).__name__)
    finally:
        await sink.close(code=_passable(source.close_code))


async def _send(sink: Socket, message: aiohttp.WSMessage) -> int:
    """Send one data message on; its payload size in bytes (0 for control messages)."""
    if message.type is WSMsgType.TEXT:
        text: str = message.data
        await sink.send_str(text)
        return len(text.encode())
    if message.type is WSMsgType.BINARY:
        data: bytes = message.data
        await sink.send_bytes(data)
        return len(data)
    return 0


def _passable(code: int | None) -> int:
    """The source's close code, when it may be sent in a close frame (RFC 6455 §7.4: not 1005,
    1006 or 1015, which only report that none came); else 1001, going away."""
    if code is None or code in (1005, 1006, 1015) or not 1000 <= code < 5000:
        return int(WSCloseCode.GOING_AWAY)
    return code
