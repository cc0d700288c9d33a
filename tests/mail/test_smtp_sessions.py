"""SMTP session reuse (relay.smtp.SessionCache) against real servers on loopback: aiosmtpd
peers that count connections, EHLOs, RSETs and QUITs, and the DNS test server, which counts
the MX lookups that must still happen for every message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.errors import ConnectionFailure, SMTPReplyError
from relay.mail.attempt import AttemptResult
from relay.mail.mx import make_resolver
from relay.mail.sessions import SessionCache
from relay.mail.smtp import deliver
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import MX2_IP, MX_IP
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.worker.delivery import Worker
from tests.peers.smtp import DROP, HANG, FaultySMTP, ScriptedHandler, SMTPPeer, SubmissionPeer
from tests.store.test_outbox import built

SENDER = "form@relay.test"
SUPPORT = "help@support.test"
MESSAGE = b"From: form@relay.test\r\nTo: help@support.test\r\nSubject: Hi\r\n\r\nHello\r\n.dot\r\n"
USERS = {"relay": "s3cret", "other": "s3cret2"}


class CountingHandler(ScriptedHandler):
    """A ScriptedHandler that also counts the commands that open and end sessions, and can
    hold DATA until several transactions are inside it at once."""

    def __init__(self) -> None:
        super().__init__()
        self.ehlos = 0
        self.rsets = 0
        self.quits = 0
        self.lost = 0
        self.hold_data_for = 0  # DATA waits until this many transactions are in it
        self.in_data = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> list[str]:
        self.ehlos += 1
        return await super().handle_EHLO(server, session, envelope, hostname, responses)

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.rsets += 1
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 2.0.0 Bye"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_data += 1
        for _ in range(500):  # bounded: 10 s at most
            if self.in_data >= self.hold_data_for:
                break
            await asyncio.sleep(0.02)
        return await super().handle_DATA(server, session, envelope)


class CountingSMTP(FaultySMTP):
    event_handler: CountingHandler

    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.lost += 1
        super().connection_lost(error)


class _Counting:
    smtp_class: type[FaultySMTP] = CountingSMTP
    handler: ScriptedHandler

    @property
    def counts(self) -> CountingHandler:
        assert isinstance(self.handler, CountingHandler)
        return self.handler


class CountingPeer(_Counting, SMTPPeer):
    pass


class CountingSubmissionPeer(_Counting, SubmissionPeer):
    pass


@pytest.fixture
def mx_handler() -> CountingHandler:
    return CountingHandler()


@pytest.fixture
def mx_server(mx_handler: CountingHandler) -> Iterator[CountingPeer]:
    with CountingPeer(mx_handler, host=MX_IP, hostname="mx1.support.test") as peer:
        yield peer


@pytest.fixture
def tls_server(
    mx_handler: CountingHandler, tls_context_pair: tuple[ssl.SSLContext, Path]
) -> Iterator[CountingPeer]:
    with CountingPeer(
        mx_handler, host=MX_IP, hostname="mx1.support.test", tls_context=tls_context_pair[0]
    ) as peer:
        yield peer


@pytest.fixture
async def sessions() -> AsyncIterator[SessionCache]:
    cache = SessionCache()
    yield cache
    await cache.close()


async def send(settings: Settings, sessions: SessionCache | None, **kwargs: Any) -> AttemptResult:
    return await deliver(
        MESSAGE,
        recipient=SUPPORT,
        envelope_from=SENDER,
        settings=settings,
        resolver=make_resolver(settings),
        sessions=sessions,
        **kwargs,
    )


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (bounded, 10 s) for something another thread or a timer does."""
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition never came true")


def _lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(name + " ")]


# --- reuse ----------------------------------------------------------------------------------


