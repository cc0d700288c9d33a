"""All configuration, read and validated in one place.

Settings come from `RELAY_*` environment variables, then a `.env` file (the environment wins).
`load_settings()` fails with a `ConfigError` that lists *every* problem by variable name, so
an operator fixes a bad deployment in one pass; problems that do not stop us (DMARC alignment
across domains, a key file others can read) are kept in `Settings.warnings`.

Nothing here performs network I/O. Key files are read so that an unusable key fails at start,
not at the first delivery.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dotenv import dotenv_values
from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from relay import formdefs, holdrules
from relay.errors import ConfigError

PREFIX = "RELAY_"

# hCaptcha's published test keys (docs.hcaptcha.com/#integration-testing-test-keys): they
# accept every token, so they are refused outside development, test and demo.
HCAPTCHA_TEST_SITEKEY = "10000000-ffff-ffff-ffff-000000000001"
HCAPTCHA_TEST_SECRET = "0x0000000000000000000000000000000000000000"  # noqa: S105
HCAPTCHA_VERIFY_URL = "https://api.hcaptcha.com/siteverify"

Environment = Literal["production", "development", "test", "demo"]

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Nameserver:
    host: str
    port: int = 53


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def is_fqdn(name: str) -> bool:
    """A host name fit for EHLO (RFC 5321 §2.3.5): LDH labels, at least two, not an IP."""
    name = name.rstrip(".").lower()
    if not name or len(name) > 253 or name == "localhost" or name.endswith(".localhost"):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return False
    labels = name.split(".")
    return (
        len(labels) >= 2
        and all(_LABEL.match(label) for label in labels)
        and not labels[-1].isdigit()
    )


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower()


def _aligned(a: str, b: str) -> bool:
    """DMARC relaxed alignment, approximated without a public-suffix list: one domain is the
    other or a subdomain of it."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


