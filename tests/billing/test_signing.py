"""Sidecar-Signature (SPEC §6): t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">, checked in constant time."""

from __future__ import annotations

import re

import pytest

from sidecar.billing.signing import HEADER, signature, verify

SECRET = "whsec_test"
BODY = b'{"summaries":[]}'
T = 1767225600  # 2026-01-01T00:00:00Z
# Cross-checked with: printf '1767225600.{"summaries":[]}' | openssl dgst -sha256 -hmac whsec_test
KNOWN_V1 = "2720917d445208e0613b7dfb2c5930bd9d8d969565fc96b1d06cfe66dc426eb4"


def case(name: str, *values: object) -> object:
    return pytest.param(*values, id=name)


def test_header_name_is_the_spec_one() -> None:
    assert HEADER == "Sidecar-Signature"


def test_known_answer() -> None:
    assert signature(SECRET, BODY, T) == f"t={T},v1={KNOWN_V1}"


def test_layout() -> None:
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", signature(SECRET, BODY, T))


@pytest.mark.parametrize(
    "secret, body, timestamp",
    [
        case("same", SECRET, BODY, T),
        case("empty-body", SECRET, b"", T),
        case("binary-body", SECRET, bytes(range(256)), T),
        case("unicode-secret", "sécret-ü", BODY, T),
        case("zero-time", SECRET, BODY, 0),
    ],
)
def test_round_trip(secret: str, body: bytes, timestamp: int) -> None:
    assert verify(secret, signature(secret, body, timestamp), body)


@pytest.mark.parametrize(
    "secret, body, timestamp",
    [
        case("other-body", SECRET, b'{"summaries":[1]}', T),
        case("other-secret", "whsec_other", BODY, T),
        case("other-timestamp", SECRET, BODY, T + 1),
    ],
)
def test_signature_changes_with_each_input(secret: str, body: bytes, timestamp: int) -> None:
    assert signature(secret, body, timestamp) != signature(SECRET, BODY, T)


GOOD = f"t={T},v1={KNOWN_V1}"


@pytest.mark.parametrize(
    "header, body, secret",
    [
        case("tampered-body", GOOD, b'{"summaries":[{}]}', SECRET),
        case("wrong-secret", GOOD, BODY, "whsec_other"),
        case("tampered-timestamp", f"t={T + 1},v1={KNOWN_V1}", BODY, SECRET),
        case("timestamp-rewritten-equal", f"t=0{T},v1={KNOWN_V1}", BODY, SECRET),
        case("tampered-mac", f"t={T},v1={KNOWN_V1[:-1]}5", BODY, SECRET),
        case("uppercase-mac", f"t={T},v1={KNOWN_V1.upper()}", BODY, SECRET),
        case("truncated-mac", f"t={T},v1={KNOWN_V1[:32]}", BODY, SECRET),
        case("empty", "", BODY, SECRET),
        case("garbage", "garbage", BODY, SECRET),
        case("no-mac", f"t={T}", BODY, SECRET),
        case("no-timestamp", f"v1={KNOWN_V1}", BODY, SECRET),
        case("two-timestamps", f"t={T},t={T},v1={KNOWN_V1}", BODY, SECRET),
        case("negative-timestamp", f"t=-{T},v1={KNOWN_V1}", BODY, SECRET),
        case("non-numeric-timestamp", f"t=abc,v1={KNOWN_V1}", BODY, SECRET),
        case("unicode-digits", f"t=\u00b2,v1={KNOWN_V1}", BODY, SECRET),
        case("non-ascii-mac", f"t={T},v1=é{KNOWN_V1[1:]}", BODY, SECRET),
        case("only-other-scheme", f"t={T},v2={KNOWN_V1}", BODY, SECRET),
    ],
)
def test_verify_rejects(header: str, body: bytes, secret: str) -> None:
    assert verify(secret, header, body) is False


@pytest.mark.parametrize(
    "header",
    [
        case("exact", GOOD),
        case("spaces-after-commas", f"t={T}, v1={KNOWN_V1}"),
        case("rotation-second-mac-valid", f"t={T},v1={'0' * 64},v1={KNOWN_V1}"),
        case("unknown-scheme-ignored", f"t={T},v1={KNOWN_V1},v2=whatever"),
    ],
)
def test_verify_accepts(header: str) -> None:
    assert verify(SECRET, header, BODY) is True
