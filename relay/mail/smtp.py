"""One delivery attempt: resolve the MX hosts, then talk SMTP to each address until one
accepts (RFC 5321 §5.1), and return what happened as data.

`deliver()` never raises for a delivery fault: the outbox reads `AttemptResult.outcome` and
the deciding `DeliveryError`, never exception text. Rules:

- A 4xx, a refused, dropped or timed-out connection, or a TLS failure on one host moves on to
  the next address; the attempt is temporary when no host accepted.
- A 5xx is the domain's answer and ends the attempt as permanent, except a 5xx greeting,
  which says only "no SMTP service on this host" (RFC 5321 §3.1): the next MX is tried.
- A connection dropped before the final "." is retried at once on the same host (tenacity,
  a couple of quick tries); long backoff is the outbox's job. A connection lost or a timeout
  after the final "." may hide an accepted message: `possible_duplicate` is set and the
  same host is not retried inside the attempt.
- STARTTLS (`settings.smtp_tls`, relay.mail.conversation): under `may`, a handshake that
  fails is followed by a plain-text conversation with the same address, as MTAs do.
- With RELAY_SMARTHOST, the attempt goes to that submission server instead of the MX hosts:
  STARTTLS required (`verify` when smtp_tls=verify, otherwise `encrypt`), AUTH when a user
  is set. An AUTH failure is temporary: the operator fixes the credentials and the queue
  drains, instead of every message failing for good.
- Session reuse (`SessionCache`, passed by the worker): a session whose message got a 250
  to the final dot is parked, keyed by MX host, address, port, TLS policy and context,
  login and HELO name, and the next message whose fresh MX lookup (still one per message)
  yields that target starts at MAIL FROM on it. Limits: idle 2 s (then QUIT) and 300 s
  since connect, as Postfix's connection cache, and 100 messages. A reused session lost before the
  final dot (connection lost, 421, no reply at all) was stale, not the host's answer: it
  is logged as `smtp.session_stale`, is no host try, and the message goes over a fresh
  connection to the same address. Any other reply, and anything at or after the dot, is
  handled as on a fresh connection; after any failure the session is closed, never parked.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt, wait_fixed

from relay.errors import (
    ConnectionFailure,
    DeliveryError,
    DNSError,
    DNSPermanentError,
    SMTPReplyError,
)
from relay.logs import event
from relay.mail.attempt import AttemptResult, HostTry, Outcome
from relay.mail.conversation import (
    BeforeDot,
    Conversation,
    Ended,
    Job,
    Target,
    dot_stuff,
    tls_context,
)
from relay.mail.mx import Resolver, resolve_addresses, resolve_mx
from relay.mail.sessions import Session, SessionCache, SessionKey, TLSPolicy
from relay.settings import Settings, domain_of

log = logging.getLogger("relay.smtp")


# Tries of one address when the connection drops before the final dot, and the pause between.
DROP_TRIES = 2
DROP_WAIT = 0.25
# Addresses tried in one attempt at most (Postfix's smtp_mx_address_limit is 5).
MAX_ADDRESSES = 10


def _dropped(outcome: Ended) -> bool:
    return outcome.dropped


def _last_result(state: RetryCallState) -> Ended:
    assert state.outcome is not None
    result: Ended = state.outcome.result()
    return result


@dataclass
class _Attempt:
    job: Job
    sessions: SessionCache | None = None
    hosts: list[HostTry] = field(default_factory=list)
    possible_duplicate: bool = False

    def record(self, outcome: Ended, *, reused: bool = False) -> None:
        host = outcome.host_try
        self.hosts.append(host)
        error = outcome.error
        if isinstance(error, ConnectionFailure) and error.after_data:
            self.possible_duplicate = True
        event(
            log,
            "smtp.reply",
            level=logging.INFO if error is None else logging.WARNING,
            host=host.mx_host,
            ip=host.ip,
            port=host.port,
            tls=host.tls or "none",
            stage=host.stage,
            code=host.code,
            status=host.enhanced_status,
            text=host.text,
            duration=f"{host.duration:.3f}",
            reused=1 if reused else None,
            possible_duplicate=True if self.possible_duplicate else None,
        )

    def _key(self, target: Target) -> SessionKey:
        job = self.job
        return SessionKey(
            target.mx_host,
            target.ip,
            target.port,
            job.policy,
            id(job.context),
            job.username,
            job.settings.helo_hostname,
        )

    def _conversation(self, target: Target, session: Session | None = None) -> Conversation:
        if self.sessions is None:
            return Conversation(target, self.job)
        key = self._key(target)
        return Conversation(target, self.job, sessions=self.sessions, key=key, session=session)

    async def _reuse(self, target: Target) -> Ended | None:
        """The message over a parked session to `target`; None when none is parked or it
        turned out stale (logged, but no host try: the server never judged this message)."""
        if self.sessions is None:
            return None
        session = self.sessions.take(self._key(target))
        if session is None:
            return None
        outcome = await self._conversation(target, session).run(use_starttls=False)
        if not outcome.stale:
            self.record(outcome, reused=True)
            return outcome
        host = outcome.host_try
        event(
            log,
            "smtp.session_stale",
            host=host.mx_host,
            ip=host.ip,
            port=host.port,
            stage=host.stage,
            code=host.code,
            reason=host.text,
            messages=session.messages,
        )
        return None

    async def _once(self, target: Target) -> Ended:
        outcome = await self._conversation(target).run(use_starttls=True)
        self.record(outcome)
        if outcome.tls_failed and self.job.policy == "may":
            outcome = await self._conversation(target).run(use_starttls=False)
            self.record(outcome)
        return outcome

    async def try_target(self, target: Target) -> Ended:
        reused = await self._reuse(target)
        if reused is not None:
            return reused
        retrying = AsyncRetrying(
            stop=stop_after_attempt(DROP_TRIES),
            wait=wait_fixed(DROP_WAIT),
            retry=retry_if_result(_dropped),
            retry_error_callback=_last_result,
        )
        outcome: Ended = await retrying(self._once, target)
        return outcome


def _deciding(errors: list[DeliveryError]) -> DeliveryError:
    """The error that decides an attempt that got no final 5xx (every host failed, or 5xx
    greetings only): any temporary failure keeps the message
    queued (a host that was merely down must not turn into a bounce), and among those an
    SMTP reply says more than a lost connection."""
    temporary = [e for e in errors if e.temporary]
    if not temporary:
        return errors[-1]
    replies = [e for e in temporary if isinstance(e, SMTPReplyError)]
    return (replies or temporary)[-1]


def _final(error: DeliveryError) -> bool:
    """A 5xx anywhere but the greeting is the domain's answer for this attempt."""
    return isinstance(error, SMTPReplyError) and not error.temporary and error.stage != "greeting"


