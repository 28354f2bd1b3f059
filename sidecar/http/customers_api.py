"""The admin API's customer calls (SPEC §7): list, get, put, delete (and purge), add and revoke a
key, and the NDJSON import. Thin: parse the request, ask the directory
(admission/customers.py), answer. A key is only ever shown as its ``sha256:`` hash.

Answers: 200/201 when done; 404 for a customer (or key) that is not stored; 409 for a key that
belongs to another customer; 422 for a body that is not a valid document, naming every problem;
400 for a bad query parameter; 503 when the store does not answer (nothing is half-written: a
write that failed may be sent again).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidecar.admission.customer_import import import_ndjson
from sidecar.admission.customer_input import CUSTOMER_ID, key_conflict, parse_customer, parse_key_hash
from sidecar.admission.customers import Listed
from sidecar.config.policy.model import Customer
from sidecar.errors import StoreUnavailable
from sidecar.http import problems
from sidecar.http.components import COMPONENTS
from sidecar.store.port import Deleted, WriteResult, Written

DEFAULT_PAGE = 100
MAX_PAGE = 1000
NDJSON = ("application/x-ndjson", "application/jsonl", "application/ndjson")
_ID_PREFIX = re.compile(r"[A-Za-z0-9._:@-]{0,128}")
_PLAN = re.compile(r"[a-z][a-z0-9_]{0,62}")
Handler = Callable[[web.Request], Awaitable[web.Response]]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/customers", list_customers)
    app.router.add_post("/admin/customers/import", import_customers)
    app.router.add_get("/admin/customers/{customer}", get_customer)
    app.router.add_put("/admin/customers/{customer}", put_customer)
    app.router.add_delete("/admin/customers/{customer}", delete_customer)
    app.router.add_post("/admin/customers/{customer}/keys", add_key)
    app.router.add_delete("/admin/customers/{customer}/keys/{key}", revoke_key)


def answers_503(handler: Handler) -> Handler:
    """StoreUnavailable from a customer call becomes 503 with Retry-After."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except StoreUnavailable:
            request.app[COMPONENTS].metrics.store_errors.labels("customers").inc()
            return problems.unavailable(problems.STORE_RETRY_AFTER)

    return wrapped


@answers_503
async def list_customers(request: web.Request) -> web.Response:
    """A page of customers in id order, with the cursor of the next page (null: the last)."""
    components = request.app[COMPONENTS]
    query = request.query
    limit = _limit(query.get("limit"))
    prefix, cursor, plan = query.get("prefix", ""), query.get("cursor", ""), query.get("plan") or None
    bad = _query_problems(limit, prefix, cursor, plan)
    if bad:
        return problems.problem(400, "Bad Request", "; ".join(bad))
    page = await components.directory.page(
        components.holder.current, prefix=prefix, cursor=cursor, limit=int(limit or 0), plan=plan
    )
    return web.json_response({"customers": [_row(item) for item in page.customers], "cursor": page.cursor})


@answers_503
async def get_customer(request: web.Request) -> web.Response:
    """One customer's document: key hashes, never keys."""
    components = request.app[COMPONENTS]
    customer_id = request.match_info["customer"]
    found = await components.directory.find(customer_id, components.holder.current)
    if found is None:
        return _no_customer(customer_id)
    return web.json_response({**document(found.customer), "source": found.source})


@answers_503
async def put_customer(request: web.Request) -> web.Response:
    """Create or replace a stored customer; every replica serves the change within a second."""
    components = request.app[COMPONENTS]
    policy = components.holder.current
    parsed = parse_customer(request.match_info["customer"], await _json(request), policy)
    if isinstance(parsed, list):
        return problems.problem(422, "Invalid customer", "the customer was not stored", errors=parsed)
    (result,) = await components.directory.put([parsed], policy)
    if result.outcome is not Written.STORED:
        errors = _write_problems(result)
        return problems.problem(422, "Invalid customer", "the customer was not stored", errors=errors)
    components.denials.forget(parsed.id)
    return web.json_response({"customer": parsed.id, "plan": parsed.plan, "stored": True})


@answers_503
async def delete_customer(request: web.Request) -> web.Response:
    """Delete a stored customer (``?purge=true``: and erase its data once billed)."""
    components = request.app[COMPONENTS]
    customer_id = request.match_info["customer"]
    purge = request.query.get("purge", "false")
    if purge not in ("true", "false"):
        return problems.problem(400, "Bad Request", "purge must be true or false")
    deleted = await components.directory.delete(customer_id, purge=purge == "true")
    if deleted is Deleted.NOT_FOUND:
        return _no_customer(customer_id)
    components.denials.forget(customer_id)
    answer: dict[str, Any] = {"customer": customer_id, "deleted": True}
    if purge == "true":
        answer["purge"] = "scheduled"
    if customer_id in components.holder.current.customers:
        answer["policy_customer"] = "the policy files define this id: their entry serves it again"
    return web.json_response(answer, status=202 if purge == "true" else 200)


