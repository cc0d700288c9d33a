"""PostgreSQL's LISTEN/NOTIFY, both ways: a commit that makes mail due wakes idle workers at
once instead of at their next poll.

Purely a shortcut: workers keep a short poll, so a lost notification or listener loses
nothing. SQLite has no such channel; there `notify` does nothing and `Listener` ends at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from relay.logs import event

log = logging.getLogger("relay.worker")

CHANNEL = "relay_outbox"


def notify(conn: Connection) -> None:
    """NOTIFY at this transaction's commit (PostgreSQL only)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_notify(CHANNEL, "")))


def listen_url(url: str) -> str | None:
    """A libpq URL for LISTEN on PostgreSQL; None for SQLite (workers poll)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    """`async for _ in Listener(url)`: one item per notification, for ever; reconnects with
    backoff (1 s doubling to 30 s) when the connection fails. `listening` is set while a
    LISTEN is in place."""

    def __init__(self, url: str, *, listening: asyncio.Event | None = None) -> None:
        self.url = listen_url(url)
        self.listening = listening or asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[None]:
        if self.url is None:
            return
        delay = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    delay = 1.0
                    async for _notify in conn.notifies():
                        yield None
            except psycopg.Error as exc:
                event(log, "worker.listen_failed", logging.WARNING, error=str(exc), retry_in=delay)
            self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)
