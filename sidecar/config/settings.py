"""Settings for `sidecar run`, built once from flags and SIDECAR_* variables; a flag wins.

Every error names the flag or variable, the bad value and what was expected. Secrets (the admin
token, the billing secret) come from the environment only, so they never show in `ps`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sidecar.config.redis_url import RedisTarget, TopologyInvalid
from sidecar.errors import SettingsInvalid


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    listen: Address = Address("0.0.0.0", 8000)
    upstream: str = "http://127.0.0.1:8080"
    admin: Address = Address("127.0.0.1", 9000)
    policies: Path = Path("policies")
    redis_url: str | None = None
    data_dir: Path = Path(".sidecar")
    admin_token: str | None = None
    billing_secret: str | None = None
    billing_token: str | None = None
    upstream_timeout: float = 30.0
    store_timeout: float = 0.05
    drain_timeout: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object a line (runtime/logs.py)
    # Hostile input (guard.py, connection.py): the request line and header fields together, the
    # number of header fields, a request body, and the time a request head may take to arrive.
    max_header_size: int = 32 * 1024
    max_headers: int = 100
    max_body_size: int = 1024**3
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # Processes serving the proxy port together (SO_REUSEPORT); worker 0 also serves the admin port.
    workers: int = 1
    loop: str = "asyncio"  # or "uvloop" (the optional extra), see loops.py

    def __repr__(self) -> str:
        """Never show the secrets: settings get logged at startup."""
        hidden = {"admin_token", "billing_secret", "billing_token"}
        fields = (
            f"{name}={'***' if name in hidden and getattr(self, name) else repr(getattr(self, name))}"
            for name in self.__dataclass_fields__
        )
        return f"Settings({', '.join(fields)})"


def parse_address(value: str, name: str) -> Address:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsInvalid(f"{name}={value!r}: expected HOST:PORT, e.g. 127.0.0.1:9000")
    return Address(host.strip("[]") or "0.0.0.0", int(port))


def parse_http_url(value: str, name: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsInvalid(f"{name}={value!r}: expected an http:// or https:// URL")
    return value.rstrip("/")


def parse_redis_url(value: str, name: str) -> str:
    try:
        RedisTarget.parse(value)
    except TopologyInvalid as error:
        raise SettingsInvalid(f"{name}={_without_password(value)!r}: {error}") from None
    return value


def _without_password(url: str) -> str:
    """A URL fit for an error message: a password in it is a secret (README, Security)."""
    parts = urlsplit(url)
    credentials, at, location = parts.netloc.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{location}"))


def _as_cluster(url: str | None, name: str) -> str:
    """--redis-cluster: the --redis URL, marked as a cluster's startup nodes."""
    if url is None:
        raise SettingsInvalid(f"{name}: a cluster needs --redis (or SIDECAR_REDIS_URL) naming its nodes")
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="&".join(filter(None, (parts.query, "cluster=true")))))


