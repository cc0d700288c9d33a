"""What one delivery attempt yields, as data: the one definition smtp, the store and the
worker share.

An attempt is its outcome, every host it tried (`HostTry`: one connection, with the reply
that ended it) and the deciding error. The store reads `reply_fields` to record the reply
that decided it; retry decisions read the outcome and the error's data, never its text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from relay.errors import ConnectionFailure, DeliveryError, DNSError, SMTPReplyError

Outcome = Literal["delivered", "temporary", "permanent"]


@dataclass(frozen=True)
class HostTry:
    """One connection inside one attempt."""

    mx_host: str
    ip: str | None
    port: int
    tls: str | None
    code: int | None
    enhanced_status: str | None
    text: str
    stage: str
    duration: float
    started_at: datetime | None


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended. `error` is the deciding error when not delivered: a
    DeliveryError from smtp, or whatever stopped the attempt before any server was asked
    (`local_failure`)."""

    outcome: Outcome
    hosts: tuple[HostTry, ...]
    error: BaseException | None
    possible_duplicate: bool

    @classmethod
    def local_failure(cls, error: BaseException) -> AttemptResult:
        """An attempt that failed before reaching any server (signing failed, a bug):
        temporary, so the message waits for the operator's fix instead of being lost."""
        return cls("temporary", (), error, False)

    @property
    def local(self) -> bool:
        """Failed before any server was asked: not a delivery fault."""
        return self.error is not None and not isinstance(self.error, DeliveryError)

    @property
    def summary(self) -> str:
        """One line for logs and the CLI: '451 4.7.1 Greylisted (mx1.example.test)'."""
        if self.outcome == "delivered" and self.hosts:
            return _describe(self.hosts[-1])
        error = self.error
        if isinstance(error, SMTPReplyError):
            status = f" {error.enhanced_status}" if error.enhanced_status else ""
            return f"{error.code}{status} {error.text} ({error.mx_host})"
        if isinstance(error, ConnectionFailure):
            return f"{error.reason} ({error.mx_host or error.ip})"
        if isinstance(error, DNSError):
            return f"DNS {error.domain}: {error.reason}"
        return str(error) if error else self.outcome


def _describe(host: HostTry) -> str:
    status = f" {host.enhanced_status}" if host.enhanced_status else ""
    code = f"{host.code}{status} " if host.code is not None else ""
    return f"{code}{host.text} ({host.mx_host})"


@dataclass(frozen=True)
class ReplyFields:
    code: int | None
    enhanced_status: str | None
    mx_host: str | None
    text: str


def reply_fields(result: AttemptResult) -> ReplyFields:
    """The reply that decided an attempt: the deciding error's data, else the last host's."""
    last = result.hosts[-1] if result.hosts else None
    last_mx = last.mx_host if last is not None else None
    error = result.error
    if result.outcome != "delivered" and isinstance(error, SMTPReplyError):
        return ReplyFields(error.code, error.enhanced_status, error.mx_host or last_mx, error.text)
    if result.outcome != "delivered" and isinstance(error, ConnectionFailure):
        return ReplyFields(None, None, error.mx_host or last_mx, str(error))
    if result.outcome != "delivered" and isinstance(error, DNSError):
        return ReplyFields(None, None, None, str(error))
    if last is not None:
        return ReplyFields(last.code, last.enhanced_status, last.mx_host, last.text)
    return ReplyFields(None, None, None, str(error) if error else "")


def format_reply(code: int | None, enhanced: str | None, mx: str | None, text: str | None) -> str:
    """One line: "451 4.7.1 Greylisted (mx1.support.test)"."""
    parts = [str(code) if code else "", enhanced or "", (text or "").strip()]
    line = " ".join(p for p in parts if p)
    return f"{line} ({mx})" if mx else line
