"""One SMTP conversation on one address: a fresh connection from connect to the reply to
the final dot, or a parked session (relay.mail.sessions) from MAIL FROM on.

- STARTTLS (`settings.smtp_tls`): `may` uses it when offered without checking the
  certificate (relay.mail.smtp reconnects in plain text when the handshake fails, as MTAs
  do); `encrypt` requires it (no certificate check); `verify` requires it and verifies the
  certificate against the MX name and the system CAs (or `cafile`).
- AUTH, for a smarthost only: a refused login is a reason of ours (`Broken`), not the
  domain's answer.
- On a reused session, a failure before the dot that says the session, not the server's
  view of this message, is gone (connection lost, 421, no reply at all) is `stale`: the
  caller logs it and sends the message over a fresh connection.
- The DATA payload is the signed bytes, only dot-stuffed and terminated here; nothing
  re-serialises a message object, so the DKIM signature stays valid.
- `Job.before_dot`, when set, is awaited after the 354 and before the message and its final
  dot are written: the last moment an attempt can still be called off without the server
  having the message. The worker confirms its lease there and cancels the attempt when it
  lost it; the connection is then closed without the dot (no QUIT: the server is reading
  data), and the server discards the unfinished message.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiosmtplib import SMTP
from aiosmtplib.email import quote_address
from aiosmtplib.errors import (
    SMTPConnectResponseError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from relay.errors import ConnectionFailure, DeliveryError, SMTPReplyError
from relay.mail.attempt import HostTry
from relay.mail.sessions import Session, SessionCache, SessionKey, TLSPolicy, hang_up
from relay.settings import Settings

BeforeDot = Callable[[], Awaitable[None]]

STAGES = ("connect", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot")

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


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
class Target:
    mx_host: str
    ip: str
    port: int


@dataclass(frozen=True)
class Job:
    payload: bytes
    size: int
    recipient: str
    envelope_from: str
    settings: Settings
    policy: TLSPolicy
    context: ssl.SSLContext
    username: str | None = None
    password: str | None = None
    before_dot: BeforeDot | None = None


@dataclass
class Ended:
    host_try: HostTry
    error: DeliveryError | None
    dropped: bool = False  # lost before the final dot: worth one quick retry
    tls_failed: bool = False  # handshake failed: `may` retries in plain text
    stale: bool = False  # a reused session was gone before the dot: not the host's answer


class Refused(Exception):
    """A reply that ends this conversation (non-2xx where a 2xx/3xx was needed)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code} {message}")


class Broken(Exception):
    """This conversation cannot go on for a reason of ours (TLS policy, AUTH)."""

    def __init__(self, reason: str, *, code: int | None = None, tls_failed: bool = False) -> None:
        self.reason = reason
        self.code = code
        self.tls_failed = tls_failed
        super().__init__(reason)


class Conversation:
    """One transaction on one address: a fresh TCP connection from connect to the reply to
    the final dot, or (`session`) a parked session from MAIL FROM on.

    With `sessions`, a session whose message was accepted is parked there instead of QUIT."""

    def __init__(
        self,
        target: Target,
        job: Job,
        *,
        sessions: SessionCache | None = None,
        key: SessionKey | None = None,
        session: Session | None = None,
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

    async def run(self, *, use_starttls: bool) -> Ended:
        started_at = datetime.now(UTC)
        start = time.monotonic()
        error: DeliveryError | None = None
        dropped = tls_failed = polite = delivered = stale = False
        try:
            await self._converse(use_starttls)
            polite = delivered = True
        except Refused as exc:
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
        except Broken as exc:
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
        return Ended(host_try, error, dropped=dropped, tls_failed=tls_failed, stale=stale)

    def _park(self, opened: float) -> bool:
        """Hand the session to the cache for the next message; False: QUIT it as before."""
        if self.sessions is None or self.key is None or self.smtp is None:
            return False
        session = self.session or Session(
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
            raise Broken(
                f"connect timed out after {self.job.settings.smtp_connect_timeout:g}s"
            ) from None
        except OSError as exc:
            sock.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise Broken(f"connect failed: {why}") from None
        return sock

    def _reply(self, code: int, message: str, *accepted: int) -> None:
        self.code, self.text = code, message
        self.replies += 1
        if code not in accepted:
            raise Refused(code, message)

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
                raise Broken(f"STARTTLS required (smtp_tls={self.job.policy}) but not offered")
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
                raise Broken(f"STARTTLS refused: {exc.code} {exc.message}", code=exc.code) from None
            return
        except (SMTPException, ssl.SSLError, OSError) as exc:
            raise Broken(f"TLS handshake failed: {exc}", tls_failed=True) from None
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
            raise Broken(f"AUTH failed: {exc.code} {exc.message}", code=exc.code) from None
        except (TimeoutError, ConnectionError):
            raise
        except SMTPException as exc:  # no AUTH offered, no common mechanism
            raise Broken(f"AUTH not possible: {exc}") from None
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
            raise Refused(exc.code, exc.message) from None
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
        if self.job.before_dot is not None:
            await self.job.before_dot()
        protocol = self.smtp.protocol if self.smtp is not None else None
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
        await hang_up(smtp, raw_transport, polite=polite, timeout=timeout)