async def test_messages_to_one_mx_share_one_session_and_each_looks_up_the_mx(
    settings: Settings,
    mx_server: CountingPeer,
    world_dns: DNSZoneServer,
    sessions: SessionCache,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="relay.smtp"):
        results = [await send(settings, sessions) for _ in range(5)]
    assert [r.outcome for r in results] == ["delivered"] * 5
    assert all(len(r.hosts) == 1 and not r.possible_duplicate for r in results)
    assert [r.hosts[0].stage for r in results] == ["dot"] * 5
    counts = mx_server.counts
    assert (counts.connections, counts.ehlos, counts.rsets, counts.quits) == (1, 1, 0, 0)
    assert [m.data for m in mx_server.messages] == [MESSAGE] * 5
    assert world_dns.queried("support.test", "MX") == 5
    replies = _lines(caplog, "smtp.reply")
    assert ["reused=1" in line for line in replies] == [False, True, True, True, True]
    assert len(sessions) == 1

    await sessions.close()
    assert (counts.quits, len(sessions)) == (1, 0)


async def test_without_a_cache_every_message_has_its_own_session(
    settings: Settings, mx_server: CountingPeer
) -> None:
    for _ in range(3):
        assert (await send(settings, None)).outcome == "delivered"
    counts = mx_server.counts
    assert (counts.connections, counts.ehlos, counts.quits) == (3, 3, 3)


async def test_an_idle_session_is_quit_after_the_idle_limit(
    settings: Settings, mx_server: CountingPeer
) -> None:
    cache = SessionCache(idle_limit=0.1)
    try:
        assert (await send(settings, cache)).outcome == "delivered"
        assert len(cache) == 1
        await until(lambda: mx_server.counts.quits == 1)
        assert len(cache) == 0
        assert (await send(settings, cache)).outcome == "delivered"
        assert mx_server.counts.connections == 2
    finally:
        await cache.close()
    assert mx_server.counts.quits == 2


async def test_a_session_carries_at_most_max_messages(
    settings: Settings, mx_server: CountingPeer
) -> None:
    cache = SessionCache(max_messages=2)
    try:
        for _ in range(5):
            assert (await send(settings, cache)).outcome == "delivered"
        counts = mx_server.counts
        assert (counts.connections, counts.quits) == (3, 2)
    finally:
        await cache.close()
    assert mx_server.counts.quits == 3


async def test_a_session_past_the_reuse_limit_is_not_parked(
    settings: Settings, mx_server: CountingPeer
) -> None:
    cache = SessionCache(reuse_limit=0)
    for _ in range(2):
        assert (await send(settings, cache)).outcome == "delivered"
    assert len(cache) == 0
    assert (mx_server.counts.connections, mx_server.counts.quits) == (2, 2)


async def test_idle_sessions_per_target_are_capped(
    settings: Settings, mx_server: CountingPeer
) -> None:
    mx_server.counts.hold_data_for = 3  # three deliveries inside DATA at once
    cache = SessionCache(max_idle=2)
    try:
        results = await asyncio.gather(*(send(settings, cache) for _ in range(3)))
        assert [r.outcome for r in results] == ["delivered"] * 3
        assert len(cache) == 2
        assert (mx_server.counts.connections, mx_server.counts.quits) == (3, 1)
    finally:
        await cache.close()
    assert mx_server.counts.quits == 3


async def test_reuse_over_starttls(
    short: Callable[..., Settings],
    tls_server: CountingPeer,
    tls_context_pair: tuple[ssl.SSLContext, Path],
    sessions: SessionCache,
) -> None:
    settings = short(RELAY_SMTP_PORT=str(tls_server.port), RELAY_SMTP_TLS="verify")
    results = [await send(settings, sessions, cafile=tls_context_pair[1]) for _ in range(3)]
    assert [r.outcome for r in results] == ["delivered"] * 3
    assert all(r.hosts[0].tls and r.hosts[0].tls.startswith("TLSv1.") for r in results)
    assert all(m.tls == results[0].hosts[0].tls for m in tls_server.messages)
    # EHLO before and after STARTTLS, once.
    assert (tls_server.counts.connections, tls_server.counts.ehlos) == (1, 2)


