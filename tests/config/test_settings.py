"""Settings for `sidecar run` (SPEC §2): flag beats environment beats default; errors name the source."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from sidecar.config.settings import Address, Settings, build_settings
from sidecar.errors import SettingsInvalid


class Source(NamedTuple):
    field: str
    flag: str  # the argparse attribute, as in vars(args)
    variable: str
    flag_text: str
    env_text: str
    from_flag: Any
    from_env: Any
    default: Any


PRECEDENCE = [
    Source("listen", "listen", "SIDECAR_LISTEN", "127.0.0.1:7001", "127.0.0.1:7002",
           Address("127.0.0.1", 7001), Address("127.0.0.1", 7002), Address("0.0.0.0", 8000)),
    Source("upstream", "upstream", "SIDECAR_UPSTREAM", "http://flag.test:81", "https://env.test",
           "http://flag.test:81", "https://env.test", "http://127.0.0.1:8080"),
    Source("admin", "admin", "SIDECAR_ADMIN", "127.0.0.1:9101", "[::1]:9102",
           Address("127.0.0.1", 9101), Address("::1", 9102), Address("127.0.0.1", 9000)),
    Source("policies", "policies", "SIDECAR_POLICIES", "flag/policy.yaml", "env/policies",
           Path("flag/policy.yaml"), Path("env/policies"), Path("policies")),
    Source("redis_url", "redis", "SIDECAR_REDIS_URL", "redis://flag:6379/0", "unix:///tmp/env.sock",
           "redis://flag:6379/0", "unix:///tmp/env.sock", None),
    Source("data_dir", "data_dir", "SIDECAR_DATA_DIR", "flag-data", "env-data",
           Path("flag-data"), Path("env-data"), Path(".sidecar")),
    Source("upstream_timeout", "upstream_timeout", "SIDECAR_UPSTREAM_TIMEOUT", "3", "4.5", 3.0, 4.5, 30.0),
    Source("store_timeout", "store_timeout", "SIDECAR_STORE_TIMEOUT", "0.2", "0.3", 0.2, 0.3, 0.05),
    Source("drain_timeout", "drain_timeout", "SIDECAR_DRAIN_TIMEOUT", "5", "6", 5.0, 6.0, 30.0),
    Source("log_level", "log_level", "SIDECAR_LOG_LEVEL", "debug", "warning", "DEBUG", "WARNING", "INFO"),
    Source("max_header_size", "max_header_size", "SIDECAR_MAX_HEADER_SIZE", "16k", "65536",
           16384, 65536, 32768),
    Source("max_headers", "max_headers", "SIDECAR_MAX_HEADERS", "50", "200", 50, 200, 100),
    Source("max_body_size", "max_body_size", "SIDECAR_MAX_BODY_SIZE", "10MiB", "2g",
           10 * 1024**2, 2 * 1024**3, 1024**3),
    Source("header_timeout", "header_timeout", "SIDECAR_HEADER_TIMEOUT", "2.5", "20", 2.5, 20.0, 10.0),
    Source("body_timeout", "body_timeout", "SIDECAR_BODY_TIMEOUT", "5", "60", 5.0, 60.0, 30.0),
]  # fmt: skip
IDS = [source.field for source in PRECEDENCE]


@pytest.mark.parametrize("source", PRECEDENCE, ids=IDS)
def test_flag_beats_environment(source: Source) -> None:
    settings = build_settings({source.flag: source.flag_text}, {source.variable: source.env_text})
    assert getattr(settings, source.field) == source.from_flag


@pytest.mark.parametrize("source", PRECEDENCE, ids=IDS)
def test_environment_beats_default(source: Source) -> None:
    settings = build_settings({source.flag: None}, {source.variable: source.env_text})
    assert getattr(settings, source.field) == source.from_env


@pytest.mark.parametrize("source", PRECEDENCE, ids=IDS)
def test_default_applies_when_neither_is_given(source: Source) -> None:
    assert getattr(build_settings({source.flag: None}, {}), source.field) == source.default


def test_defaults_match_the_spec_table() -> None:
    settings = build_settings({}, {})
    assert (str(settings.listen), settings.upstream, str(settings.admin)) == (
        "0.0.0.0:8000",
        "http://127.0.0.1:8080",
        "127.0.0.1:9000",
    )
    assert (settings.policies, settings.data_dir) == (Path("policies"), Path(".sidecar"))
    assert settings.redis_url is None
    assert (settings.admin_token, settings.billing_secret) == (None, None)


def test_an_empty_environment_variable_counts_as_unset() -> None:
    assert build_settings({}, {"SIDECAR_LISTEN": ""}).listen == Address("0.0.0.0", 8000)


def test_secrets_come_from_the_environment() -> None:
    env = {"SIDECAR_ADMIN_TOKEN": "adm-tok", "SIDECAR_BILLING_SECRET": "bill-sec"}
    settings = build_settings({}, env)
    assert (settings.admin_token, settings.billing_secret) == ("adm-tok", "bill-sec")


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        ({"redis": "redis://n1.test:7000,n2.test:7001", "redis_cluster": True}, {}),
        ({"redis": "redis://n1.test:7000,n2.test:7001"}, {"SIDECAR_REDIS_CLUSTER": "true"}),
        ({}, {"SIDECAR_REDIS_URL": "redis://n1.test:7000,n2.test:7001", "SIDECAR_REDIS_CLUSTER": "yes"}),
    ],
    ids=["flag", "variable", "both-variables"],
)
def test_redis_cluster_marks_the_redis_url_as_a_clusters_startup_nodes(
    flags: dict[str, Any], env: dict[str, str]
) -> None:
    url = build_settings(flags, env).redis_url
    assert url == "redis://n1.test:7000,n2.test:7001?cluster=true"


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        ({"redis_cluster": True}, {}, "--redis-cluster"),
        ({}, {"SIDECAR_REDIS_CLUSTER": "true"}, "SIDECAR_REDIS_CLUSTER"),
    ],
    ids=["flag", "variable"],
)
def test_redis_cluster_without_a_redis_url_is_refused(
    flags: dict[str, Any], env: dict[str, str], named: str
) -> None:
    """The embedded store is one server: a cluster flag without nodes must not fall back to it."""
    with pytest.raises(SettingsInvalid, match=rf"{re.escape(named)}: a cluster needs --redis"):
        build_settings(flags, env)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://a.test:1,b.test:2", "several hosts are a cluster"),
        ("redis+sentinel://s.test:26379", "names the service"),
        ("redis+sentinel://s.test:26379/mymaster/zero", "is not a number"),
        ("redis://a.test:1/3?cluster=true", "only database 0"),
        ("unix:///tmp/r.sock?cluster=true", "reached over TCP"),
        ("redis+sentinel://s.test:26379/mymaster?cluster=true", "not both"),
        ("memcached://m.test:11211", "expected a redis://"),
    ],
    ids=[
        "hosts-without-cluster",
        "sentinel-no-service",
        "sentinel-bad-db",
        "cluster-db",
        "cluster-unix",
        "both",
        "scheme",
    ],
)
def test_a_redis_url_naming_no_usable_store_is_refused_with_the_reason(url: str, says: str) -> None:
    with pytest.raises(SettingsInvalid, match=rf"--redis=.*{re.escape(says)}"):
        build_settings({"redis": url}, {})


def test_a_refused_redis_url_never_shows_its_password() -> None:
    with pytest.raises(SettingsInvalid) as refused:
        build_settings({"redis": "redis://user:hunter2@a.test:1,b.test:2"}, {})
    assert "hunter2" not in str(refused.value)
    assert "user:***@a.test:1,b.test:2" in str(refused.value)


# -- every parser's error names the flag or variable and the bad value ---------------------------

BAD_VALUES = [
    ("listen", "SIDECAR_LISTEN", "127.0.0.1"),
    ("listen", "SIDECAR_LISTEN", "127.0.0.1:http"),
    ("listen", "SIDECAR_LISTEN", "127.0.0.1:0"),
    ("listen", "SIDECAR_LISTEN", "127.0.0.1:70000"),
    ("admin", "SIDECAR_ADMIN", "localhost:-1"),
    ("upstream", "SIDECAR_UPSTREAM", "ftp://files.test"),
    ("upstream", "SIDECAR_UPSTREAM", "127.0.0.1:8080"),
    ("upstream", "SIDECAR_UPSTREAM", "http://"),
    ("redis", "SIDECAR_REDIS_URL", "http://redis.test:6379"),
    ("redis", "SIDECAR_REDIS_URL", "localhost:6379"),
    ("upstream_timeout", "SIDECAR_UPSTREAM_TIMEOUT", "soon"),
    ("store_timeout", "SIDECAR_STORE_TIMEOUT", "0"),
    ("drain_timeout", "SIDECAR_DRAIN_TIMEOUT", "-5"),
    ("store_timeout", "SIDECAR_STORE_TIMEOUT", "nan"),
    ("log_level", "SIDECAR_LOG_LEVEL", "verbose"),
    ("max_header_size", "SIDECAR_MAX_HEADER_SIZE", "0"),
    ("max_header_size", "SIDECAR_MAX_HEADER_SIZE", "32 TB"),
    ("max_headers", "SIDECAR_MAX_HEADERS", "1.5"),
    ("max_body_size", "SIDECAR_MAX_BODY_SIZE", "-1"),
    ("max_body_size", "SIDECAR_MAX_BODY_SIZE", "lots"),
    ("header_timeout", "SIDECAR_HEADER_TIMEOUT", "0"),
    ("body_timeout", "SIDECAR_BODY_TIMEOUT", "soon"),
]
BAD_IDS = [f"{flag}={value}" for flag, _, value in BAD_VALUES]


@pytest.mark.parametrize(("flag", "variable", "value"), BAD_VALUES, ids=BAD_IDS)
def test_bad_flag_error_names_the_flag_and_the_value(flag: str, variable: str, value: str) -> None:
    with pytest.raises(SettingsInvalid) as caught:
        build_settings({flag: value}, {})
    message = str(caught.value)
    assert f"--{flag.replace('_', '-')}" in message
    assert repr(value) in message


@pytest.mark.parametrize(("flag", "variable", "value"), BAD_VALUES, ids=BAD_IDS)
def test_bad_environment_error_names_the_variable_and_the_value(flag: str, variable: str, value: str) -> None:
    with pytest.raises(SettingsInvalid) as caught:
        build_settings({}, {variable: value})
    message = str(caught.value)
    assert variable in message
    assert repr(value) in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://10.0.0.5:6379/0",
        "rediss://user:pw@redis.test:6380/1",
        "unix:///var/run/redis.sock",
        "redis+sentinel://s1.test:26379,s2.test:26379/mymaster/0",
        "rediss+sentinel://:pw@s1.test/mymaster?sentinel_password=spw",
        "redis://n1.test:7000,n2.test:7001?cluster=true",
    ],
    ids=["redis", "rediss", "unix", "sentinel", "sentinel-tls", "cluster"],
)
def test_every_redis_url_form_of_the_spec_is_accepted(url: str) -> None:
    assert build_settings({"redis": url}, {}).redis_url == url


def test_bad_redis_cluster_variable_is_named() -> None:
    with pytest.raises(SettingsInvalid, match=r"SIDECAR_REDIS_CLUSTER='maybe'"):
        build_settings({}, {"SIDECAR_REDIS_CLUSTER": "maybe"})


def test_a_good_flag_hides_a_bad_environment_value() -> None:
    assert build_settings({"listen": "127.0.0.1:7001"}, {"SIDECAR_LISTEN": "garbage"}).listen.port == 7001


# -- the admin port is not opened to the network without a token ---------------------------------


@pytest.mark.parametrize(
    ("flags", "env"),
    [({"admin": "0.0.0.0:9000"}, {}), ({"admin": "10.1.2.3:9000"}, {}), ({}, {"SIDECAR_ADMIN": "[::]:9000"})],
    ids=["any-ipv4", "private-ip", "any-ipv6-from-env"],
)
def test_non_loopback_admin_without_token_is_refused(flags: dict[str, str], env: dict[str, str]) -> None:
    with pytest.raises(SettingsInvalid) as caught:
        build_settings(flags, env)
    message = str(caught.value)
    assert "--admin" in message
    assert "SIDECAR_ADMIN_TOKEN" in message


def test_non_loopback_admin_with_token_is_accepted() -> None:
    settings = build_settings({"admin": "0.0.0.0:9000"}, {"SIDECAR_ADMIN_TOKEN": "s3cret"})
    assert settings.admin == Address("0.0.0.0", 9000)


@pytest.mark.parametrize("admin", ["127.0.0.1:9000", "127.8.9.10:9000", "localhost:9000", "[::1]:9000"])
def test_loopback_admin_needs_no_token(admin: str) -> None:
    assert build_settings({"admin": admin}, {}).admin.is_loopback


# -- secrets never show ------------------------------------------------------------------------


def test_repr_never_shows_the_admin_token_or_billing_secret() -> None:
    env = {"SIDECAR_ADMIN_TOKEN": "adm-tok-93a1", "SIDECAR_BILLING_SECRET": "bill-sec-77f2"}
    settings = build_settings({"admin": "0.0.0.0:9000"}, env)
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert "adm-tok-93a1" not in text
        assert "bill-sec-77f2" not in text
        assert "admin_token=***" in text
        assert "listen=" in text


def test_repr_shows_unset_secrets_as_none() -> None:
    assert "admin_token=None" in repr(Settings())
