"""Shared fixtures: real peers on loopback (DNS, SMTP, siteverify), keys, settings, stores.

Tests never reach a public address: every resolver points at `dns_server`, every zone maps
names to 127.0.0.0/8, and the test domains end in `.test` (RFC 2606). The world itself (its
domains, addresses and zone) is `relay.sandbox.world`, shared with the benchmark.

With RELAY_STRICT_TESTS=1 (set by .ci/run) any skipped test is reported as a failure, so a
missing PostgreSQL, Redis or Chromium cannot pass CI silently.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import load_settings
from relay.sandbox.captcha import SiteverifyStub
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import MX_IP, SUPPORT_DOMAIN, relay_environment, world_zone
from relay.settings import Settings
from tests.peers.smtp import ScriptedHandler, SMTPPeer

STRICT = os.environ.get("RELAY_STRICT_TESTS") == "1"
POSTGRES_ADMIN_URL = os.environ.get(
    "RELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def unavailable(reason: str) -> None:
    """Skip for a missing service, or fail under RELAY_STRICT_TESTS=1."""
    if STRICT:
        pytest.fail(f"RELAY_STRICT_TESTS=1 and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"RELAY_STRICT_TESTS=1: skipped test counts as a failure: {report.longrepr}"
        )


@pytest.fixture(autouse=True)
def _isolate_relay_logger() -> Iterator[None]:
    """CLI commands call logs.configure(), which installs a stderr handler bound to the
    stream of that moment (CliRunner's, soon closed): restore the logger after each test."""
    logger = logging.getLogger("relay")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


# --- keys -----------------------------------------------------------------------------------


def _write_key(path: Path, pem: bytes) -> Path:
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def rsa_key_file(keys_dir: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _write_key(keys_dir / "dkim-rsa.pem", pem)


@pytest.fixture(scope="session")
def ed25519_key_file(keys_dir: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _write_key(keys_dir / "dkim-ed25519.pem", pem)


# --- DNS ------------------------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DNSZoneServer]:
    """An empty DNS server; tests add the zones they need."""
    with DNSZoneServer() as server:
        yield server


@pytest.fixture
def world_dns(
    dns_server: DNSZoneServer, rsa_key_file: Path, ed25519_key_file: Path
) -> DNSZoneServer:
    """The DNS server serving `world_zone` with both DKIM keys published."""
    dns_server.add(world_zone(rsa_key_file.read_bytes(), ed25519_key_file.read_bytes()))
    return dns_server


# --- SMTP -----------------------------------------------------------------------------------


@pytest.fixture
def mx_handler() -> ScriptedHandler:
    return ScriptedHandler()


@pytest.fixture
def mx_server(mx_handler: ScriptedHandler) -> Iterator[SMTPPeer]:
    """The support domain's MX (mx1.support.test = 127.0.0.2) on an ephemeral port."""
    with SMTPPeer(mx_handler, host=MX_IP, hostname=f"mx1.{SUPPORT_DOMAIN}") as peer:
        yield peer


@pytest.fixture(scope="session")
def tls_context_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """(server SSLContext, CA bundle path) from a throwaway trustme CA."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(f"mx1.{SUPPORT_DOMAIN}", MX_IP)
    import ssl

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return server_ctx, ca_path


# --- siteverify -------------------------------------------------------------------------------


@pytest.fixture
def siteverify() -> Iterator[SiteverifyStub]:
    with SiteverifyStub(hostname="localhost") as stub:
        yield stub


# --- settings -------------------------------------------------------------------------------


@pytest.fixture
def base_env(rsa_key_file: Path, tmp_path: Path) -> dict[str, str]:
    """A complete, valid RELAY_ environment for the test world (no DNS/SMTP ports yet)."""
    return {
        **relay_environment(dkim_key_file=rsa_key_file, instance_path=tmp_path / "instance"),
        "RELAY_DNS_TIMEOUT": "2",
        "RELAY_SMTP_CONNECT_TIMEOUT": "3",
        "RELAY_SMTP_TIMEOUT": "5",
        "RELAY_SMTP_DATA_TIMEOUT": "5",
        "RELAY_SECRET_KEY": "test-secret-key-" + "x" * 32,
    }


@pytest.fixture
def make_settings(base_env: dict[str, str]) -> Callable[..., Settings]:
    """make_settings(RELAY_SMTP_PORT="2525", ...) -> validated Settings (no .env, no os.environ)."""

    def make(**overrides: str) -> Settings:
        env = {**base_env}
        for key, value in overrides.items():
            name = key if key.startswith("RELAY_") else "RELAY_" + key.upper()
            env[name] = value
        return load_settings(env, env_file=None)

    return make


@pytest.fixture
def short(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, mx_server: SMTPPeer
) -> Callable[..., Settings]:
    """Settings for the world with short SMTP timeouts, plus overrides (a module that
    overrides `mx_server` gets its own server's port)."""

    def make(**overrides: str) -> Settings:
        env = {
            "RELAY_DNS_NAMESERVERS": world_dns.address,
            "RELAY_SMTP_PORT": str(mx_server.port),
            "RELAY_SMTP_CONNECT_TIMEOUT": "1",
            "RELAY_SMTP_TIMEOUT": "0.5",
            "RELAY_SMTP_DATA_TIMEOUT": "0.5",
            **overrides,
        }
        return make_settings(**env)

    return make


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, mx_server: SMTPPeer
) -> Settings:
    """Settings wired to the world DNS and the MX server."""
    return make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address, RELAY_SMTP_PORT=str(mx_server.port)
    )


# --- PostgreSQL and Redis -------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # psycopg.OperationalError, ImportError
        unavailable(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
        raise  # unreachable: unavailable() skips or fails
    name = "relay_t_" + uuid.uuid4().hex[:12]
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace(
            "postgresql://", "postgresql+psycopg://"
        )
        try:
            yield f"{base}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
        client.flushdb()
        client.close()
    except Exception as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Parametrises a test over both stores: SQLite in tmp_path and a fresh PostgreSQL DB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))
