"""`--workers` and `--loop`: flag beats environment beats default; bad values are named."""

from __future__ import annotations

import importlib.util

import pytest

from sidecar.config.settings import build_settings
from sidecar.errors import SettingsInvalid
from sidecar.runtime import loops

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_workers_default_to_one_and_the_flag_beats_the_environment() -> None:
    assert build_settings({}, {}).workers == 1
    assert build_settings({}, {"SIDECAR_WORKERS": "3"}).workers == 3
    assert build_settings({"workers": "2"}, {"SIDECAR_WORKERS": "3"}).workers == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_worker_count_names_the_flag_and_the_value(value: str) -> None:
    with pytest.raises(SettingsInvalid, match=f"--workers={value!r}: expected a whole number above 0"):
        build_settings({"workers": value}, {})


def test_the_loop_defaults_to_asyncio() -> None:
    assert build_settings({}, {}).loop == "asyncio"
    assert build_settings({}, {"SIDECAR_LOOP": "AsyncIO"}).loop == "asyncio"


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(SettingsInvalid, match="SIDECAR_LOOP='trio': expected asyncio or uvloop"):
        build_settings({}, {"SIDECAR_LOOP": "trio"})


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
def test_uvloop_is_taken_when_installed() -> None:
    assert build_settings({"loop": "uvloop"}, {}).loop == "uvloop"
    assert loops.run(_loop_name(), "uvloop").startswith("uvloop")


@pytest.mark.skipif(HAS_UVLOOP, reason="uvloop is installed")
def test_uvloop_without_the_extra_says_how_to_install_it() -> None:
    with pytest.raises(SettingsInvalid, match=r"pip install 'quota-sidecar\[uvloop\]'"):
        build_settings({"loop": "uvloop"}, {})


def test_asyncio_runs_the_standard_loop() -> None:
    assert loops.run(_loop_name(), "asyncio").startswith("asyncio")


async def _loop_name() -> str:
    import asyncio

    return type(asyncio.get_running_loop()).__module__