def parse_seconds(value: str, name: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SettingsInvalid(f"{name}={value!r}: expected a number of seconds above 0")
    return seconds


_SIZE = re.compile(r"([0-9]+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: str, name: str) -> int:
    """Bytes: a whole number, optionally with a binary unit (``65536``, ``64k``, ``10MiB``, ``1g``)."""
    match = _SIZE.fullmatch(value.strip())
    if match is None or int(match[1]) == 0:
        raise SettingsInvalid(f"{name}={value!r}: expected a size in bytes above 0, e.g. 65536, 64k or 10MiB")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def parse_count(value: str, name: str) -> int:
    if not re.fullmatch(r"[0-9]+", value.strip()) or int(value) == 0:
        raise SettingsInvalid(f"{name}={value!r}: expected a whole number above 0")
    return int(value)


LOOPS = ("asyncio", "uvloop")  # runtime/loops.py runs the one named


def loop_available(name: str) -> bool:
    return name == "asyncio" or (name == "uvloop" and importlib.util.find_spec("uvloop") is not None)


def parse_log_format(value: str, name: str) -> str:
    log_format = value.strip().lower()
    if log_format not in ("text", "json"):
        raise SettingsInvalid(f"{name}={value!r}: expected text or json")
    return log_format


def parse_loop(value: str, name: str) -> str:
    loop = value.strip().lower()
    if loop not in LOOPS:
        raise SettingsInvalid(f"{name}={value!r}: expected asyncio or uvloop")
    if not loop_available(loop):
        raise SettingsInvalid(
            f"{name}={value!r}: uvloop is not installed; pip install 'quota-sidecar[uvloop]'"
        )
    return loop


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("1", "0", "true", "false", "yes", "no"):
        raise SettingsInvalid(f"{name}={value!r}: expected true or false")
    return lowered in ("1", "true", "yes")


def parse_level(value: str, name: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsInvalid(f"{name}={value!r}: expected DEBUG, INFO, WARNING or ERROR")
    return level


def _text(value: str, name: str) -> str:
    return value


def _path(value: str, name: str) -> Path:
    return Path(value)


# (field, flag attribute, environment variable, parser); secrets have no flag.
_SOURCES: tuple[tuple[str, str | None, str, Callable[[str, str], Any]], ...] = (
    ("listen", "listen", "SIDECAR_LISTEN", parse_address),
    ("upstream", "upstream", "SIDECAR_UPSTREAM", parse_http_url),
    ("admin", "admin", "SIDECAR_ADMIN", parse_address),
    ("policies", "policies", "SIDECAR_POLICIES", _path),
    ("redis_url", "redis", "SIDECAR_REDIS_URL", _text),
    ("redis_cluster", None, "SIDECAR_REDIS_CLUSTER", parse_bool),
    ("data_dir", "data_dir", "SIDECAR_DATA_DIR", _path),
    ("admin_token", None, "SIDECAR_ADMIN_TOKEN", _text),
    ("billing_secret", None, "SIDECAR_BILLING_SECRET", _text),
    ("billing_token", None, "SIDECAR_BILLING_TOKEN", _text),
    ("upstream_timeout", "upstream_timeout", "SIDECAR_UPSTREAM_TIMEOUT", parse_seconds),
    ("store_timeout", "store_timeout", "SIDECAR_STORE_TIMEOUT", parse_seconds),
    ("drain_timeout", "drain_timeout", "SIDECAR_DRAIN_TIMEOUT", parse_seconds),
    ("log_level", "log_level", "SIDECAR_LOG_LEVEL", parse_level),
    ("log_format", "log_format", "SIDECAR_LOG_FORMAT", parse_log_format),
    ("max_header_size", "max_header_size", "SIDECAR_MAX_HEADER_SIZE", parse_size),
    ("max_headers", "max_headers", "SIDECAR_MAX_HEADERS", parse_count),
    ("max_body_size", "max_body_size", "SIDECAR_MAX_BODY_SIZE", parse_size),
    ("header_timeout", "header_timeout", "SIDECAR_HEADER_TIMEOUT", parse_seconds),
    ("body_timeout", "body_timeout", "SIDECAR_BODY_TIMEOUT", parse_seconds),
    ("workers", "workers", "SIDECAR_WORKERS", parse_count),
    ("loop", "loop", "SIDECAR_LOOP", parse_loop),
)


def build_settings(flags: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """Resolve every setting: the flag if given, else the variable if set, else the default."""
    values: dict[str, Any] = {}
    named: dict[str, str] = {}  # field → the flag or variable its value came from
    for field, flag, variable, parse in _SOURCES:
        flag_value = flags.get(flag) if flag else None
        if flag and flag_value is not None:
            named[field] = f"--{flag.replace('_', '-')}"
            values[field] = parse(str(flag_value), named[field])
        elif env.get(variable):
            named[field] = variable
            values[field] = parse(env[variable], variable)
    if flags.get("redis_cluster"):
        named["redis_cluster"] = "--redis-cluster"
    if flags.get("redis_cluster") or values.pop("redis_cluster", False):
        values["redis_url"] = _as_cluster(values.get("redis_url"), named["redis_cluster"])
    if "redis_url" in values:  # checked once the cluster flag has had its say
        values["redis_url"] = parse_redis_url(values["redis_url"], named["redis_url"])
    settings = Settings(**values)
    _check_admin_exposure(settings)
    return settings


def _check_admin_exposure(settings: Settings) -> None:
    if not settings.admin.is_loopback and not settings.admin_token:
        raise SettingsInvalid(
            f"--admin {settings.admin} is not a loopback address: set SIDECAR_ADMIN_TOKEN "
            "so the admin API is not open to the network"
        )
