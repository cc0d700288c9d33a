"""Every RELAY_ variable: its type, default and meaning (`Settings`, one field each), and the
values derived from them. Pure data: reading the environment and checking what no field type
can (addresses, keys, files, combinations) is relay.config's job, and `load_settings()` the
only way to a Settings that has been checked.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from relay import formdefs

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
