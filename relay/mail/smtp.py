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
- STARTTLS (`settings.smtp_tls`): `may` uses it when offered without checking the
  certificate and, when the handshake fails, reconnects and continues in plain text as MTAs
  do; `encrypt` requires it (no certificate check); `verify` requires it and verifies the
  certificate against the MX name and the system CAs (or `cafile`).
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
- The DATA payload is the signed bytes, only dot-stuffed and terminated here; nothing
  re-serialises a message object, so the DKIM signature stays valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import random
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from aiosmtplib import SMTP
from aiosmtplib.email import quote_address
from aiosmtplib.errors import (
    SMTPConnectResponseError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt, wait_fixed

from relay.config import Settings, domain_of
from relay.errors import (
    ConnectionFailure,
    DeliveryError,
    DNSError,
    DNSPermanentError,
    SMTPReplyError,
)
from relay.logs import event
from relay.mail.mx import Resolver, resolve_addresses, resolve_mx

log = logging.getLogger("relay.smtp")

Outcome = Literal["delivered", "temporary", "permanent"]
TLSPolicy = Literal["may", "encrypt", "verify"]
STAGES = ("connect", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot")

# Tries of one address when the connection drops before the final dot, and the pause between.
DROP_TRIES = 2
DROP_WAIT = 0.25
# Addresses tried in one attempt at most (Postfix's smtp_mx_address_limit is 5).
MAX_ADDRESSES = 10
# Session reuse, as Postfix's connection cache: an idle session waits this long for the next
# message (smtp_connection_cache_time_limit), is reused for this long at most since it
# opened (smtp_connection_reuse_time_limit), and carries this many messages at most (Postfix
# sets no count by default; some receivers close a session after about a hundred).
SESSION_IDLE_LIMIT = 2.0
SESSION_REUSE_LIMIT = 300.0
SESSION_MAX_MESSAGES = 100

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


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
    started_at: datetime


@dataclass(frozen=True)
class AttemptResult:
    outcome: Outcome
    hosts: tuple[HostTry, ...]
    error: DeliveryError | None
    possible_duplicate: bool

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


def parse_reply(message: str) -> tuple[str | None, str]:
    """Split a reply text into (enhanced status code, text without it), RFC 3463.

    Multi-line replies repeat the status on every line; it is removed from each and the lines
    joined with a space.
    """
    lines = [line.strip() for line in message.splitlines()] or [""]
    match = _ENHANCED.match(lines[0])
    status = match.group(1) if match else None
    if status:
        lines = [line[len(status) :].strip() if line.startswith(status) else line for line in lines]
    return status, " ".join(line for line in lines if line)


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload for `message`: CRLF line ends, leading dots doubled and the final
    CRLF.CRLF (RFC 5321 §4.5.2). A message already in CRLF form is otherwise unchanged."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"


def tls_context(policy: TLSPolicy, cafile: str | Path | None = None) -> ssl.SSLContext:
    """A client context: verifying for `verify`, opportunistic (no checks) otherwise.

    Contexts are built once per (policy, cafile) and shared: loading the system CA store
    costs ~25 ms of CPU, which at every attempt capped a worker's throughput. A changed CA
    bundle therefore takes effect at the next worker start."""
    return _tls_context(policy, str(cafile) if cafile else None)


@functools.lru_cache(maxsize=8)
def _tls_context(policy: TLSPolicy, cafile: str | None) -> ssl.SSLContext:
    if policy == "verify":
        return ssl.create_default_context(cafile=cafile)
    # No verification, so no CA store to load.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class _Target:
    mx_host: str
    ip: str
    port: int


@dataclass(frozen=True)
class _Job:
    payload: bytes
    size: int
    recipient: str
    envelope_from: str
    settings: Settings
    policy: TLSPolicy
    context: ssl.SSLContext
    username: str | None = None
    password: str | None = None


@dataclass
class _Outcome:
    host_try: HostTry
    error: DeliveryError | None
    dropped: bool = False  # lost before the final dot: worth one quick retry
    tls_failed: bool = False  # handshake failed: `may` retries in plain text
    stale: bool = False  # a reused session was gone before the dot: not the host's answer


class _Refused(Exception):
    """A reply that ends this conversation (non-2xx where a 2xx/3xx was needed)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code} {message}")


class _Broken(Exception):
    """This conversation cannot go on for a reason of ours (TLS policy, AUTH)."""

    def __init__(self, reason: str, *, code: int | None = None, tls_failed: bool = False) -> None:
        self.reason = reason
        self.code = code
        self.tls_failed = tls_failed
        super().__init__(reason)


async def _hang_up(
    smtp: SMTP, raw_transport: asyncio.Transport | None, *, polite: bool, timeout: float
) -> None:
    """QUIT (when `polite` and still connected), then close."""
    if polite and smtp.is_connected:
        with contextlib.suppress(SMTPException, OSError):
            await smtp.quit(timeout=timeout)
    smtp.close()
    # Closing a TLS transport waits for the peer's close_notify; we have nothing more to
    # say, so drop the socket under it now rather than leave it to the event loop.
    if raw_transport is not None and not raw_transport.is_closing():
        raw_transport.abort()
    await asyncio.sleep(0)


@dataclass(frozen=True)
class SessionKey:
    """What a session was opened for: a parked session only carries a message whose fresh
    lookup yields the same target under the same TLS policy, context, login and HELO."""

    mx_host: str
    ip: str
    port: int
    policy: TLSPolicy
    context: int  # id() of the SSLContext (built once per policy and CA file)
    username: str | None
    helo: str


@dataclass(eq=False)
class _Session:
    """An open SMTP session past EHLO (and STARTTLS, AUTH) whose last transaction ended in
    a 250 to the final dot, so the next one starts at MAIL FROM (RFC 5321 §4.1.1.4)."""

    smtp: SMTP
    raw_transport: asyncio.Transport | None
    tls: str | None
    quit_timeout: float
    opened: float  # time.monotonic() at connect
    messages: int = 0
    timer: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    async def close(self, *, polite: bool) -> None:
        await _hang_up(self.smtp, self.raw_transport, polite=polite, timeout=self.quit_timeout)


class SessionCache:
    """Idle SMTP sessions, each kept for a next message to the same target (Postfix's
    connection cache), so a steady flow of mail to one MX does not connect, EHLO, STARTTLS
    and QUIT for every message.

    The caller owns it (the worker, one per run) and uses it from one event loop; a session
    serves one delivery at a time (taken out, parked again after a 250 to the final dot).
    An idle session is QUIT after `idle_limit` seconds; `close()` QUITs every parked one
    and must be awaited before the loop ends.
    """

    def __init__(
        self,
        *,
        max_idle: int = 10,
        idle_limit: float = SESSION_IDLE_LIMIT,
        reuse_limit: float = SESSION_REUSE_LIMIT,
        max_messages: int = SESSION_MAX_MESSAGES,
    ) -> None:
        self.max_idle = max_idle  # idle sessions per key
        self.idle_limit = idle_limit
        self.reuse_limit = reuse_limit
        self.max_messages = max_messages
        self._idle: dict[SessionKey, list[_Session]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self._idle.values())

    def _worn_out(self, session: _Session) -> bool:
        return (
            session.messages >= self.max_messages
            or time.monotonic() - session.opened >= self.reuse_limit
        )

    def take(self, key: SessionKey) -> _Session | None:
        """The most recently parked live session for `key`, out of the cache; the older
        ones go on ageing towards the idle limit."""
        sessions = self._idle.get(key, [])
        while sessions:
            session = sessions.pop()
            if session.timer is not None:
                session.timer.cancel()
            if session.alive and not self._worn_out(session):
                return session
            self._discard(session, polite=session.alive)
        self._idle.pop(key, None)
        return None

    def park(self, key: SessionKey, session: _Session) -> bool:
        """Keep `session` for the next message to `key`; False when it is worn out or the key
        has `max_idle` sessions already (the caller then QUITs it)."""
        sessions = self._idle.setdefault(key, [])
        if not session.alive or self._worn_out(session) or len(sessions) >= self.max_idle:
            return False
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(self.idle_limit, self._expire, key, session)
        sessions.append(session)
        return True

    def _expire(self, key: SessionKey, session: _Session) -> None:
        sessions = self._idle.get(key, [])
        if session in sessions:
            sessions.remove(session)
            self._discard(session, polite=True)
        if not sessions:
            self._idle.pop(key, None)

    def _discard(self, session: _Session, *, polite: bool) -> None:
        task = asyncio.get_running_loop().create_task(session.close(polite=polite))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every parked session and wait for those already closing. Call it when no
        delivery is running; the cache stays usable afterwards."""
        idle, self._idle = self._idle, {}
        for sessions in idle.values():
            for session in sessions:
                if session.timer is not None:
                    session.timer.cancel()
                self._discard(session, polite=True)
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Conversation:
    """One transaction on one address: a fresh TCP connection from connect to the reply to
    the final dot, or (`session`) a parked session from MAIL FROM on.

    With `sessions`, a session whose message was accepted is parked there instead of QUIT."""

    def __init__(
        self,
        target: _Target,
        job: _Job,
        *,
        sessions: SessionCache | None = None,
        key: SessionKey | None = None,
        session: _Session | None = None,
    ) -> None:
        self.target = target
        self.job = job
        self.stage = "connect"
        self.tls: str | None = None
        self.code: int | None = None
        self.text = ""
        self.replies = 0
        self.smtp: SMTP | None = None
        self.raw_transport: asyncio.Transport | None = None
        self.sessions = sessions
        self.key = key
        self.session = session
        if session is not None:
            self.smtp, self.raw_transport, self.tls = (
                session.smtp,
                session.raw_transport,
                session.tls,
            )
            self.stage = "mail"

    def _stale(self, *, lost: bool = False, timed_out: bool = False) -> bool:
        """On a reused session, a failure before the dot that says the session, not the
        server's view of this message, is gone: connection lost, 421, or no reply at all."""
        if self.session is None or self.stage == "dot":
            return False
        return lost or self.code == 421 or (timed_out and self.replies == 0)

    async def run(self, *, use_starttls: bool) -> _Outcome:
        started_at = datetime.now(UTC)
        start = time.monotonic()
        error: DeliveryError | None = None
        dropped = tls_failed = polite = delivered = stale = False
        try:
            await self._converse(use_starttls)
            polite = delivered = True
        except _Refused as exc:
            polite = True
            self.code = exc.code
            status, self.text = parse_reply(exc.message)
            error = SMTPReplyError(
                exc.code,
                self.text,
                enhanced_status=status,
                mx_host=self.target.mx_host,
                ip=self.target.ip,
                port=self.target.port,
                stage=self.stage,
            )
            stale = self._stale()
        except _Broken as exc:
            self.code, self.text = exc.code, exc.reason
            error, tls_failed = self._failure(exc.reason), exc.tls_failed
            polite = not tls_failed
        except TimeoutError:
            settings = self.job.settings
            timeout = settings.smtp_data_timeout if self.stage == "dot" else settings.smtp_timeout
            stale = self._stale(timed_out=True)
            self.code, self.text = None, f"timed out after {timeout:g}s waiting at {self.stage}"
            error = self._failure(self.text)
        except ConnectionError as exc:  # aiosmtplib's disconnects are ConnectionErrors too
            stale = self._stale(lost=True)
            self.code, self.text = None, f"connection lost at {self.stage}: {exc}"
            error, dropped = self._failure(self.text), self.stage != "dot"
        except (SMTPException, OSError) as exc:
            self.code, self.text = None, f"{type(exc).__name__} at {self.stage}: {exc}"
            error = self._failure(self.text)
        finally:
            if not (delivered and self._park(start)):
                await self._close(polite=polite and not stale)
        status = error.enhanced_status if isinstance(error, SMTPReplyError) else None
        if error is None:
            status, self.text = parse_reply(self.text)
        host_try = HostTry(
            mx_host=self.target.mx_host,
            ip=self.target.ip,
            port=self.target.port,
            tls=self.tls,
            code=self.code,
            enhanced_status=status,
            text=self.text,
            stage=self.stage,
            duration=round(time.monotonic() - start, 3),
            started_at=started_at,
        )
        return _Outcome(host_try, error, dropped=dropped, tls_failed=tls_failed, stale=stale)

    def _park(self, opened: float) -> bool:
        """Hand the session to the cache for the next message; False: QUIT it as before."""
        if self.sessions is None or self.key is None or self.smtp is None:
            return False
        session = self.session or _Session(
            self.smtp,
            self.raw_transport,
            self.tls,
            quit_timeout=min(5.0, self.job.settings.smtp_timeout),
            opened=opened,
        )
        session.messages += 1
        if not self.sessions.park(self.key, session):
            return False
        self.smtp = self.raw_transport = None
        return True

    def _failure(self, reason: str) -> ConnectionFailure:
        return ConnectionFailure(
            reason,
            mx_host=self.target.mx_host,
            ip=self.target.ip,
            port=self.target.port,
            after_data=self.stage == "dot",
        )

    async def _connect(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.target.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.sock_connect(sock, (self.target.ip, self.target.port)),
                self.job.settings.smtp_connect_timeout,
            )
        except TimeoutError:
            sock.close()
            raise _Broken(
                f"connect timed out after {self.job.settings.smtp_connect_timeout:g}s"
            ) from None
        except OSError as exc:
            sock.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise _Broken(f"connect failed: {why}") from None
        return sock

    def _reply(self, code: int, message: str, *accepted: int) -> None:
        self.code, self.text = code, message
        self.replies += 1
        if code not in accepted:
            raise _Refused(code, message)

    async def _command(self, *args: bytes, accepted: tuple[int, ...] = (250,)) -> None:
        assert self.smtp is not None
        reply = await self.smtp.execute_command(*args, timeout=self.job.settings.smtp_timeout)
        self._reply(reply.code, reply.message, *accepted)

    async def _hello(self) -> None:
        """EHLO, or HELO when the server does not know EHLO (RFC 5321 §3.2)."""
        assert self.smtp is not None
        self.stage = "ehlo"
        helo = self.job.settings.helo_hostname.encode("ascii")
        timeout = self.job.settings.smtp_timeout
        reply = await self.smtp.execute_command(b"EHLO", helo, timeout=timeout)
        if reply.code == 250:
            self.smtp.last_ehlo_response = reply
        elif reply.code in (500, 502):
            reply = await self.smtp.execute_command(b"HELO", helo, timeout=timeout)
            if reply.code == 250:
                self.smtp.last_helo_response = reply
        self._reply(reply.code, reply.message, 250)

    async def _starttls(self) -> None:
        assert self.smtp is not None
        required = self.job.policy != "may"
        if not self.smtp.supports_extension("starttls"):
            if required:
                raise _Broken(f"STARTTLS required (smtp_tls={self.job.policy}) but not offered")
            return
        self.stage = "starttls"
        try:
            reply = await self.smtp.starttls(
                server_hostname=self.target.mx_host,
                tls_context=self.job.context,
                timeout=self.job.settings.smtp_timeout,
            )
        except SMTPResponseException as exc:
            # The server refused STARTTLS; the connection is still good for plain text.
            self.code, self.text = exc.code, exc.message
            if required:
                raise _Broken(
                    f"STARTTLS refused: {exc.code} {exc.message}", code=exc.code
                ) from None
            return
        except (SMTPException, ssl.SSLError, OSError) as exc:
            raise _Broken(f"TLS handshake failed: {exc}", tls_failed=True) from None
        self.code, self.text = reply.code, reply.message
        ssl_object = self.smtp.get_transport_info("ssl_object")
        self.tls = ssl_object.version() if ssl_object is not None else "TLS"
        await self._hello()

    async def _auth(self) -> None:
        assert self.smtp is not None
        if self.job.username is None:
            return
        self.stage = "auth"
        try:
            reply = await self.smtp.login(
                self.job.username,
                self.job.password or "",
                timeout=self.job.settings.smtp_timeout,
            )
        except SMTPResponseException as exc:  # SMTPAuthenticationError included
            raise _Broken(f"AUTH failed: {exc.code} {exc.message}", code=exc.code) from None
        except (TimeoutError, ConnectionError):
            raise
        except SMTPException as exc:  # no AUTH offered, no common mechanism
            raise _Broken(f"AUTH not possible: {exc}") from None
        self.code, self.text = reply.code, reply.message

    async def _converse(self, use_starttls: bool) -> None:
        if self.session is None:
            await self._open(use_starttls)
        await self._transaction()

    async def _open(self, use_starttls: bool) -> None:
        """Connect, greeting, EHLO, STARTTLS and AUTH: everything before MAIL FROM."""
        sock = await self._connect()
        self.stage = "greeting"
        self.smtp = SMTP(
            sock=sock,
            local_hostname=self.job.settings.helo_hostname,
            timeout=self.job.settings.smtp_timeout,
            start_tls=False,
        )
        try:
            greeting = await self.smtp.connect(timeout=self.job.settings.smtp_timeout)
        except SMTPConnectResponseError as exc:
            raise _Refused(exc.code, exc.message) from None
        if isinstance(self.smtp.transport, asyncio.Transport):
            self.raw_transport = self.smtp.transport
        self._reply(greeting.code, greeting.message, 220)
        await self._hello()
        if use_starttls:
            await self._starttls()
        await self._auth()

    async def _transaction(self) -> None:
        assert self.smtp is not None
        self.stage = "mail"
        options = [f"SIZE={self.job.size}".encode()] if self.smtp.supports_extension("size") else []
        sender = quote_address(self.job.envelope_from).encode("ascii")
        await self._command(b"MAIL", b"FROM:" + sender, *options)
        self.stage = "rcpt"
        recipient = quote_address(self.job.recipient).encode("ascii")
        await self._command(b"RCPT", b"TO:" + recipient, accepted=(250, 251))
        self.stage = "data"
        await self._command(b"DATA", accepted=(354,))
        protocol = self.smtp.protocol
        if protocol is None:
            raise SMTPServerDisconnected("connection lost after 354")
        protocol.write(self.job.payload)
        self.stage = "dot"
        reply = await protocol.read_response(timeout=self.job.settings.smtp_data_timeout)
        self._reply(reply.code, reply.message, 250)

    async def _close(self, *, polite: bool) -> None:
        """QUIT after a reply; after a timeout or a broken stream, only close."""
        smtp, self.smtp = self.smtp, None
        raw_transport, self.raw_transport = self.raw_transport, None
        if smtp is None:
            return
        timeout = min(5.0, self.job.settings.smtp_timeout)
        await _hang_up(smtp, raw_transport, polite=polite, timeout=timeout)


def _dropped(outcome: _Outcome) -> bool:
    return outcome.dropped


def _last_result(state: RetryCallState) -> _Outcome:
    assert state.outcome is not None
    result: _Outcome = state.outcome.result()
    return result


@dataclass
class _Attempt:
    job: _Job
    sessions: SessionCache | None = None
    hosts: list[HostTry] = field(default_factory=list)
    possible_duplicate: bool = False

    def record(self, outcome: _Outcome, *, reused: bool = False) -> None:
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

    def _key(self, target: _Target) -> SessionKey:
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

    def _conversation(self, target: _Target, session: _Session | None = None) -> _Conversation:
        if self.sessions is None:
            return _Conversation(target, self.job)
        key = self._key(target)
        return _Conversation(target, self.job, sessions=self.sessions, key=key, session=session)

    async def _reuse(self, target: _Target) -> _Outcome | None:
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

    async def _once(self, target: _Target) -> _Outcome:
        outcome = await self._conversation(target).run(use_starttls=True)
        self.record(outcome)
        if outcome.tls_failed and self.job.policy == "may":
            outcome = await self._conversation(target).run(use_starttls=False)
            self.record(outcome)
        return outcome

    async def try_target(self, target: _Target) -> _Outcome:
        reused = await self._reuse(target)
        if reused is not None:
            return reused
        retrying = AsyncRetrying(
            stop=stop_after_attempt(DROP_TRIES),
            wait=wait_fixed(DROP_WAIT),
            retry=retry_if_result(_dropped),
            retry_error_callback=_last_result,
        )
        outcome: _Outcome = await retrying(self._once, target)
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
) -> list[_Target]:
    smarthost = settings.smarthost_address
    if smarthost is not None:
        host, port = smarthost
        try:
            ipaddress.ip_address(host)
        except ValueError:
            addresses = await resolve_addresses(host, resolver)
        else:
            addresses = (host,)
        return [_Target(host, ip, port) for ip in addresses]
    domain = domain_of(recipient)
    if not domain:
        raise DNSPermanentError(recipient, "the recipient has no domain")
    hosts = await resolve_mx(domain, resolver, rng=rng)
    return [_Target(mx.name, ip, settings.smtp_port) for mx in hosts for ip in mx.addresses]


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
) -> AttemptResult:
    """Make one delivery attempt of `signed` to `recipient`; never raises for delivery faults.

    `rng` orders MX hosts of equal preference (tests seed it); `cafile` replaces the system
    CAs under smtp_tls=verify (tests pass their own CA). With `sessions`, a target that has a
    parked session gets the message over it, and an accepted message leaves its session
    there; without, every conversation ends in QUIT.
    """
    smarthost = settings.smarthost_address is not None
    policy: TLSPolicy = settings.smtp_tls
    if smarthost:
        policy = "verify" if settings.smtp_tls == "verify" else "encrypt"
    password = settings.smarthost_password
    job = _Job(
        payload=dot_stuff(signed),
        size=len(signed),
        recipient=recipient,
        envelope_from=envelope_from,
        settings=settings,
        policy=policy,
        context=tls_context(policy, cafile),
        username=settings.smarthost_username if smarthost else None,
        password=password.get_secret_value() if smarthost and password else None,
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
