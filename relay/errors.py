"""Every error formrelay raises, in one hierarchy.

Errors carry data (SMTP reply code, enhanced status, MX host, DNS name) and the retry
decision reads that data, never the message text::

    RelayError
    ├── ConfigError                  bad settings; .problems lists each by RELAY_ variable
    ├── MessageError                 a submission cannot become a safe RFC 5322 message
    │   └── HeaderInjectionError     the parsed-back header set is not what we wrote
    ├── SigningError                 DKIM key unusable or signing failed
    ├── StoreError                   the outbox
    │   ├── StoreUnavailable         cannot commit now; the web answers 503, input kept
    │   └── MessageNotFound          no message with that id
    ├── CaptchaError                 siteverify said no, or could not be asked (fail closed)
    └── DeliveryError                one delivery attempt did not end in a 2xx; .temporary decides
        ├── DNSError                 resolving the recipient domain
        │   ├── DNSTemporaryError    SERVFAIL, timeout, no answer: retry later
        │   └── DNSPermanentError    NXDOMAIN, null MX (RFC 7505), no address: give up
        ├── SMTPReplyError           a server answered 4xx/5xx: .code, .enhanced_status, .mx_host
        └── ConnectionFailure        refused, reset, timed out, TLS failed: always temporary
"""

from __future__ import annotations


class RelayError(Exception):
    """Base class: catching it catches everything formrelay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is unusable; `problems` names each bad RELAY_ variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class MessageError(RelayError):
    """A submission cannot be turned into a message we are willing to send."""


class HeaderInjectionError(MessageError):
    """The built message parsed back into a header set other than the one we wrote."""

    def __init__(self, expected: list[str], found: list[str]) -> None:
        self.expected = expected
        self.found = found
        super().__init__(f"header set mismatch: expected {expected}, found {found}")


class SigningError(RelayError):
    """DKIM signing failed (unusable key, dkimpy refused the message)."""


class StoreError(RelayError):
    """The outbox could not do what was asked."""


class StoreUnavailable(StoreError):
    """The store cannot commit right now (down, locked, disk full); nothing was written."""


class MessageNotFound(StoreError):
    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        super().__init__(f"no message with id {message_id}")


class CaptchaError(RelayError):
    """The CAPTCHA was not verified. `codes` are hCaptcha's error codes or our own."""

    def __init__(self, codes: list[str], *, retryable: bool = False) -> None:
        self.codes = list(codes)
        self.retryable = retryable
        super().__init__("captcha verification failed: " + ", ".join(self.codes or ["unknown"]))


class DeliveryError(RelayError):
    """A delivery attempt failed. Subclasses decide `temporary` from their data."""

    @property
    def temporary(self) -> bool:
        return True


class DNSError(DeliveryError):
    def __init__(self, domain: str, reason: str) -> None:
        self.domain = domain
        self.reason = reason
        super().__init__(f"{domain}: {reason}")


class DNSTemporaryError(DNSError):
    """SERVFAIL, timeout or no nameserver answered: the domain may resolve later."""


class DNSPermanentError(DNSError):
    """NXDOMAIN, null MX or no address at all: retrying will not help."""

    @property
    def temporary(self) -> bool:
        return False


class SMTPReplyError(DeliveryError):
    """A server replied with a non-2xx code at some stage of the transaction."""

    def __init__(
        self,
        code: int,
        text: str,
        *,
        enhanced_status: str | None = None,
        mx_host: str | None = None,
        ip: str | None = None,
        port: int | None = None,
        stage: str | None = None,
    ) -> None:
        self.code = code
        self.text = text
        self.enhanced_status = enhanced_status
        self.mx_host = mx_host
        self.ip = ip
        self.port = port
        self.stage = stage
        where = f" from {mx_host}" if mx_host else ""
        at = f" at {stage}" if stage else ""
        status = f" {enhanced_status}" if enhanced_status else ""
        super().__init__(f"{code}{status} {text}{where}{at}")

    @property
    def temporary(self) -> bool:
        # RFC 5321 §4.2.1: 4yz is transient; anything else that is not 2yz/3yz is permanent.
        # A 5.x.x enhanced status on a 4xx reply stays temporary: the basic code decides.
        return self.code // 100 == 4


class ConnectionFailure(DeliveryError):
    """No usable SMTP conversation: refused, reset, timed out, TLS handshake failed."""

    def __init__(
        self,
        reason: str,
        *,
        mx_host: str | None = None,
        ip: str | None = None,
        port: int | None = None,
        after_data: bool = False,
    ) -> None:
        self.reason = reason
        self.mx_host = mx_host
        self.ip = ip
        self.port = port
        # True when the connection dropped after the final "." and before the reply: the
        # server may have accepted the message, so a retry may deliver a duplicate.
        self.after_data = after_data
        super().__init__(f"{reason} ({mx_host or ip}:{port})")
