"""The Dockerfile: hadolint and checkov clean, a build context with what it copies, and the image's
promise, run read-only as non-root with a working health check.

No Docker daemon is assumed. The last test runs the image's command the way the image would:
as UID 10001 with no capabilities, every mount read-only but a tmpfs data dir, the image's
environment, in a mount namespace of its own (`unshare`, as root); then the image's HEALTHCHECK.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.deploy.support import (
    DOCKERFILE,
    REPO,
    child_environment,
    find_tool,
    http_get,
    missing,
    run_tool,
    sidecar_process,
    upstream,
)

IMAGE_UID = 10001


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    start = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[start:]


def image_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            for part in shlex.split(rest):
                key, _, value = part.partition("=")
                env[key] = value
    return env


def healthcheck() -> list[str]:
    [check] = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    exec_form = check[check.index("CMD") + 3 :].strip()
    return list(json.loads(exec_form))


# --- hadolint and checkov ------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = find_tool("hadolint")
    done = run_tool([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_checkov_passes_on_the_dockerfile() -> None:
    checkov = find_tool("checkov")
    done = run_tool(
        [
            checkov,
            "--file",
            str(DOCKERFILE),
            "--framework",
            "dockerfile",
            "--quiet",
            "--compact",
            "--skip-download",
            "--output",
            "json",
        ]
    )
    report = json.loads(done.stdout)
    assert report["summary"]["failed"] == 0, json.dumps(report["results"].get("failed_checks"), indent=1)
    assert report["summary"]["passed"] > 0


# --- What the image is ---------------------------------------------------------------------------


def test_the_image_runs_as_a_high_uid_with_a_health_check_and_the_sidecar_command() -> None:
    stage = dict(final_stage())
    assert stage["USER"].split(":")[0] == str(IMAGE_UID)
    assert json.loads(stage["ENTRYPOINT"]) == ["sidecar"] and json.loads(stage["CMD"]) == ["run"]
    assert healthcheck()[:2] == ["python", "-c"]
    env = image_environment()
    assert env["SIDECAR_DATA_DIR"] == "/data" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert json.loads(stage["VOLUME"]) == [env["SIDECAR_DATA_DIR"]]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex.replace(r"\?", "[^/]"), candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def build_context() -> set[str]:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return {path for path in tracked if not dockerignore_excludes(path, patterns)}


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    context = build_context()
    sources = [
        source
        for word, rest in instructions()
        if word == "COPY" and "--from" not in rest
        for source in rest.split()[:-1]
    ]
    for source in sources:
        assert any(path == source or path.startswith(source.rstrip("/") + "/") for path in context), source
    assert "sidecar/cli.py" in context and "pyproject.toml" in context
    assert not [path for path in context if path.startswith(("tests/", "deploy/", "bench/", ".ci/"))]
    assert not [path for path in context if "__pycache__" in path]


# --- Read-only, non-root, and the health check ---------------------------------------------------


def hidden_ancestor(path: Path) -> Path | None:
    """The topmost directory above `path` that other users cannot enter (e.g. /root)."""
    for parent in reversed(path.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def namespace_script(data: Path, stage: Path, command: list[str], env: dict[str, str]) -> str:
    """Shell, run as root in a new mount namespace: make the interpreter, the venv and the
    repository visible to UID 10001 (an image has them in world-readable places), mount a tmpfs
    on the data dir, make every other mount read-only, then drop to UID 10001 without any
    capability and exec the command with the script's arguments."""
    needed = sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix), REPO}, key=lambda p: len(p.parts))
    lines = ["set -eu"]
    for hidden in sorted({h for p in needed if (h := hidden_ancestor(p))}):
        inside = [p for p in needed if hidden in p.parents]
        for n, path in enumerate(inside):
            lines += [f"mkdir -p {stage}/{n}", f"mount --bind {shlex.quote(str(path))} {stage}/{n}"]
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(str(hidden))}")
        for n, path in enumerate(inside):
            lines += [
                f"mkdir -p {shlex.quote(str(path))}",
                f"mount --bind {stage}/{n} {shlex.quote(str(path))}",
            ]
    lines += [
        f"mount -t tmpfs -o uid={IMAGE_UID},gid={IMAGE_UID},mode=0700,size=64m"
        f" tmpfs {shlex.quote(str(data))}",
        # Every mount read-only but the kernel's own and the data dir.
        "awk '{print $5}' /proc/self/mountinfo | while read -r target; do",
        f'  case "$target" in /proc*|/sys*|/dev|/dev/pts*|/dev/mqueue*|{data}) continue ;; esac',
        '  mount -o remount,bind,ro "$target" 2>/dev/null || true',
        "done",
        "touch /probe-write 2>/dev/null && { echo 'root filesystem still writable' >&2; exit 3; }",
        "cd /",
        "exec setpriv --reuid {0} --regid {0} --clear-groups --inh-caps=-all --bounding-set=-all "
        '--no-new-privs -- env -i {1} {2} "$@"'.format(
            IMAGE_UID,
            " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()),
            " ".join(shlex.quote(part) for part in command),
        ),
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def world_readable_tempdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="quota-sidecar-image-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_sidecar_runs_read_only_as_uid_10001_and_the_health_check_passes() -> None:
    if os.geteuid() != 0:
        missing("running as another user needs root (CI runs as root)")
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            missing(f"{tool} (util-linux) not found")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30, check=False)
    if probe.returncode != 0:
        missing(f"unshare --mount is not permitted here: {probe.stderr.decode().strip()}")

    with world_readable_tempdir() as work, upstream() as upstream_url:
        (work / "data").mkdir()
        (work / "stage").mkdir()
        env = {
            **image_environment(),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "SIDECAR_POLICIES": str(REPO / "policies"),
            "SIDECAR_DATA_DIR": str(work / "data"),
        }
        script = work / "enter.sh"
        # sidecar_process appends `run --upstream … --data-dir … --policies …` to this prefix.
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", str(script)]
        command = [str(Path(sys.executable).parent / "sidecar")]
        script.write_text(namespace_script(work / "data", work / "stage", command, env))
        with sidecar_process(
            prefix,
            upstream_url,
            REPO / "policies",
            work / "data",
            work / "sidecar.log",
            env=child_environment(),
        ) as sidecar:
            sidecar.wait_ready()
            assert http_get(f"{sidecar.proxy}/hello", headers={"X-API-Key": "demo-key"})[0] == 200
            check = [sys.executable if part == "python" else part for part in healthcheck()]
            done = subprocess.run(
                check,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env={**child_environment(), "SIDECAR_ADMIN": f"127.0.0.1:{sidecar.admin_port}"},
            )
            assert done.returncode == 0, done.stderr
            status = Path(f"/proc/{sidecar.process.pid}/status").read_text()  # unshare, sh, setpriv exec it
            assert re.search(rf"^Uid:\s+{IMAGE_UID}\s+{IMAGE_UID}\s", status, re.M), status
            assert re.search(r"^CapEff:\s+0+$", status, re.M), status
            stopped = sidecar.stop()
        log = (work / "sidecar.log").read_text()
        assert stopped == 0, log
        assert "Read-only file system" not in log and "Permission denied" not in log, log