class Settings(BaseModel):
    """Every RELAY_ variable. Field `foo_bar` is read from `RELAY_FOO_BAR`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    env: Environment = Field("production", description="production, development, test or demo")
    # --- identities ---
    support_address: str = Field(description="The external support address all mail goes to")
    from_address: str = Field(description="Our own From address, in the DKIM domain")
    from_name: str = Field("", description='Site name shown as "<visitor> via <name>"')
    envelope_from: str | None = Field(None, description="MAIL FROM; defaults to FROM_ADDRESS")
    helo_hostname: str = Field(description="FQDN sent in EHLO; its A record and PTR must match")
    public_url: str | None = Field(None, description="Base URL the form is served at")
    # --- DKIM ---
    dkim_selector: str = Field(description="Selector of the RSA key")
    dkim_private_key_file: Path | None = Field(None, description="PEM file of the RSA key")
    dkim_private_key: SecretStr | None = Field(None, description="PEM text of the RSA key")
    dkim_domain: str | None = Field(None, description="d= of the signature; FROM domain")
    dkim_ed25519_selector: str | None = Field(None, description="Selector of an Ed25519 key")
    dkim_ed25519_key_file: Path | None = Field(None, description="PEM file of the Ed25519 key")
    # --- DNS and SMTP ---
    dns_nameservers: list[Nameserver] = Field(
        default_factory=list, description="ip[:port],...; empty = system resolver"
    )
    dns_timeout: float = Field(5.0, gt=0, description="Seconds for one DNS lookup")
    smtp_port: int = Field(25, ge=1, le=65535, description="Port of the MX hosts")
    smtp_tls: Literal["may", "encrypt", "verify"] = Field("may", description="STARTTLS policy")
    smtp_connect_timeout: float = Field(30.0, gt=0, description="Seconds to connect")
    smtp_timeout: float = Field(
        300.0, gt=0, description="Seconds per SMTP command (RFC 5321 §4.5.3.2: 5 minutes)"
    )
    smtp_data_timeout: float = Field(
        600.0, gt=0, description="Seconds for the reply to the final dot (RFC: 10 minutes)"
    )
    smarthost: str | None = Field(None, description="host[:port] of a submission server")
    smarthost_username: str | None = Field(None, description="AUTH user for the smarthost")
    smarthost_password: SecretStr | None = Field(None, description="AUTH password")
    # --- outbox and worker ---
    retry_initial: int = Field(300, ge=1, description="First retry delay, seconds")
    retry_max: int = Field(3600, ge=1, description="Longest retry delay, seconds")
    retry_give_up: int = Field(432000, ge=1, description="Fail after this age, seconds")
    worker_concurrency: int = Field(10, ge=1, le=1000, description="Deliveries at once")
    worker_lease: int = Field(
        300, ge=10, description="Seconds a claim holds without a heartbeat renewing it"
    )
    worker_dead_after: int = Field(
        15, ge=3, description="Seconds without a heartbeat before a worker's mail is reclaimed"
    )
    worker_stop_timeout: int = Field(
        30, ge=1, description="Seconds a stopping worker lets deliveries in flight finish"
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite file")
    instance_path: Path = Field(Path("instance"), description="Folder for the SQLite store")
    # --- web ---
    secret_key: SecretStr | None = Field(None, description="Flask secret key")
    hcaptcha_sitekey: str | None = Field(None, description="hCaptcha site key")
    hcaptcha_secret: SecretStr | None = Field(None, description="hCaptcha secret")
    hcaptcha_verify_url: str = Field(HCAPTCHA_VERIFY_URL, description="siteverify endpoint")
    hcaptcha_timeout: float = Field(5.0, gt=0, description="Seconds for siteverify")
    allowed_origins: list[str] = Field(
        default_factory=list, description="Origins allowed to frame and post"
    )
    rate_limit: str = Field("5/minute;30/hour", description="Per-client-IP POST limit")
    rate_limit_global: str = Field("600/minute", description="Ceiling over all clients")
    rate_limit_storage: str = Field(
        "memory://", description="memory:// (one web process) or redis://..."
    )
    web_processes: int = Field(
        1, ge=1, description="Web processes sharing the limits; gunicorn.conf.py sets it"
    )
    body_timeout: float = Field(10.0, gt=0, description="Seconds a request body may take")
    trusted_proxies: int = Field(0, ge=0, le=10, description="Proxy hops that set XFF")
    thanks_url: str | None = Field(None, description="Redirect after a successful submission")
    hold_rules_file: Path | None = Field(
        None, description="TOML rules that hold matching submissions for review"
    )
    forms_file: Path | None = Field(
        None, description="TOML forms served at /f/<id>, each with its own support address"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    # --- the operator's console ---
    admin_users: SecretStr | None = Field(
        None, description="Console users: user:hash entries separated by spaces"
    )
    admin_trusted_header: str | None = Field(
        None, description="Header an SSO proxy sets to the signed-in user's name"
    )
    admin_idle_timeout: int = Field(1800, ge=60, description="Console sign-out when idle, seconds")
    admin_session_max: int = Field(
        43200, ge=300, description="Console sign-out after sign-in, seconds"
    )
    admin_login_rate_limit: str = Field(
        "5/minute;20/hour", description="Per-client-IP limit on console sign-in attempts"
    )
    # --- alerts and metrics ---
    alert_webhook_url: str | None = Field(
        None, description="Alerts POSTed as JSON (Slack/Mattermost text field)"
    )
    alert_email: str | None = Field(None, description="Operator address alerts are mailed to")
    alert_queue_age: int = Field(
        3600, ge=60, description="Alert when a message has waited longer, seconds"
    )
    alert_group_window: int = Field(
        30, ge=0, le=3600, description="Alerts of one kind this close go out as one, seconds"
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token for GET /metrics; unset: no metrics"
    )
    worker_metrics_address: str | None = Field(
        None, description="host:port where `relay worker` serves /metrics"
    )

    # Filled by load_settings(); not read from the environment.
    warnings: list[str] = Field(default_factory=list, exclude=True)
    dkim_key_pem: bytes = Field(b"", exclude=True, repr=False)
    dkim_ed25519_key_pem: bytes | None = Field(None, exclude=True, repr=False)
    hold_rules: Any = Field(None, exclude=True, repr=False)  # holdrules.HoldRules
    forms: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)  # FormDefs
    admin_hashes: dict[str, str] = Field(default_factory=dict, exclude=True, repr=False)

    @field_validator("dns_nameservers", mode="before")
    @classmethod
    def _parse_nameservers(cls, value: Any) -> Any:
        items = _split_list(value)
        if not isinstance(items, list):
            return items
        parsed: list[Any] = []
        for item in items:
            if isinstance(item, Nameserver):
                parsed.append(item)
                continue
            text = str(item)
            host, port = text, 53
            if text.startswith("["):  # [::1]:5353
                host, _, rest = text[1:].partition("]")
                port = int(rest[1:]) if rest.startswith(":") else 53
            elif text.count(":") == 1:
                host, _, port_text = text.partition(":")
                port = int(port_text)
            ipaddress.ip_address(host)
            if not 0 < port < 65536:
                raise ValueError(f"port out of range in {text!r}")
            parsed.append(Nameserver(host, port))
        return parsed

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        items = _split_list(value)
        if isinstance(items, list):
            for origin in items:
                if not re.match(r"^https?://[^/\s]+$", str(origin)):
                    raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
            return [str(o).lower() for o in items]
        return items

    # --- derived values ---
    @property
    def default_form(self) -> formdefs.FormDef:
        """The form of the RELAY_ variables, at /form."""
        return formdefs.default_form(self.support_address, self.thanks_url)

    def form(self, form_id: str) -> formdefs.FormDef | None:
        """The default form or one of RELAY_FORMS_FILE's; None for an unknown id."""
        if form_id == formdefs.DEFAULT_ID:
            return self.default_form
        found: formdefs.FormDef | None = self.forms.get(form_id)
        return found

    @property
    def from_domain(self) -> str:
        return domain_of(self.from_address)

    @property
    def envelope_sender(self) -> str:
        return self.envelope_from or self.from_address

    @property
    def signing_domain(self) -> str:
        return (self.dkim_domain or self.from_domain).lower()

    @property
    def site_name(self) -> str:
        return self.from_name or self.from_domain

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.instance_path / 'relay.sqlite3').resolve()}"

    @property
    def smarthost_address(self) -> tuple[str, int] | None:
        """(host, port) of RELAY_SMARTHOST; port 587 (submission) when not given."""
        if not self.smarthost:
            return None
        host, port = self.smarthost, "587"
        if self.smarthost.startswith("["):
            host, _, rest = self.smarthost[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else port
        elif self.smarthost.count(":") == 1:
            host, _, port = self.smarthost.partition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{self.smarthost!r} is not host[:port]")
        return host, int(port)

    @property
    def allow_test_domains(self) -> bool:
        """Accept RFC 2606 names (*.test) in addresses: email-validator's test_environment.
        Never in production, where such an address is a mistake."""
        return self.env != "production"

    @property
    def is_development(self) -> bool:
        return self.env in ("development", "test", "demo")

    @property
    def console_enabled(self) -> bool:
        """The console exists only when someone can sign in to it."""
        return bool(self.admin_hashes or self.admin_trusted_header)

    @property
    def alert_channels(self) -> list[str]:
        return [
            name
            for name, value in (("webhook", self.alert_webhook_url), ("email", self.alert_email))
            if value
        ]

    @property
    def worker_metrics_bind(self) -> tuple[str, int] | None:
        """(host, port) of RELAY_WORKER_METRICS_ADDRESS."""
        if not self.worker_metrics_address:
            return None
        host, _, port = self.worker_metrics_address.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
            raise ValueError(f"{self.worker_metrics_address!r} is not host:port")
        return host, int(port)


def env_var(field: str) -> str:
    return PREFIX + field.upper()


# Settings that load_settings() derives; no variable sets them.
DERIVED = frozenset(
    {"warnings", "dkim_key_pem", "dkim_ed25519_key_pem", "hold_rules", "admin_hashes", "forms"}
)


def documented_variables() -> dict[str, str]:
    """RELAY_ variable -> description, for the README and .env.example drift checks."""
    return {
        env_var(name): field.description or ""
        for name, field in Settings.model_fields.items()
        if name not in DERIVED
    }


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