async def test_no_reuse_across_tls_policies(
    short: Callable[..., Settings], tls_server: CountingPeer, sessions: SessionCache
) -> None:
    may = short(RELAY_SMTP_PORT=str(tls_server.port), RELAY_SMTP_TLS="may")
    encrypt = short(RELAY_SMTP_PORT=str(tls_server.port), RELAY_SMTP_TLS="encrypt")
    for settings in (may, encrypt, may, encrypt):
        assert (await send(settings, sessions)).outcome == "delivered"
    assert tls_server.counts.connections == 2
    assert len(sessions) == 2


@pytest.fixture
def submission(
    tls_context_pair: tuple[ssl.SSLContext, Path],
) -> Iterator[CountingSubmissionPeer]:
    with CountingSubmissionPeer(
        CountingHandler(),
        users=USERS,
        host=MX_IP,
        hostname="mx1.support.test",
        tls_context=tls_context_pair[0],
    ) as peer:
        yield peer


async def test_smarthost_sessions_are_reused_per_login(
    short: Callable[..., Settings],
    submission: CountingSubmissionPeer,
    world_dns: DNSZoneServer,
    sessions: SessionCache,
) -> None:
    def login(user: str) -> Settings:
        return short(
            RELAY_SMARTHOST=f"{MX_IP}:{submission.port}",
            RELAY_SMARTHOST_USERNAME=user,
            RELAY_SMARTHOST_PASSWORD=USERS[user],
        )

    relay, other = login("relay"), login("other")
    for settings in (relay, relay, other, relay, other):
        result = await send(settings, sessions)
        assert result.outcome == "delivered", result.summary
    assert submission.counts.connections == 2
    assert len(submission.messages) == 5
    assert world_dns.queried("support.test", "MX") == 0


async def test_a_parked_session_to_mx2_does_not_divert_mail_from_mx1(
    settings: Settings, mx_server: CountingPeer, world_dns: DNSZoneServer, sessions: SessionCache
) -> None:
    world_dns.add("support.test. 300 IN MX 20 mx2.support.test.")
    with CountingPeer(
        CountingHandler(), host=MX2_IP, port=mx_server.port, hostname="mx2.support.test"
    ) as mx2:
        mx_server.handler.greeting.append("421 4.3.2 Busy")
        first = await send(settings, sessions)
        assert [h.mx_host for h in first.hosts] == ["mx1.support.test", "mx2.support.test"]
        second = await send(settings, sessions)
        assert [h.mx_host for h in second.hosts] == ["mx1.support.test"]
        assert len(sessions) == 2
        await sessions.close()
        assert (mx2.counts.connections, mx2.counts.quits) == (1, 1)
    assert (len(mx_server.messages), len(mx2.messages)) == (1, 1)


# --- a parked session that went stale -------------------------------------------------------


class ShortIdlePeer(CountingPeer):
    idle_timeout = 0.2


async def test_the_server_closing_an_idle_session_costs_nothing(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, sessions: SessionCache
) -> None:
    handler = CountingHandler()
    with ShortIdlePeer(handler, host=MX_IP, hostname="mx1.support.test") as peer:
        settings = make_settings(
            RELAY_DNS_NAMESERVERS=world_dns.address, RELAY_SMTP_PORT=str(peer.port)
        )
        assert (await send(settings, sessions)).outcome == "delivered"
        await until(lambda: handler.lost == 1)  # aiosmtpd's idle timeout closed it
        result = await send(settings, sessions)
        assert result.outcome == "delivered"
        assert not result.possible_duplicate
        [host] = result.hosts
        assert (host.stage, host.code) == ("dot", 250)
        assert (handler.connections, len(peer.messages)) == (2, 2)


