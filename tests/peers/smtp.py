"""A real SMTP server (aiosmtpd) on loopback that plays an MX and misbehaves on request.

Faults are simulated on the server side, as aiosmtplib's own tests do: a `ScriptedHandler`
pops the next reply for each stage from a queue ("451 4.7.1 Try later", or the special
"DROP" to cut the connection, "HANG" to never answer), greylists new senders, and stores what
it accepted. `FaultySMTP` adds the faults aiosmtpd has no hook for: a non-220 greeting, a
greeting that never comes, a reset in the middle of DATA, and a STARTTLS that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.sandbox.smtpserver import ThreadedSMTPServer

DROP = "DROP"
HANG = "HANG"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str
    helo: str | None
    tls: str | None
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> Message:
        return message_from_bytes(self.data)


class ScriptedHandler:
    """Replies 250 unless told otherwise; every transaction it sees is recorded."""

    def __init__(self, *, greylist_seconds: float | None = None) -> None:
        self.greeting: deque[str] = deque()  # "421 ...", DROP or HANG, per connection
        self.ehlo: deque[str] = deque()
        self.mail: deque[str] = deque()
        self.rcpt: deque[str] = deque()
        self.data: deque[str] = deque()
        self.mid_data: deque[str] = deque()  # DROP: reset the connection inside DATA
        self.starttls_broken = False
        self.greylist_seconds = greylist_seconds
        self._greylist: dict[tuple[str, str], float] = {}
        self.messages: list[Received] = []
        self.connections = 0
        self.transactions: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    # --- helpers for the fault queues ---
    @staticmethod
    async def _scripted(queue: deque[str], server: SMTP) -> str | None:
        if not queue:
            return None
        reply = queue.popleft()
        if reply == DROP:
            assert server.transport is not None
            server.transport.abort()
            return "250 dropped"  # never reaches the client
        if reply == HANG:
            await asyncio.sleep(3600)
        return reply

    # --- aiosmtpd hooks ---
    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        scripted = await self._scripted(self.ehlo, server)
        return [scripted] if scripted else responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        scripted = await self._scripted(self.mail, server)
        if scripted and not scripted.startswith("2"):
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return scripted or "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        scripted = await self._scripted(self.rcpt, server)
        if scripted and not scripted.startswith("2"):
            return scripted
        if self.greylist_seconds is not None:
            key = (str(envelope.mail_from), address.lower())
            first = self._greylist.setdefault(key, time.monotonic())
            if time.monotonic() - first < self.greylist_seconds:
                return "451 4.7.1 Greylisted, please try again later"
        envelope.rcpt_tos.append(address)
        return scripted or "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        scripted = await self._scripted(self.data, server)
        if scripted and not scripted.startswith("2") and scripted != "250 dropped":
            return scripted
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        received = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            peer=str(session.peer[0]) if session.peer else "",
            helo=session.host_name,
            tls=ssl_object.version() if ssl_object else None,
        )
        with self.lock:
            self.messages.append(received)
        return scripted or "250 2.0.0 Queued"


class FaultySMTP(SMTP):
    """aiosmtpd's SMTP with server-side faults that its handler hooks cannot express."""

    event_handler: ScriptedHandler

    def eof_received(self) -> bool | None:
        # Close our side when the client leaves: after a HANG fault the transport would
        # otherwise stay half-open and leak as a ResourceWarning into some later test.
        super().eof_received()
        return False

    async def _handle_client(self) -> None:
        self.event_handler.connections += 1
        if self.event_handler.greeting:
            reply = self.event_handler.greeting.popleft()
            if reply == HANG:
                await asyncio.sleep(3600)
                return
            assert self.transport is not None
            if reply != DROP:
                await self.push(reply)
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.event_handler.starttls_broken:
            await self.push("220 Ready to start TLS")
            assert self.transport is not None
            self.transport.write(b"\x15\x03\x03\x00\x02\x02\x28")  # a TLS alert, not a hello
            self.transport.close()
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if self.event_handler.mid_data:
            self.event_handler.mid_data.popleft()
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader.read(64), timeout=5)
            assert self.transport is not None
            self.transport.abort()
            return
        await super().smtp_DATA(arg)


class SMTPPeer(ThreadedSMTPServer):
    """Runs one FaultySMTP (or `smtp_class`) server in its own thread and event loop."""

    smtp_class: type[FaultySMTP] = FaultySMTP
    idle_timeout = 60.0  # aiosmtpd closes a session silent for this long

    def __init__(
        self,
        handler: ScriptedHandler | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_context: ssl.SSLContext | None = None,
        hostname: str = "mx.support.test",
    ) -> None:
        super().__init__(host=host, port=port)
        self.thread_name = f"smtp-{host}"
        self.handler = handler or ScriptedHandler()
        self.tls_context = tls_context
        self.hostname = hostname

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def _factory(self) -> SMTP:
        return self.smtp_class(
            self.handler,
            hostname=self.hostname,
            tls_context=self.tls_context,
            require_starttls=False,
            enable_SMTPUTF8=True,
            decode_data=False,
            data_size_limit=50 * 1024 * 1024,
            timeout=self.idle_timeout,
        )

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.handler.messages) >= count:
                return self.handler.messages
            time.sleep(0.02)
        raise AssertionError(
            f"expected {count} message(s) at {self.host}:{self.port}, "
            f"got {len(self.handler.messages)}"
        )


class SubmissionPeer(SMTPPeer):
    """A submission server: STARTTLS, then AUTH (LOGIN/PLAIN against `users`) before MAIL."""

    def __init__(
        self, handler: ScriptedHandler | None = None, *, users: Mapping[str, str], **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.users = dict(users)

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (
            self.users.get(auth_data.login.decode(errors="replace"))
            == auth_data.password.decode(errors="replace")
        )
        return AuthResult(success=ok, handled=False)

    def _factory(self) -> SMTP:
        return self.smtp_class(
            self.handler,
            hostname=self.hostname,
            tls_context=self.tls_context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            authenticator=self._authenticate,
            decode_data=False,
        )
