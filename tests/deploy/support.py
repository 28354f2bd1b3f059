"""What the deploy tests share: the repository's deploy files, the operators' tools, a real sidecar.

The tools (kubernetes-validate, checkov, hadolint, promtool) are installed by .ci/deploy-tools.sh.
A test whose tool is missing is skipped, naming it, unless SIDECAR_REQUIRE_TOOLS=1 (CI), where a
missing tool fails the test instead.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "quota-sidecar.json"
RULES = DEPLOY / "prometheus" / "quota-sidecar-rules.yaml"
DOCKERFILE = REPO / "Dockerfile"

REQUIRE_TOOLS = os.environ.get("SIDECAR_REQUIRE_TOOLS") == "1"
TOOLS_BIN = Path(os.environ.get("DEPLOY_TOOLS_DIR", "/opt/deploy-tools")) / "bin"
TOOL_TIMEOUT = 180
INSTALL_HINT = "`bash .ci/deploy-tools.sh` installs it"

# A request over loopback that ignores any HTTP proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def missing(reason: str) -> NoReturn:
    """Skip for want of a tool; fail instead when SIDECAR_REQUIRE_TOOLS=1."""
    if REQUIRE_TOOLS:
        pytest.fail(f"{reason} (SIDECAR_REQUIRE_TOOLS=1)")
    pytest.skip(reason)


def find_tool(name: str) -> str:
    """The tool in this interpreter's venv, else in $DEPLOY_TOOLS_DIR/bin, else on PATH."""
    for directory in (Path(sys.executable).parent, TOOLS_BIN):
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} not found in {Path(sys.executable).parent}, {TOOLS_BIN} or PATH: {INSTALL_HINT}")
    return found


def run_tool(
    argv: Sequence[str], *, stdin: str | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, cwd=cwd, timeout=TOOL_TIMEOUT, check=False
    )


def tool_version(argv: Sequence[str]) -> str:
    done = run_tool(argv)
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[Path]:
    """Every Kubernetes manifest in deploy/kubernetes (kustomization.yaml is kustomize's, not one)."""
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> list[dict[str, Any]]:
    return [doc for path in manifests() for doc in load_documents(path)]


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found in deploy/kubernetes"
    return found[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with _DIRECT.open(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.read().decode()


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


# --- A real upstream and a real `sidecar run` ----------------------------------------------------


class _Answer(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    """A plain HTTP server on loopback answering 200 to everything; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def sidecar_command() -> list[str]:
    script = Path(sys.executable).parent / "sidecar"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sidecar"]


def child_environment(**extra: str) -> dict[str, str]:
    """This environment without any SIDECAR_* setting (a developer's own would change the test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env


@dataclass
class RunningSidecar:
    process: subprocess.Popen[bytes]
    proxy_port: int
    admin_port: int
    log: Path

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"sidecar exited {self.process.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(OSError):
                if http_get(f"{self.admin}/readyz")[0] == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"sidecar not ready within {timeout}s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; the whole process group (the sidecar and its redis-server) is
        killed if it has not exited by then."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            pytest.fail(f"sidecar did not exit within {timeout}s of SIGTERM:\n{self.log.read_text()}")


@contextlib.contextmanager
def sidecar_process(
    argv_prefix: Sequence[str],
    upstream_url: str,
    policies: Path,
    data_dir: Path,
    log: Path,
    env: dict[str, str] | None = None,
) -> Iterator[RunningSidecar]:
    """`<argv_prefix> run` on free loopback ports, in its own session so that it and the
    redis-server it starts can be stopped together; stopped with SIGTERM on the way out."""
    proxy_port, admin_port = free_port(), free_port()
    argv = [
        *argv_prefix,
        "run",
        "--upstream",
        upstream_url,
        "--listen",
        f"127.0.0.1:{proxy_port}",
        "--admin",
        f"127.0.0.1:{admin_port}",
        "--data-dir",
        str(data_dir),
        "--policies",
        str(policies),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else child_environment(),
            cwd=REPO,
            start_new_session=True,
        )
    running = RunningSidecar(process, proxy_port, admin_port, log)
    try:
        yield running
    finally:
        running.stop()


# --- PromQL, as far as the tests need to read it -------------------------------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names, label values or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(1)
        following = text[match.end() :].lstrip()[:1]
        if name.lower() in _KEYWORDS or following == "(":
            continue
        names.add(name)
    return names


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names matched) for every `metric{...}` selector in an expression."""
    found = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2)))
        found.append((match.group(1), labels))
    return found


def grouping(expr: str) -> list[tuple[set[str], str]]:
    """(label names, the expression they group) for every `by (labels) (expression)`."""
    found = []
    for match in re.finditer(r"\bby\s*\(([^)]*)\)\s*\(", expr):
        depth, start = 1, match.end()
        end = start
        while depth and end < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[end], 0)
            end += 1
        labels = {label.strip() for label in match.group(1).split(",") if label.strip()}
        found.append((labels, expr[start : end - 1]))
    return found