async def _targets(
    settings: Settings, recipient: str, resolver: Resolver, rng: random.Random | None
) -> list[Target]:
    smarthost = settings.smarthost_address
    if smarthost is not None:
        host, port = smarthost
        try:
            ipaddress.ip_address(host)
        except ValueError:
            addresses = await resolve_addresses(host, resolver)
        else:
            addresses = (host,)
        return [Target(host, ip, port) for ip in addresses]
    domain = domain_of(recipient)
    if not domain:
        raise DNSPermanentError(recipient, "the recipient has no domain")
    hosts = await resolve_mx(domain, resolver, rng=rng)
    return [Target(mx.name, ip, settings.smtp_port) for mx in hosts for ip in mx.addresses]


async def deliver(
    signed: bytes,
    *,
    recipient: str,
    envelope_from: str,
    settings: Settings,
    resolver: Resolver,
    rng: random.Random | None = None,
    cafile: str | Path | None = None,
    sessions: SessionCache | None = None,
    before_dot: BeforeDot | None = None,
) -> AttemptResult:
    """Make one delivery attempt of `signed` to `recipient`; never raises for delivery faults.

    `rng` orders MX hosts of equal preference (tests seed it); `cafile` replaces the system
    CAs under smtp_tls=verify (tests pass their own CA). With `sessions`, a target that has a
    parked session gets the message over it, and an accepted message leaves its session
    there; without, every conversation ends in QUIT. `before_dot` is awaited before each
    final dot (relay.mail.conversation) and may cancel the attempt.
    """
    smarthost = settings.smarthost_address is not None
    policy: TLSPolicy = settings.smtp_tls
    if smarthost:
        policy = "verify" if settings.smtp_tls == "verify" else "encrypt"
    password = settings.smarthost_password
    job = Job(
        payload=dot_stuff(signed),
        size=len(signed),
        recipient=recipient,
        envelope_from=envelope_from,
        settings=settings,
        policy=policy,
        context=tls_context(policy, cafile),
        username=settings.smarthost_username if smarthost else None,
        password=password.get_secret_value() if smarthost and password else None,
        before_dot=before_dot,
    )
    attempt = _Attempt(job, sessions)
    try:
        targets = await _targets(settings, recipient, resolver, rng)
    except DNSError as exc:
        outcome: Outcome = "temporary" if exc.temporary else "permanent"
        event(
            log,
            "smtp.dns",
            level=logging.WARNING,
            domain=exc.domain,
            outcome=outcome,
            reason=exc.reason,
        )
        return AttemptResult(outcome, (), exc, False)

    errors: list[DeliveryError] = []
    for target in targets[:MAX_ADDRESSES]:
        result = await attempt.try_target(target)
        if result.error is None:
            return AttemptResult(
                "delivered", tuple(attempt.hosts), None, attempt.possible_duplicate
            )
        errors.append(result.error)
        if _final(result.error):
            break
    error = errors[-1] if _final(errors[-1]) else _deciding(errors)
    return AttemptResult(
        "temporary" if error.temporary else "permanent",
        tuple(attempt.hosts),
        error,
        attempt.possible_duplicate,
    )