@pytest.fixture
def stale_settings(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, mx_server: CountingPeer
) -> Settings:
    return make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
        RELAY_SMTP_TIMEOUT="0.5",
    )


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("421 4.4.2 Idle too long, closing", "Idle too long"),
        (DROP, "connection lost at mail"),
        (HANG, "timed out after 0.5s waiting at mail"),
    ],
)
async def test_a_stale_session_is_replaced_by_a_fresh_one_transparently(
    stale_settings: Settings,
    mx_server: CountingPeer,
    sessions: SessionCache,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    reason: str,
) -> None:
    assert (await send(stale_settings, sessions)).outcome == "delivered"
    mx_server.handler.mail.append(fault)
    with caplog.at_level(logging.INFO, logger="relay.smtp"):
        result = await send(stale_settings, sessions)
    assert result.outcome == "delivered"
    assert result.error is None
    assert not result.possible_duplicate
    [host] = result.hosts  # the stale session is no host try
    assert (host.mx_host, host.stage, host.code) == ("mx1.support.test", "dot", 250)
    assert mx_server.counts.connections == 2
    assert len(mx_server.messages) == 2
    [stale] = _lines(caplog, "smtp.session_stale")
    assert "host=mx1.support.test ip=127.0.0.2" in stale
    assert "stage=mail" in stale
    assert reason in stale
    [reply] = _lines(caplog, "smtp.reply")
    assert "reused=1" not in reply
    assert len(sessions) == 1  # the fresh one, parked


async def test_550_at_rcpt_on_a_reused_session_is_permanent(
    settings: Settings,
    mx_server: CountingPeer,
    sessions: SessionCache,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert (await send(settings, sessions)).outcome == "delivered"
    mx_server.handler.rcpt.append("550 5.1.1 No such user here")
    with caplog.at_level(logging.INFO, logger="relay.smtp"):
        result = await send(settings, sessions)
    assert result.outcome == "permanent"
    assert isinstance(result.error, SMTPReplyError)
    assert (result.error.code, result.error.enhanced_status, result.error.stage) == (
        550,
        "5.1.1",
        "rcpt",
    )
    [host] = result.hosts
    assert (host.code, host.stage) == (550, "rcpt")
    [reply] = _lines(caplog, "smtp.reply")
    assert "reused=1" in reply
    assert _lines(caplog, "smtp.session_stale") == []
    # Closed after the failure, never parked again.
    assert len(sessions) == 0
    assert (mx_server.counts.connections, mx_server.counts.quits) == (1, 1)


async def test_451_at_mail_on_a_reused_session_is_the_servers_answer(
    settings: Settings, mx_server: CountingPeer, sessions: SessionCache
) -> None:
    assert (await send(settings, sessions)).outcome == "delivered"
    mx_server.handler.mail.append("451 4.3.0 Try later")
    result = await send(settings, sessions)
    assert result.outcome == "temporary"
    assert isinstance(result.error, SMTPReplyError)
    assert (result.error.code, result.error.stage) == (451, "mail")
    assert [h.code for h in result.hosts] == [451]
    assert len(sessions) == 0
    assert mx_server.counts.connections == 1


async def test_a_drop_after_the_dot_on_a_reused_session_is_a_possible_duplicate(
    settings: Settings, mx_server: CountingPeer, sessions: SessionCache
) -> None:
    assert (await send(settings, sessions)).outcome == "delivered"
    mx_server.handler.data.append(DROP)
    result = await send(settings, sessions)
    assert result.outcome == "temporary"
    assert result.possible_duplicate
    assert isinstance(result.error, ConnectionFailure)
    assert result.error.after_data
    [host] = result.hosts
    assert host.stage == "dot"
    assert len(mx_server.messages) == 2  # the server did take it
    assert mx_server.counts.connections == 1, "never retried after the dot"
    assert len(sessions) == 0


# --- the worker -----------------------------------------------------------------------------


async def test_the_worker_reuses_sessions_and_quits_them_when_it_stops(
    make_settings: Callable[..., Settings],
    world_dns: DNSZoneServer,
    mx_server: CountingPeer,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
        RELAY_WORKER_CONCURRENCY="1",
    )
    store = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    try:
        ids = [store.enqueue(built(settings, n)) for n in range(4)]
        await Worker(store, settings, poll_interval=0.05).run(once=True)
        assert [store.get(i).status for i in ids] == ["delivered"] * 4
    finally:
        store.dispose()
    counts = mx_server.counts
    assert len(mx_server.messages) == 4
    # One session, unless a very slow claim let it idle past the limit; every one was QUIT.
    assert counts.connections < 4
    assert counts.ehlos == counts.quits == counts.connections
    assert world_dns.queried("support.test", "MX") == 4
