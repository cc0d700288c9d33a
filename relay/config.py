"""All configuration, read and validated in one place (the model of each variable is
relay.settings).

Settings come from `RELAY_*` environment variables, then a `.env` file (the environment wins).
`load_settings()` fails with a `ConfigError` that lists *every* problem by variable name, so
an operator fixes a bad deployment in one pass; problems that do not stop us (DMARC alignment
across domains, a key file others can read) are kept in `Settings.warnings`.

Nothing here performs network I/O. Key files are read so that an unusable key fails at start,
not at the first delivery.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dotenv import dotenv_values
from email_validator import EmailNotValidError, validate_email
from pydantic import ValidationError

from relay import formdefs, holdrules
from relay.errors import ConfigError
from relay.settings import (
    DERIVED,
    HCAPTCHA_TEST_SECRET,
    HCAPTCHA_TEST_SITEKEY,
    PREFIX,
    Settings,
    domain_of,
    env_var,
    is_fqdn,
)


def _aligned(a: str, b: str) -> bool:
    """DMARC relaxed alignment, approximated without a public-suffix list: one domain is the
    other or a subdomain of it."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _collect(environ: Mapping[str, str]) -> dict[str, str]:
    fields = set(Settings.model_fields) - DERIVED
    values: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith(PREFIX) and key[len(PREFIX) :].lower() in fields and value != "":
            values[key[len(PREFIX) :].lower()] = value
    return values


def _check_address(value: str, var: str, problems: list[str], *, test_domains: bool) -> None:
    try:
        validate_email(value, check_deliverability=False, test_environment=test_domains)
    except EmailNotValidError as exc:
        problems.append(f"{var}: {value!r} is not a valid address ({exc})")


def _read_key(path: Path, var: str, problems: list[str], warnings: list[str]) -> bytes | None:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        problems.append(f"{var}: cannot read {path}: {exc.strerror or exc}")
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"{var}: {path} is readable by others (mode {mode & 0o777:o}); chmod 600")
    return data


def normalise_pem(data: bytes) -> bytes:
    """dkimpy rejects a PEM with CRLF line endings; accept it from operators anyway."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").strip() + b"\n"


def _private_key(pem: bytes, var: str, problems: list[str]) -> Any:
    """The parsed private key, or None with the problem noted."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        problems.append(f"{var}: not an unencrypted PEM private key ({exc})")
        return None


def _check_rsa(pem: bytes, var: str, problems: list[str]) -> None:
    key = _private_key(pem, var, problems)
    if key is None:
        return
    if not isinstance(key, rsa.RSAPrivateKey):
        problems.append(f"{var}: must be an RSA key (use RELAY_DKIM_ED25519_KEY_FILE for Ed25519)")
    elif key.key_size < 2048:
        problems.append(f"{var}: RSA key is {key.key_size} bits; at least 2048 are required")


def _check_ed25519(pem: bytes, var: str, problems: list[str]) -> None:
    key = _private_key(pem, var, problems)
    if key is not None and not isinstance(key, ed25519.Ed25519PrivateKey):
        problems.append(f"{var}: must be an Ed25519 key")


def hcaptcha_test_keys(settings: Settings) -> list[str]:
    """The RELAY_ variables that hold hCaptcha's published test keys (which pass every token)."""
    secret = settings.hcaptcha_secret.get_secret_value() if settings.hcaptcha_secret else None
    found = []
    if settings.hcaptcha_sitekey == HCAPTCHA_TEST_SITEKEY:
        found.append("RELAY_HCAPTCHA_SITEKEY")
    if secret == HCAPTCHA_TEST_SECRET:
        found.append("RELAY_HCAPTCHA_SECRET")
    return found


def hcaptcha_key_problems(settings: Settings) -> list[str]:
    """The one rule for hCaptcha keys: outside development both are required and neither may
    be a published test key (in development, test and demo, missing keys default to them)."""
    if settings.is_development:
        return []
    problems = []
    test_keys = hcaptcha_test_keys(settings)
    if not settings.hcaptcha_sitekey:
        problems.append("RELAY_HCAPTCHA_SITEKEY: required in production")
    elif "RELAY_HCAPTCHA_SITEKEY" in test_keys:
        problems.append(
            "RELAY_HCAPTCHA_SITEKEY: hCaptcha's published test key accepts everyone; "
            "refused outside development"
        )
    if settings.hcaptcha_secret is None:
        problems.append("RELAY_HCAPTCHA_SECRET: required in production")
    elif "RELAY_HCAPTCHA_SECRET" in test_keys:
        problems.append(
            "RELAY_HCAPTCHA_SECRET: hCaptcha's published test secret accepts everyone; "
            "refused outside development"
        )
    return problems


