"""Idle SMTP sessions kept for the next message to the same target, as Postfix's
connection cache does, so a steady flow of mail to one MX does not connect, EHLO, STARTTLS
and QUIT for every message.

The MX is still looked up for every message: a parked session only carries a message whose
own fresh lookup yields the same target (`SessionKey`), under the same TLS policy, context,
login and HELO name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Literal

from aiosmtplib import SMTP
from aiosmtplib.errors import SMTPException

TLSPolicy = Literal["may", "encrypt", "verify"]

# Session reuse, as Postfix's connection cache: an idle session waits this long for the next
# message (smtp_connection_cache_time_limit), is reused for this long at most since it
# opened (smtp_connection_reuse_time_limit), and carries this many messages at most (Postfix
# sets no count by default; some receivers close a session after about a hundred).
SESSION_IDLE_LIMIT = 2.0
SESSION_REUSE_LIMIT = 300.0
SESSION_MAX_MESSAGES = 100


async def hang_up(
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
class Session:
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
        await hang_up(self.smtp, self.raw_transport, polite=polite, timeout=self.quit_timeout)


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
        self._idle: dict[SessionKey, list[Session]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self._idle.values())

    def _worn_out(self, session: Session) -> bool:
        return (
            session.messages >= self.max_messages
            or time.monotonic() - session.opened >= self.reuse_limit
        )

    def take(self, key: SessionKey) -> Session | None:
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

    def park(self, key: SessionKey, session: Session) -> bool:
        """Keep `session` for the next message to `key`; False when it is worn out or the key
        has `max_idle` sessions already (the caller then QUITs it)."""
        sessions = self._idle.setdefault(key, [])
        if not session.alive or self._worn_out(session) or len(sessions) >= self.max_idle:
            return False
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(self.idle_limit, self._expire, key, session)
        sessions.append(session)
        return True

    def _expire(self, key: SessionKey, session: Session) -> None:
        sessions = self._idle.get(key, [])
        if session in sessions:
            sessions.remove(session)
            self._discard(session, polite=True)
        if not sessions:
            self._idle.pop(key, None)

    def _discard(self, session: Session, *, polite: bool) -> None:
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