@answers_503
async def add_key(request: web.Request) -> web.Response:
    """Add one key (``{"api_key": "sha256:<hex>"}``): 201 added, 200 when it had it already."""
    components = request.app[COMPONENTS]
    customer_id = request.match_info["customer"]
    body = await _json(request)
    unknown = (
        [f"unknown field '{str(name)[:64]}'" for name in body if name != "api_key"]
        if isinstance(body, dict)
        else []
    )
    key_hash = parse_key_hash(body.get("api_key") if isinstance(body, dict) else None)
    if isinstance(key_hash, list) or unknown:
        errors = unknown + (key_hash if isinstance(key_hash, list) else [])
        return problems.problem(422, "Invalid key", "the key was not added", errors=errors)
    result = await components.directory.add_key(customer_id, key_hash, components.holder.current)
    if result.outcome is Written.NOT_FOUND:
        return _no_customer(customer_id)
    if result.outcome is Written.CONFLICT:
        return problems.problem(
            409, "Conflict", f"api_key already belongs to customer '{result.owners[0][1]}'"
        )
    if result.outcome is Written.SLOW:
        return problems.unavailable(problems.STORE_RETRY_AFTER)
    status = 201 if result.outcome is Written.STORED else 200
    return web.json_response(
        {"customer": customer_id, "api_key": f"sha256:{key_hash}", "status": result.outcome.value},
        status=status,
    )


@answers_503
async def revoke_key(request: web.Request) -> web.Response:
    """Revoke one key, named by its hash; it stops working on every replica within a second."""
    components = request.app[COMPONENTS]
    customer_id = request.match_info["customer"]
    key_hash = parse_key_hash(request.match_info["key"], "the key in the path")
    if isinstance(key_hash, list):
        return problems.problem(422, "Invalid key", "the key was not revoked", errors=key_hash)
    result = await components.directory.revoke_key(customer_id, key_hash)
    if result.outcome is Written.NOT_FOUND:
        return problems.problem(404, "Not Found", f"customer '{customer_id}' has no such stored key")
    components.denials.forget(customer_id)
    return web.json_response({"customer": customer_id, "api_key": f"sha256:{key_hash}", "revoked": True})


@answers_503
async def import_customers(request: web.Request) -> web.Response:
    """NDJSON, one document with its ``id`` a line; answers the counts and every bad line."""
    components = request.app[COMPONENTS]
    if request.content_type not in NDJSON:
        detail = f"send the customers as application/x-ndjson, not {request.content_type}"
        return problems.problem(415, "Unsupported Media Type", detail)
    chunks = request.content.iter_any()
    report = await import_ndjson(chunks, components.holder.current, components.directory)
    return web.json_response(report.answer())


def document(customer: Customer) -> dict[str, Any]:
    """A customer as the admin API shows it (the PUT body's fields, with its id)."""
    anchor = customer.billing_anchor
    return {
        "id": customer.id,
        "plan": customer.plan,
        "api_keys": [f"sha256:{h}" for h in customer.api_key_hashes],
        "billing_anchor": anchor.isoformat() if anchor else None,
        "stripe_customer_id": customer.stripe_customer_id,
        "lago_subscription_id": customer.lago_subscription_id,
    }


def _row(item: Listed) -> dict[str, Any]:
    customer = item.customer
    return {
        "id": customer.id,
        "plan": customer.plan,
        "keys": len(customer.api_key_hashes),
        "source": item.source,
    }


def _limit(value: str | None) -> int | None:
    if value is None:
        return DEFAULT_PAGE
    return int(value) if value.isdigit() and 1 <= int(value) <= MAX_PAGE else None


def _query_problems(limit: int | None, prefix: str, cursor: str, plan: str | None) -> list[str]:
    bad = [] if limit is not None else [f"limit must be a whole number from 1 to {MAX_PAGE}"]
    if not _ID_PREFIX.fullmatch(prefix):
        bad.append("prefix must be the start of a customer id (letters, digits and . _ : @ -)")
    if cursor and not CUSTOMER_ID.fullmatch(cursor):
        bad.append("cursor must be a cursor this API returned")
    if plan is not None and not _PLAN.fullmatch(plan):
        bad.append("plan must be a plan name")
    return bad


def _write_problems(result: WriteResult) -> list[str]:
    if result.outcome is Written.CONFLICT:
        return [key_conflict(index, owner) for index, owner in result.owners]
    return ["the store took too long to take the write; send it again"]


async def _json(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError:
        return None


def _no_customer(customer_id: str) -> web.Response:
    return problems.problem(404, "Not Found", f"no stored customer '{customer_id[:140]}'")