def hcaptcha_keys(settings: Settings) -> tuple[str, str]:
    """(sitekey, secret) to use: the configured ones, or in development the published test
    keys; ConfigError where hcaptcha_key_problems finds any."""
    problems = hcaptcha_key_problems(settings)
    if problems:
        raise ConfigError(problems)
    secret = settings.hcaptcha_secret.get_secret_value() if settings.hcaptcha_secret else None
    return settings.hcaptcha_sitekey or HCAPTCHA_TEST_SITEKEY, secret or HCAPTCHA_TEST_SECRET


def _environment(environ: Mapping[str, str] | None, env_file: str | Path | None) -> dict[str, str]:
    """The .env file's values, overridden by the environment's."""
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return merged


def _parse(values: dict[str, str], problems: list[str]) -> tuple[Settings, set[str]]:
    """Settings from the values, and the fields that were invalid (each a problem). The
    valid fields are kept, so every other problem can be reported too."""
    try:
        return Settings.model_validate(values), set()
    except ValidationError as exc:
        bad: set[str] = set()
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            bad.add(field)
            if error["type"] == "missing":
                problems.append(f"{env_var(field)}: required")
            else:
                problems.append(f"{env_var(field)}: {error['msg']}")
        required = {n for n, f in Settings.model_fields.items() if f.is_required()}
        partial = {k: v for k, v in values.items() if k not in bad}
        partial.update(dict.fromkeys(required & bad, "placeholder"))
        return Settings.model_validate(partial), bad


def _check_identities(s: Settings, bad: set[str], problems: list[str], warnings: list[str]) -> None:
    """The addresses, the HELO name and DMARC alignment."""
    test_domains = s.allow_test_domains
    if "support_address" not in bad:
        _check_address(
            s.support_address, "RELAY_SUPPORT_ADDRESS", problems, test_domains=test_domains
        )
    if "from_address" not in bad:
        _check_address(s.from_address, "RELAY_FROM_ADDRESS", problems, test_domains=test_domains)
    if s.envelope_from:
        _check_address(s.envelope_from, "RELAY_ENVELOPE_FROM", problems, test_domains=test_domains)
    if not bad & {"support_address", "from_address"} and (
        s.support_address.lower() == s.from_address.lower()
    ):
        problems.append("RELAY_SUPPORT_ADDRESS: must not be the same as RELAY_FROM_ADDRESS")
    if "helo_hostname" not in bad and not is_fqdn(s.helo_hostname):
        problems.append(
            f"RELAY_HELO_HOSTNAME: {s.helo_hostname!r} is not a fully qualified host name "
            "(RFC 5321 §2.3.5): use a name like mail.example.com that resolves to this host"
        )
    if "from_address" not in bad and not _aligned(s.from_domain, s.signing_domain):
        warnings.append(
            f"RELAY_DKIM_DOMAIN: {s.signing_domain} does not align with the From domain "
            f"{s.from_domain}; DMARC will not pass on DKIM"
        )
    if s.envelope_from and not _aligned(domain_of(s.envelope_from), s.from_domain):
        warnings.append(
            f"RELAY_ENVELOPE_FROM: {domain_of(s.envelope_from)} does not align with the From "
            f"domain {s.from_domain}; DMARC will not pass on SPF"
        )


def _rsa_key(s: Settings, problems: list[str], warnings: list[str]) -> bytes | None:
    """The RSA key's PEM, from the file or the variable (exactly one)."""
    if s.dkim_private_key_file and s.dkim_private_key:
        problems.append("RELAY_DKIM_PRIVATE_KEY_FILE / RELAY_DKIM_PRIVATE_KEY: set one, not both")
        return None
    if s.dkim_private_key_file:
        var = "RELAY_DKIM_PRIVATE_KEY_FILE"
        pem = _read_key(s.dkim_private_key_file, var, problems, warnings)
    elif s.dkim_private_key:
        var = "RELAY_DKIM_PRIVATE_KEY"
        pem = s.dkim_private_key.get_secret_value().encode()
    else:
        problems.append(
            "RELAY_DKIM_PRIVATE_KEY_FILE: required (or RELAY_DKIM_PRIVATE_KEY with PEM text); "
            "create one with `relay dkim keygen`"
        )
        return None
    if pem is None:
        return None
    pem = normalise_pem(pem)
    _check_rsa(pem, var, problems)
    return pem


