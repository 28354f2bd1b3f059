"""The `sidecar` command line (SPEC §2): check, hash-key, usage; exit codes and what is printed."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main, usage_table
from sidecar.config.policy.loader import load_policy
from sidecar.store.redis.embedded import free_port
from tests.conftest import write_policy

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "policies"
GOOD = FIXTURES / "good.yaml"
MISSPELLED = FIXTURES / "bad_misspelled_limit_key.yaml"
LOCATED = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): (?P<path>[\w.\[\]-]+): (?P<message>.+)$")

# The usage document of SPEC §7, verbatim.
SPEC_USAGE = {
    "customer": "acme",
    "plan": "pro",
    "limits": [
        {"meter": "requests", "period": "month", "feature": None, "limit": 100000,
         "used": 1234, "remaining": 98766, "reset": "2026-12-01T00:00:00Z"},
        {"meter": "tokens", "period": "prepaid", "feature": None, "limit": 500,
         "used": 120, "remaining": 380, "reset": None},
    ],
}  # fmt: skip


# -- sidecar check ------------------------------------------------------------------------------


def test_check_good_policy_exits_0_with_one_summary_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(GOOD)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [load_policy(GOOD).summary()]
    assert "2 plans" in out
    assert "2 customers" in out
    assert err == ""


def test_check_bad_policy_exits_1_with_a_located_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(MISSPELLED)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{MISSPELLED}:13:27: plans.free.limits[0].limt: unknown key 'limt'; did you mean 'limit'?"
    ]


def test_check_prints_every_error_one_per_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(
        tmp_path,
        """
        version: 1
        meters:
          requests: {aggregation: avg}
        features:
          - {name: search, match: {method: FETCH, path: /v1/search}}
        plans:
          free:
            features: [search]
            limits:
              - {meter: requests, limit: 10, period: fortnight}
        """,
    )
    assert main(["check", str(policy)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3
    located = [LOCATED.match(line) for line in lines]
    assert all(located), lines
    assert {m["path"] for m in located if m} >= {
        "meters.requests.aggregation",
        "features[0].match.method",
        "plans.free.limits[0].period",
    }
    assert all(m["file"] == str(policy) for m in located if m)


def test_check_without_path_reads_sidecar_policies(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_POLICIES", str(GOOD))
    assert main(["check"]) == 0
    assert capsys.readouterr().out.startswith("policy OK")


def test_check_missing_file_exits_1_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["check", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err


# -- sidecar hash-key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("acme-key-1", "sha256:904fc520be4ca9db80d0ffcc6bf7e01b4148e33d45bb6b422ad2e607815fb508"),
        ("clé-ü-🔑", "sha256:" + hashlib.sha256("clé-ü-🔑".encode()).hexdigest()),
    ],
    ids=["good-yaml-acme", "non-ascii-utf8"],
)
def test_hash_key_prints_sha256_of_the_utf8_key(
    key: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hash-key", key]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_python_dash_m_sidecar_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "hash-key", "bob-key-1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "sha256:2d4fa1e14532d160f65b06e3af893c8b378463eb71d3468b5baa7991f5492fb3\n"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["frobnicate"])
    assert exited.value.code == 2
    assert "frobnicate" in capsys.readouterr().err


# -- sidecar usage -------------------------------------------------------------------------------


def test_usage_table_renders_the_spec_example_document() -> None:
    lines = usage_table(SPEC_USAGE).splitlines()
    assert lines[0].split() == ["customer", "acme", "plan", "pro"]
    assert [line.split() for line in lines[1:]] == [
        ["meter", "period", "feature", "limit", "used", "remaining", "reset"],
        ["requests", "month", "-", "100000", "1234", "98766", "2026-12-01T00:00:00Z"],
        ["tokens", "prepaid", "-", "500", "120", "380", "-"],
    ]


def test_usage_table_columns_are_aligned() -> None:
    header, *rows = usage_table(SPEC_USAGE).splitlines()[1:]
    offsets = [match.start() for match in re.finditer(r"\S+", header)]
    for row in rows:
        assert [match.start() for match in re.finditer(r"\S+", row)] == offsets


def test_usage_without_a_running_sidecar_exits_2_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["usage", "acme", "--admin", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err
    assert "sidecar run" in err
