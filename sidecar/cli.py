"""`sidecar run | check | hash-key | usage | customers import`: argument parsing, printing and exit
codes, no logic."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from sidecar import __version__
from sidecar.admission.identity import hash_key
from sidecar.config.policy.loader import load_policy
from sidecar.errors import EmbeddedStoreFailed, PolicyInvalid, SettingsInvalid
from sidecar.runtime import loops

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
IMPORT_TIMEOUT = 600  # seconds an import may take (a million lines take well under a minute)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.command(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Entitlement and quota enforcement sidecar.")
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_run(commands)
    check = commands.add_parser("check", help="validate policy files")
    check.add_argument("path", nargs="?", default=os.environ.get("SIDECAR_POLICIES", "policies"))
    check.set_defaults(command=check_command)
    hashing = commands.add_parser("hash-key", help="print sha256:<hex> of an API key for the policy file")
    hashing.add_argument("key")
    hashing.set_defaults(command=hash_key_command)
    usage = commands.add_parser("usage", help="show a customer's limits, used, remaining and reset")
    usage.add_argument("customer")
    usage.add_argument("--admin", default=os.environ.get("SIDECAR_ADMIN", "127.0.0.1:9000"))
    usage.add_argument("--json", action="store_true", help="print the usage document as JSON")
    usage.set_defaults(command=usage_command)
    _add_customers(commands)
    return parser


def _add_customers(commands: Any) -> None:
    customers = commands.add_parser("customers", help="stored customers, through the admin API")
    actions = customers.add_subparsers(required=True, metavar="ACTION")
    importing = actions.add_parser(
        "import", help="import customers from NDJSON (a document with its id a line)"
    )
    importing.add_argument("file")
    importing.add_argument("--admin", default=os.environ.get("SIDECAR_ADMIN", "127.0.0.1:9000"))
    importing.set_defaults(command=import_command)


def _add_run(commands: Any) -> None:
    run = commands.add_parser("run", help="serve the proxy and the admin port")
    _add_run_flags(run)
    run.set_defaults(command=run_command, demo=False)
    demo = commands.add_parser("demo", help="`run`, with a demo product API started on the upstream address")
    _add_run_flags(demo)
    demo.set_defaults(command=run_command, demo=True)


def _add_run_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("--listen", help="proxy address HOST:PORT (SIDECAR_LISTEN, default 0.0.0.0:8000)")
    run.add_argument("--upstream", help="upstream base URL (SIDECAR_UPSTREAM, default http://127.0.0.1:8080)")
    run.add_argument("--admin", help="admin address HOST:PORT (SIDECAR_ADMIN, default 127.0.0.1:9000)")
    run.add_argument("--policies", help="policy file or directory (SIDECAR_POLICIES, default policies/)")
    run.add_argument(
        "--redis",
        help="redis://, rediss://, unix:// or redis+sentinel:// URL, cluster=true for a cluster "
        "(SIDECAR_REDIS_URL); default: an embedded redis-server",
    )
    run.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis names Redis Cluster nodes (SIDECAR_REDIS_CLUSTER)",
    )
    run.add_argument("--data-dir", help="embedded store data (SIDECAR_DATA_DIR, default .sidecar/)")
    run.add_argument("--upstream-timeout", help="seconds to wait for the upstream (default 30)")
    run.add_argument("--store-timeout", help="seconds to wait for the store (default 0.05)")
    run.add_argument("--drain-timeout", help="seconds in-flight requests get on shutdown (default 30)")
    run.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    run.add_argument(
        "--log-format", help="text or json, one object a line (SIDECAR_LOG_FORMAT, default text)"
    )
    run.add_argument("--max-header-size", help="bytes of request line and headers, else 431 (default 32k)")
    run.add_argument("--max-headers", help="header fields per request, else 431 (default 100)")
    run.add_argument("--max-body-size", help="bytes of request body, else 413 (default 1g)")
    run.add_argument("--header-timeout", help="seconds a request head may take to arrive (default 10)")
    run.add_argument(
        "--body-timeout", help="seconds a request body may go without a byte arriving (default 30)"
    )
    run.add_argument("--workers", help="processes sharing the proxy port (SIDECAR_WORKERS, default 1)")
    run.add_argument("--loop", help="event loop: asyncio or uvloop (SIDECAR_LOOP, default asyncio)")


def run_command(args: argparse.Namespace) -> int:
    from sidecar.config.policy.holder import PolicyHolder
    from sidecar.config.settings import build_settings
    from sidecar.http.intake import require_c_parser
    from sidecar.runtime import logs
    from sidecar.runtime.demo import serve_demo
    from sidecar.runtime.server import serve
    from sidecar.runtime.workers import run_workers

    try:
        settings = build_settings(vars(args), os.environ)
        require_c_parser()
        logs.configure(settings.log_level, settings.log_format)
        holder = PolicyHolder.load(settings.policies)
        if settings.workers > 1 and not args.demo:
            return run_workers(settings, holder)
        loops.run((serve_demo if args.demo else serve)(settings, holder), settings.loop)
    except (SettingsInvalid, EmbeddedStoreFailed) as error:
        print(f"sidecar: {error}", file=sys.stderr)
        return EXIT_USAGE
    except PolicyInvalid as invalid:
        print(invalid, file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def check_command(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.path)
    except PolicyInvalid as invalid:
        print(invalid, file=sys.stderr)
        return EXIT_INVALID
    print(policy.summary())
    return EXIT_OK


def hash_key_command(args: argparse.Namespace) -> int:
    print(f"sha256:{hash_key(args.key)}")
    return EXIT_OK


def usage_command(args: argparse.Namespace) -> int:
    """Asks the running sidecar's admin API, which works for the embedded and external stores alike."""
    url = f"http://{args.admin}/admin/customers/{args.customer}/usage"
    request = urllib.request.Request(url)
    token = os.environ.get("SIDECAR_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            document = json.load(response)
    except urllib.error.HTTPError as error:
        print(f"sidecar: {url}: {error.code} {_detail(error)}", file=sys.stderr)
        return EXIT_INVALID
    except (urllib.error.URLError, OSError) as error:
        print(
            f"sidecar: cannot reach the admin API at {args.admin} ({error}); is `sidecar run` up?",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(json.dumps(document, indent=2) if args.json else usage_table(document))
    return EXIT_OK


def import_command(args: argparse.Namespace) -> int:
    """Streams FILE to the running sidecar's POST /admin/customers/import; prints every refused
    line as FILE:LINE: problems, then the counts. Exit 1 when a line was refused."""
    url = f"http://{args.admin}/admin/customers/import"
    try:
        report = _post_file(url, args.file)
    except urllib.error.HTTPError as error:
        print(f"sidecar: {url}: {error.code} {_detail(error)}", file=sys.stderr)
        return EXIT_INVALID
    except urllib.error.URLError as error:
        print(
            f"sidecar: cannot reach the admin API at {args.admin} ({error}); is `sidecar run` up?",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except OSError as error:
        print(f"sidecar: {args.file}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    for refused in report["errors"]:
        print(f"{args.file}:{refused['line']}: {'; '.join(refused['errors'])}", file=sys.stderr)
    counts = f"{report['lines']} lines, {report['bad']} refused"
    print(f"{report['imported']} customers imported from {args.file} ({counts})")
    return EXIT_INVALID if report["bad"] else EXIT_OK


def _post_file(url: str, path: str) -> dict[str, Any]:
    with open(path, "rb") as body:
        headers = {
            "Content-Type": "application/x-ndjson",
            "Content-Length": str(os.fstat(body.fileno()).st_size),
        }
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        token = os.environ.get("SIDECAR_ADMIN_TOKEN")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=IMPORT_TIMEOUT) as response:
            report: dict[str, Any] = json.load(response)
    return report


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.load(error).get("detail", error.reason))
    except ValueError:
        return str(error.reason)


def usage_table(document: dict[str, Any]) -> str:
    header = ("meter", "period", "feature", "limit", "used", "remaining", "reset")
    rows = [header] + [
        tuple("-" if row[name] is None else str(row[name]) for name in header) for row in document["limits"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join([f"customer {document['customer']}  plan {document['plan']}", *lines])