def _ed25519_key(s: Settings, problems: list[str], warnings: list[str]) -> bytes | None:
    if bool(s.dkim_ed25519_selector) != bool(s.dkim_ed25519_key_file):
        problems.append(
            "RELAY_DKIM_ED25519_SELECTOR / RELAY_DKIM_ED25519_KEY_FILE: set both or neither"
        )
        return None
    if not s.dkim_ed25519_key_file:
        return None
    var = "RELAY_DKIM_ED25519_KEY_FILE"
    pem = _read_key(s.dkim_ed25519_key_file, var, problems, warnings)
    if pem is None:
        return None
    pem = normalise_pem(pem)
    _check_ed25519(pem, var, problems)
    return pem


def _check_delivery(s: Settings, problems: list[str]) -> None:
    """The smarthost, the retry schedule and the rate-limit store."""
    if s.smarthost:
        try:
            s.smarthost_address  # noqa: B018 - parses host[:port]
        except ValueError as exc:
            problems.append(f"RELAY_SMARTHOST: {exc}")
        if bool(s.smarthost_username) != bool(s.smarthost_password):
            problems.append(
                "RELAY_SMARTHOST_USERNAME / RELAY_SMARTHOST_PASSWORD: set both or neither"
            )
    if not s.retry_initial <= s.retry_max <= s.retry_give_up:
        problems.append(
            "RELAY_RETRY_INITIAL / RELAY_RETRY_MAX / RELAY_RETRY_GIVE_UP: need "
            f"initial <= max <= give-up (got {s.retry_initial}, {s.retry_max}, {s.retry_give_up})"
        )
    if not re.match(
        r"^(memory|redis|rediss|redis\+sentinel|redis\+cluster)://", s.rate_limit_storage
    ):
        problems.append(
            f"RELAY_RATE_LIMIT_STORAGE: {s.rate_limit_storage!r}: use memory:// or redis://host:port"
        )
    elif s.rate_limit_storage.startswith("memory://") and s.web_processes > 1:
        problems.append(
            f"RELAY_RATE_LIMIT_STORAGE: memory:// counts in each process, and "
            f"RELAY_WEB_PROCESSES={s.web_processes} web processes would allow {s.web_processes} "
            "times RELAY_RATE_LIMIT: use redis://host:6379/0, or one web process "
            "(FORMRELAY_WEB_WORKERS=1 with deploy/gunicorn.conf.py)"
        )


_USER = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def _admin_hashes(s: Settings, problems: list[str]) -> dict[str, str]:
    """RELAY_ADMIN_USERS as user -> argon2 hash (`relay admin hash-password` makes them)."""
    from argon2 import extract_parameters  # noqa: PLC0415 - only with console users
    from argon2.exceptions import InvalidHashError  # noqa: PLC0415

    if s.admin_users is None:
        return {}
    found: dict[str, str] = {}
    for entry in s.admin_users.get_secret_value().replace(";", " ").split():
        user, sep, hashed = entry.partition(":")
        where = f"RELAY_ADMIN_USERS: entry for {user!r}" if sep else "RELAY_ADMIN_USERS"
        if not sep or not _USER.match(user):
            problems.append(f"{where}: each entry is user:hash (user: letters, digits, ._@-)")
            continue
        if user in found:
            problems.append(f"{where}: listed twice")
            continue
        try:
            extract_parameters(hashed)
        except (InvalidHashError, ValueError):
            problems.append(
                f"{where}: not an argon2 hash; make one with `relay admin hash-password`"
            )
            continue
        found[user] = hashed
    return found


