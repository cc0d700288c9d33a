"""Configuration: every RELAY_ variable in one validated object; bad input fails listing all."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.config import load_settings
from relay.errors import ConfigError
from relay.logs import format_event
from relay.settings import (
    HCAPTCHA_TEST_SECRET,
    HCAPTCHA_TEST_SITEKEY,
    Nameserver,
    documented_variables,
    is_fqdn,
)

# The contract of issue 2: these names must exist exactly.
CONTRACT = """RELAY_SUPPORT_ADDRESS RELAY_FROM_ADDRESS RELAY_FROM_NAME RELAY_ENVELOPE_FROM
RELAY_HELO_HOSTNAME RELAY_DKIM_SELECTOR RELAY_DKIM_PRIVATE_KEY_FILE RELAY_DKIM_PRIVATE_KEY
RELAY_DKIM_DOMAIN RELAY_DKIM_ED25519_SELECTOR RELAY_DKIM_ED25519_KEY_FILE RELAY_DNS_NAMESERVERS
RELAY_SMTP_PORT RELAY_SMTP_TLS RELAY_SMARTHOST RELAY_SMARTHOST_USERNAME RELAY_SMARTHOST_PASSWORD
RELAY_RETRY_INITIAL RELAY_RETRY_MAX RELAY_RETRY_GIVE_UP RELAY_DATABASE_URL RELAY_SECRET_KEY
RELAY_HCAPTCHA_SITEKEY RELAY_HCAPTCHA_SECRET RELAY_HCAPTCHA_VERIFY_URL RELAY_ALLOWED_ORIGINS
RELAY_RATE_LIMIT RELAY_RATE_LIMIT_STORAGE RELAY_TRUSTED_PROXIES RELAY_WORKER_CONCURRENCY
RELAY_THANKS_URL""".split()  # noqa: SIM905


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def problems_of(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(env, env_file=None)
    return info.value.problems


def test_every_contract_variable_is_defined() -> None:
    assert set(CONTRACT) <= set(documented_variables())
    assert all(documented_variables().values()), "every variable has a description"


def test_valid_environment_loads_with_defaults(base_env: dict[str, str]) -> None:
    s = load_settings(base_env, env_file=None)
    assert s.support_address == "help@support.test"
    assert s.smtp_port == 25
    assert s.smtp_tls == "may"
    assert (s.retry_initial, s.retry_max, s.retry_give_up) == (300, 3600, 432000)
    assert s.envelope_sender == "form@relay.test"
    assert s.signing_domain == "relay.test"
    assert s.dkim_key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert s.sqlalchemy_url.startswith("sqlite:///")
    assert s.sqlalchemy_url.endswith("relay.sqlite3")
    assert s.warnings == []


def test_lists_are_parsed(base_env: dict[str, str]) -> None:
    env = {
        **base_env,
        "RELAY_DNS_NAMESERVERS": "127.0.0.1:5353, 10.0.0.53,[::1]:53",
        "RELAY_ALLOWED_ORIGINS": "https://www.example.test, http://localhost:8000",
        "RELAY_SMARTHOST": "smtp.example.test",
    }
    s = load_settings(env, env_file=None)
    assert s.dns_nameservers == [
        Nameserver("127.0.0.1", 5353),
        Nameserver("10.0.0.53", 53),
        Nameserver("::1", 53),
    ]
    assert s.allowed_origins == ["https://www.example.test", "http://localhost:8000"]
    assert s.smarthost_address == ("smtp.example.test", 587)


def test_every_problem_is_listed_by_variable_name(base_env: dict[str, str], tmp_path: Path) -> None:
    short = tmp_path / "short.pem"
    short.write_bytes(_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    short.chmod(0o600)
    env = {k: v for k, v in base_env.items() if k != "RELAY_SUPPORT_ADDRESS"}
    env.update(
        RELAY_HELO_HOSTNAME="localhost",
        RELAY_DKIM_PRIVATE_KEY_FILE=str(short),
        RELAY_SMTP_PORT="not-a-port",
        RELAY_SMTP_TLS="sometimes",
        RELAY_DNS_NAMESERVERS="resolver.example.test",
        RELAY_RETRY_INITIAL="7200",
    )
    problems = problems_of(env)
    text = "\n".join(problems)
    for var in (
        "RELAY_SUPPORT_ADDRESS: required",
        "RELAY_HELO_HOSTNAME",
        "RELAY_DKIM_PRIVATE_KEY_FILE: RSA key is 1024 bits",
        "RELAY_SMTP_PORT",
        "RELAY_SMTP_TLS",
        "RELAY_DNS_NAMESERVERS",
        "RELAY_RETRY_INITIAL / RELAY_RETRY_MAX / RELAY_RETRY_GIVE_UP",
    ):
        assert var in text, f"{var} missing from {problems}"


def test_key_problems(base_env: dict[str, str], tmp_path: Path) -> None:
    missing = problems_of({**base_env, "RELAY_DKIM_PRIVATE_KEY_FILE": str(tmp_path / "none.pem")})
    assert any(p.startswith("RELAY_DKIM_PRIVATE_KEY_FILE: cannot read") for p in missing)

    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    ec_key.chmod(0o600)
    assert any(
        "must be an RSA key" in p
        for p in problems_of({**base_env, "RELAY_DKIM_PRIVATE_KEY_FILE": str(ec_key)})
    )

    garbage = problems_of(
        {k: v for k, v in base_env.items() if k != "RELAY_DKIM_PRIVATE_KEY_FILE"}
        | {"RELAY_DKIM_PRIVATE_KEY": "not a key"}
    )
    assert any(p.startswith("RELAY_DKIM_PRIVATE_KEY: not an unencrypted PEM") for p in garbage)

    neither = problems_of({k: v for k, v in base_env.items() if k != "RELAY_DKIM_PRIVATE_KEY_FILE"})
    assert any("relay dkim keygen" in p for p in neither)

    half_ed = problems_of({**base_env, "RELAY_DKIM_ED25519_SELECTOR": "e1"})
    assert any("RELAY_DKIM_ED25519_SELECTOR / RELAY_DKIM_ED25519_KEY_FILE" in p for p in half_ed)


def test_memory_rate_limits_need_a_single_web_process(base_env: dict[str, str]) -> None:
    """memory:// counts in each process: with N of them the limit would be N times the
    documented one, so several processes need Redis (deploy/gunicorn.conf.py exports N)."""
    several = {**base_env, "RELAY_WEB_PROCESSES": "4"}
    [problem] = problems_of(several)
    assert problem.startswith("RELAY_RATE_LIMIT_STORAGE: memory://")
    assert "RELAY_WEB_PROCESSES=4" in problem
    shared = {**several, "RELAY_RATE_LIMIT_STORAGE": "redis://127.0.0.1:6379/0"}
    assert load_settings(shared, env_file=None).web_processes == 4
    assert load_settings(base_env, env_file=None).web_processes == 1


def test_pem_text_with_crlf_is_normalised(base_env: dict[str, str], rsa_key_file: Path) -> None:
    crlf = rsa_key_file.read_bytes().replace(b"\n", b"\r\n").decode()
    env = {k: v for k, v in base_env.items() if k != "RELAY_DKIM_PRIVATE_KEY_FILE"}
    s = load_settings({**env, "RELAY_DKIM_PRIVATE_KEY": crlf}, env_file=None)
    assert b"\r" not in s.dkim_key_pem
    assert s.dkim_key_pem == rsa_key_file.read_bytes().strip() + b"\n"


def test_warnings_do_not_stop_start(base_env: dict[str, str], rsa_key_file: Path) -> None:
    rsa_key_file.chmod(0o644)
    try:
        s = load_settings({**base_env, "RELAY_DKIM_DOMAIN": "other.test"}, env_file=None)
    finally:
        rsa_key_file.chmod(0o600)
    assert any("readable by others" in w for w in s.warnings)
    assert any("RELAY_DKIM_DOMAIN" in w and "DMARC" in w for w in s.warnings)


def test_production_requires_real_secrets(base_env: dict[str, str]) -> None:
    env = {
        **base_env,
        "RELAY_ENV": "production",
        "RELAY_HCAPTCHA_SITEKEY": HCAPTCHA_TEST_SITEKEY,
        "RELAY_HCAPTCHA_SECRET": HCAPTCHA_TEST_SECRET,
        "RELAY_SECRET_KEY": "short",
        "RELAY_ALLOWED_ORIGINS": "",
    }
    text = "\n".join(problems_of(env))
    assert "RELAY_HCAPTCHA_SITEKEY: hCaptcha's published test key" in text
    assert "RELAY_HCAPTCHA_SECRET: hCaptcha's published test secret" in text
    assert "RELAY_SECRET_KEY" in text
    assert "RELAY_ALLOWED_ORIGINS" in text
    # The same keys are fine in development.
    assert load_settings({**env, "RELAY_ENV": "development"}, env_file=None).env == "development"


def test_env_file_is_read_and_environment_wins(base_env: dict[str, str], tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("RELAY_SMTP_PORT=2525\nRELAY_FROM_NAME='From File'\n")
    s = load_settings({**base_env, "RELAY_FROM_NAME": "From Env"}, env_file=env_file)
    assert s.smtp_port == 2525
    assert s.from_name == "From Env"


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("mail.example.com", True),
        ("mail.example.com.", True),
        ("localhost", False),
        ("mail", False),
        ("127.0.0.1", False),
        ("mail_1.example.com", False),
        ("-bad.example.com", False),
        ("a.b.123", False),
    ],
)
def test_is_fqdn(name: str, ok: bool) -> None:
    assert is_fqdn(name) is ok


def test_log_event_format() -> None:
    line = format_event(
        "delivery.deferred", code=451, mx="mx1.support.test", text="try\nlater", x=None
    )
    assert line == 'delivery.deferred code=451 mx=mx1.support.test text="try\\nlater"'
