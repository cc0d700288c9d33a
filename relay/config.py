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
    rate_limit_storage: str = Field("memory://", description="memory:// or redis://...")
    trusted_proxies: int = Field(0, ge=0, le=10, description="Proxy hops that set XFF")
    thanks_url: str | None = Field(None, description="Redirect after a successful submission")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")

    # Filled by load_settings(); not read from the environment.
    warnings: list[str] = Field(default_factory=list, exclude=True)
    dkim_key_pem: bytes = Field(b"", exclude=True, repr=False)
    dkim_ed25519_key_pem: bytes | None = Field(None, exclude=True, repr=False)

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


def env_var(field: str) -> str:
    return PREFIX + field.upper()


def documented_variables() -> dict[str, str]:
    """RELAY_ variable -> description, for the README and .env.example drift checks."""
    hidden = {"warnings", "dkim_key_pem", "dkim_ed25519_key_pem"}
    return {
        env_var(name): field.description or ""
        for name, field in Settings.model_fields.items()
        if name not in hidden
    }


def _collect(environ: Mapping[str, str]) -> dict[str, str]:
    fields = set(Settings.model_fields) - {"warnings", "dkim_key_pem", "dkim_ed25519_key_pem"}
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


def _check_rsa(pem: bytes, var: str, problems: list[str]) -> None:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        problems.append(f"{var}: not an unencrypted PEM private key ({exc})")
        return
    if not isinstance(key, rsa.RSAPrivateKey):
        problems.append(f"{var}: must be an RSA key (use RELAY_DKIM_ED25519_KEY_FILE for Ed25519)")
    elif key.key_size < 2048:
        problems.append(f"{var}: RSA key is {key.key_size} bits; at least 2048 are required")


def _check_ed25519(pem: bytes, var: str, problems: list[str]) -> None:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        problems.append(f"{var}: not an unencrypted PEM private key ({exc})")
        return
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        problems.append(f"{var}: must be an Ed25519 key")


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Read, validate and return the settings, or raise ConfigError listing every problem.

    `environ` defaults to os.environ; tests pass a mapping so nothing leaks between them.
    """
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)

    problems: list[str] = []
    warnings: list[str] = []
    values = _collect(merged)
    bad: set[str] = set()
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            bad.add(field)
            if error["type"] == "missing":
                problems.append(f"{env_var(field)}: required")
            else:
                problems.append(f"{env_var(field)}: {error['msg']}")
        # Go on with the fields that were valid, so every other problem is reported too.
        required = {n for n, f in Settings.model_fields.items() if f.is_required()}
        partial = {k: v for k, v in values.items() if k not in bad}
        partial.update(dict.fromkeys(required & bad, "placeholder"))
        settings = Settings.model_validate(partial)

    s = settings
    if "support_address" not in bad:
        _check_address(
            s.support_address, "RELAY_SUPPORT_ADDRESS", problems, test_domains=s.allow_test_domains
        )
    if "from_address" not in bad:
        _check_address(
            s.from_address, "RELAY_FROM_ADDRESS", problems, test_domains=s.allow_test_domains
        )
    if s.envelope_from:
        _check_address(
            s.envelope_from, "RELAY_ENVELOPE_FROM", problems, test_domains=s.allow_test_domains
        )
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

    key_pem: bytes | None = None
    if s.dkim_private_key_file and s.dkim_private_key:
        problems.append("RELAY_DKIM_PRIVATE_KEY_FILE / RELAY_DKIM_PRIVATE_KEY: set one, not both")
    elif s.dkim_private_key_file:
        key_pem = _read_key(
            s.dkim_private_key_file, "RELAY_DKIM_PRIVATE_KEY_FILE", problems, warnings
        )
        var = "RELAY_DKIM_PRIVATE_KEY_FILE"
    elif s.dkim_private_key:
        key_pem = s.dkim_private_key.get_secret_value().encode()
        var = "RELAY_DKIM_PRIVATE_KEY"
    else:
        problems.append(
            "RELAY_DKIM_PRIVATE_KEY_FILE: required (or RELAY_DKIM_PRIVATE_KEY with PEM text); "
            "create one with `relay dkim keygen`"
        )
    if key_pem is not None:
        key_pem = normalise_pem(key_pem)
        _check_rsa(key_pem, var, problems)

    ed_pem: bytes | None = None
    if bool(s.dkim_ed25519_selector) != bool(s.dkim_ed25519_key_file):
        problems.append(
            "RELAY_DKIM_ED25519_SELECTOR / RELAY_DKIM_ED25519_KEY_FILE: set both or neither"
        )
    elif s.dkim_ed25519_key_file:
        ed_pem = _read_key(
            s.dkim_ed25519_key_file, "RELAY_DKIM_ED25519_KEY_FILE", problems, warnings
        )
        if ed_pem is not None:
            ed_pem = normalise_pem(ed_pem)
            _check_ed25519(ed_pem, "RELAY_DKIM_ED25519_KEY_FILE", problems)

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

    if not s.is_development:
        if s.secret_key is None or len(s.secret_key.get_secret_value()) < 32:
            problems.append(
                "RELAY_SECRET_KEY: required in production, at least 32 characters "
                '(python -c "import secrets; print(secrets.token_urlsafe(48))")'
            )
        if not s.hcaptcha_sitekey:
            problems.append("RELAY_HCAPTCHA_SITEKEY: required in production")
        elif s.hcaptcha_sitekey == HCAPTCHA_TEST_SITEKEY:
            problems.append(
                "RELAY_HCAPTCHA_SITEKEY: hCaptcha's published test key accepts everyone; "
                "refused outside development"
            )
        if s.hcaptcha_secret is None:
            problems.append("RELAY_HCAPTCHA_SECRET: required in production")
        elif s.hcaptcha_secret.get_secret_value() == HCAPTCHA_TEST_SECRET:
            problems.append(
                "RELAY_HCAPTCHA_SECRET: hCaptcha's published test secret accepts everyone; "
                "refused outside development"
            )
        if not s.allowed_origins:
            problems.append(
                "RELAY_ALLOWED_ORIGINS: required in production: the origins "
                "(https://www.example.com) allowed to embed and post the form"
            )

    if problems:
        raise ConfigError(problems)
    return s.model_copy(
        update={
            "warnings": warnings,
            "dkim_key_pem": key_pem or b"",
            "dkim_ed25519_key_pem": ed_pem,
        }
    )