def _check_console(s: Settings, problems: list[str], warnings: list[str]) -> None:
    """The console's sign-in, the alert channels and the metrics endpoints."""
    from limits import parse_many  # noqa: PLC0415

    if s.admin_trusted_header is not None:
        if not _HEADER.match(s.admin_trusted_header):
            problems.append("RELAY_ADMIN_TRUSTED_HEADER: a header name, like X-Forwarded-User")
        if s.trusted_proxies < 1:
            problems.append(
                "RELAY_ADMIN_TRUSTED_HEADER: needs RELAY_TRUSTED_PROXIES >= 1: the header is "
                "believed only from the proxy in front of the relay"
            )
    if s.admin_idle_timeout > s.admin_session_max:
        problems.append("RELAY_ADMIN_IDLE_TIMEOUT: must not exceed RELAY_ADMIN_SESSION_MAX")
    try:
        parse_many(s.admin_login_rate_limit)
    except ValueError:
        problems.append(
            f"RELAY_ADMIN_LOGIN_RATE_LIMIT: {s.admin_login_rate_limit!r} is not a limit "
            "like 5/minute;20/hour"
        )
    if s.alert_webhook_url is not None:
        if not re.match(r"^https?://[^/\s]+", s.alert_webhook_url):
            problems.append("RELAY_ALERT_WEBHOOK_URL: an http:// or https:// URL")
        elif s.alert_webhook_url.startswith("http://") and not s.is_development:
            warnings.append("RELAY_ALERT_WEBHOOK_URL: plain http; alerts cross the network unread?")
    if s.alert_email is not None:
        _check_address(
            s.alert_email, "RELAY_ALERT_EMAIL", problems, test_domains=s.allow_test_domains
        )
    token = s.metrics_token.get_secret_value() if s.metrics_token else None
    if token is not None and len(token) < 16:
        problems.append("RELAY_METRICS_TOKEN: at least 16 characters")
    if s.worker_metrics_address:
        try:
            s.worker_metrics_bind  # noqa: B018 - parses host:port
        except ValueError as exc:
            problems.append(f"RELAY_WORKER_METRICS_ADDRESS: {exc}")
        if token is None:
            problems.append("RELAY_WORKER_METRICS_ADDRESS: needs RELAY_METRICS_TOKEN (Bearer)")


def _check_production(s: Settings, problems: list[str]) -> None:
    """What only production requires: a real secret key, real hCaptcha keys, origins."""
    if s.is_development:
        return
    if s.secret_key is None or len(s.secret_key.get_secret_value()) < 32:
        problems.append(
            "RELAY_SECRET_KEY: required in production, at least 32 characters "
            '(python -c "import secrets; print(secrets.token_urlsafe(48))")'
        )
    problems.extend(hcaptcha_key_problems(s))
    if not s.allowed_origins:
        problems.append(
            "RELAY_ALLOWED_ORIGINS: required in production: the origins "
            "(https://www.example.com) allowed to embed and post the form"
        )


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Read, validate and return the settings, or raise ConfigError listing every problem.

    `environ` defaults to os.environ; tests pass a mapping so nothing leaks between them.
    """
    problems: list[str] = []
    warnings: list[str] = []
    s, bad = _parse(_collect(_environment(environ, env_file)), problems)
    _check_identities(s, bad, problems, warnings)
    key_pem = _rsa_key(s, problems, warnings)
    ed_pem = _ed25519_key(s, problems, warnings)
    _check_delivery(s, problems)
    _check_console(s, problems, warnings)
    hashes = _admin_hashes(s, problems)
    rules = None
    if s.hold_rules_file is not None:
        rules, rule_problems = holdrules.load(s.hold_rules_file)
        problems.extend(rule_problems)
    forms = _forms(s, bad, problems)
    _check_production(s, problems)
    if problems:
        raise ConfigError(problems)
    return s.model_copy(
        update={
            "warnings": warnings,
            "dkim_key_pem": key_pem or b"",
            "dkim_ed25519_key_pem": ed_pem,
            "hold_rules": rules,
            "admin_hashes": hashes,
            "forms": forms,
        }
    )


def _forms(s: Settings, bad: set[str], problems: list[str]) -> dict[str, Any]:
    """RELAY_FORMS_FILE's forms by id (relay.formdefs checks them, every problem named)."""
    if s.forms_file is None:
        return {}
    own = re.match(r"^(https?://[^/?#\s]+)", s.public_url or "")
    found, form_problems = formdefs.load(
        s.forms_file,
        test_domains=s.allow_test_domains,
        from_address="" if "from_address" in bad else s.from_address,
        own_origin=own.group(1).lower() if own else None,
        default_origins=s.allowed_origins,
    )
    problems.extend(form_problems)
    return found or {}
