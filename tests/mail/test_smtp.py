"""One delivery attempt against real SMTP servers on loopback (aiosmtpd, tests/peers/smtp.py).

MX1 (mx1.support.test) listens on 127.0.0.2 and MX2 on 127.0.0.3, on the same port because
RELAY_SMTP_PORT is one setting for all MX hosts.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import ConnectionFailure, DNSPermanentError, DNSTemporaryError, SMTPReplyError
from relay.mail.attempt import AttemptResult
from relay.mail.conversation import dot_stuff, parse_reply
from relay.mail.mx import make_resolver
from relay.mail.smtp import deliver
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import MX2_IP, MX_IP
from relay.settings import Settings
from tests.peers.smtp import DROP, HANG, ScriptedHandler, SMTPPeer, SubmissionPeer

SENDER = "form@relay.test"
SUPPORT = "help@support.test"
# A small signed-looking message with lines that need dot-stuffing.
MESSAGE = (
    b"DKIM-Signature: v=1; a=rsa-sha256; d=relay.test; s=s1; h=from:to:subject;\r\n"
    b" bh=AAAA; b=BBBB\r\n"
    b"From: Example Shop <form@relay.test>\r\n"
    b"To: help@support.test\r\n"
    b"Subject: Hello\r\n"
    b"Message-ID: <1@relay.test>\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"last line\r\n"
)


async def send(settings: Settings, **kwargs: Any) -> AttemptResult:
    return await deliver(
        MESSAGE,
        recipient=SUPPORT,
        envelope_from=SENDER,
        settings=settings,
        resolver=make_resolver(settings),
        **kwargs,
    )


Peer = SMTPPeer


@pytest.fixture
def mx2_handler() -> ScriptedHandler:
    return ScriptedHandler()


@pytest.fixture
def mx2_server(
    mx_server: SMTPPeer, mx2_handler: ScriptedHandler, world_dns: DNSZoneServer
) -> Iterator[SMTPPeer]:
    """mx2.support.test (preference 20) on 127.0.0.3, same port as MX1."""
    world_dns.add("support.test. 300 IN MX 20 mx2.support.test.")
    with Peer(mx2_handler, host=MX2_IP, port=mx_server.port, hostname="mx2.support.test") as p:
        yield p


# --- pure helpers ---------------------------------------------------------------------------


def test_dot_stuff() -> None:
    assert dot_stuff(b"a\r\n.b\r\n.\r\n") == b"a\r\n..b\r\n..\r\n.\r\n"
    assert dot_stuff(b".start\nbare lf\rbare cr") == b"..start\r\nbare lf\r\nbare cr\r\n.\r\n"
    assert dot_stuff(b"") == b"\r\n.\r\n"
    assert dot_stuff(MESSAGE).replace(b"\r\n..", b"\r\n.") == MESSAGE + b".\r\n"


@given(st.lists(st.text(alphabet=st.sampled_from(".a \t"), max_size=6), max_size=8))
def test_dot_stuff_round_trips(lines: list[str]) -> None:
    message = "".join(line + "\r\n" for line in lines).encode()
    payload = dot_stuff(message)
    body, terminator = payload[:-3], payload[-3:]
    assert terminator == b".\r\n"
    received = body.split(b"\r\n")[:-1]
    assert b"." not in received, "no line may end the DATA early"
    assert b"".join(
        (line[1:] if line.startswith(b".") else line) + b"\r\n" for line in received
    ) == (message or b"\r\n")


def test_parse_reply() -> None:
    assert parse_reply("4.7.1 Greylisted, try later") == ("4.7.1", "Greylisted, try later")
    assert parse_reply("5.1.1 No such user\n5.1.1 really") == ("5.1.1", "No such user really")
    assert parse_reply("Greylisted") == (None, "Greylisted")
    assert parse_reply("2.0.0") == ("2.0.0", "")
    assert parse_reply("") == (None, "")


# --- delivered --------------------------------------------------------------------------------


async def test_delivers_the_exact_bytes(
    settings: Settings, mx_server: SMTPPeer, world_dns: DNSZoneServer
) -> None:
    result = await send(settings)
    assert result.outcome == "delivered"
    assert result.error is None
    assert not result.possible_duplicate
    [host] = result.hosts
    assert (host.mx_host, host.ip, host.port) == ("mx1.support.test", MX_IP, mx_server.port)
    assert (host.code, host.enhanced_status, host.text, host.stage) == (
        250,
        "2.0.0",
        "Queued",
        "dot",
    )
    assert host.tls is None  # this server offers no STARTTLS
    assert host.duration >= 0
    assert host.started_at.tzinfo is not None
    assert result.summary == "250 2.0.0 Queued (mx1.support.test)"
    [received] = mx_server.messages
    assert received.data == MESSAGE
    assert (received.mail_from, received.rcpt_tos) == (SENDER, [SUPPORT])
    assert received.helo == settings.helo_hostname == "mail.relay.test"
    assert world_dns.queried("support.test", "MX") == 1


async def test_logs_one_line_per_host(
    settings: Settings, mx_server: SMTPPeer, caplog: pytest.LogCaptureFixture
) -> None:
    mx_server.handler.rcpt.append("451 4.7.1 Greylisted")
    with caplog.at_level(logging.INFO, logger="relay.smtp"):
        await send(settings)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("smtp.reply")]
    assert "host=mx1.support.test ip=127.0.0.2" in line
    assert "stage=rcpt code=451 status=4.7.1 text=Greylisted" in line


async def test_greylisted_then_delivered_with_a_lookup_each_attempt(
    settings: Settings, mx_server: SMTPPeer, world_dns: DNSZoneServer
) -> None:
    mx_server.handler.rcpt.append("451 4.7.1 Greylisted, please try again later")
    first = await send(settings)
    assert first.outcome == "temporary"
    assert isinstance(first.error, SMTPReplyError)
    assert (first.error.code, first.error.enhanced_status, first.error.stage) == (
        451,
        "4.7.1",
        "rcpt",
    )
    assert first.error.temporary
    assert first.summary == "451 4.7.1 Greylisted, please try again later (mx1.support.test)"
    assert mx_server.messages == []

    second = await send(settings)
    assert second.outcome == "delivered"
    assert len(mx_server.messages) == 1
    assert world_dns.queried("support.test", "MX") == 2


async def test_550_at_rcpt_is_permanent_and_stops_the_attempt(
    settings: Settings, mx_server: SMTPPeer, mx2_server: SMTPPeer
) -> None:
    mx_server.handler.rcpt.append("550 5.1.1 No such user here")
    result = await send(settings)
    assert result.outcome == "permanent"
    error = result.error
    assert isinstance(error, SMTPReplyError)
    assert (error.code, error.enhanced_status, error.text) == (550, "5.1.1", "No such user here")
    assert (error.mx_host, error.ip, error.stage) == ("mx1.support.test", MX_IP, "rcpt")
    assert not error.temporary
    assert [h.mx_host for h in result.hosts] == ["mx1.support.test"]
    assert mx2_server.handler.connections == 0


async def test_4xx_on_mx1_moves_to_mx2(
    settings: Settings, mx_server: SMTPPeer, mx2_server: SMTPPeer
) -> None:
    mx_server.handler.mail.append("452 4.3.1 Insufficient system storage")
    result = await send(settings)
    assert result.outcome == "delivered"
    assert [(h.mx_host, h.code, h.stage) for h in result.hosts] == [
        ("mx1.support.test", 452, "mail"),
        ("mx2.support.test", 250, "dot"),
    ]
    assert mx2_server.messages[0].data == MESSAGE


@pytest.mark.parametrize("greeting", ["421 4.3.2 Service shutting down", "554 5.7.1 No service"])
async def test_bad_greeting_on_mx1_moves_to_mx2(
    settings: Settings, mx_server: SMTPPeer, mx2_server: SMTPPeer, greeting: str
) -> None:
    mx_server.handler.greeting.append(greeting)
    result = await send(settings)
    assert result.outcome == "delivered"
    first, second = result.hosts
    assert (first.mx_host, first.code, first.stage) == (
        "mx1.support.test",
        int(greeting[:3]),
        "greeting",
    )
    assert (second.mx_host, second.ip, second.code) == ("mx2.support.test", MX2_IP, 250)
    assert len(mx2_server.messages) == 1
    assert mx_server.messages == []


async def test_5xx_greeting_everywhere_is_permanent(
    settings: Settings, mx_server: SMTPPeer, mx2_server: SMTPPeer
) -> None:
    mx_server.handler.greeting.append("554 5.7.1 No service")
    mx2_server.handler.greeting.append("554 5.7.1 No service either")
    result = await send(settings)
    assert result.outcome == "permanent"
    assert isinstance(result.error, SMTPReplyError)
    assert result.error.mx_host == "mx2.support.test"


async def test_temporary_failure_anywhere_keeps_the_attempt_temporary(
    short: Callable[..., Settings], mx_server: SMTPPeer, mx2_server: SMTPPeer
) -> None:
    mx_server.handler.greeting.append("554 5.7.1 No service")
    mx2_server.handler.rcpt.append("451 4.3.0 Try later")
    result = await send(short())
    assert result.outcome == "temporary"
    assert isinstance(result.error, SMTPReplyError)
    assert (result.error.code, result.error.mx_host) == (451, "mx2.support.test")


async def test_5xx_on_mx2_after_4xx_on_mx1_is_permanent(
    settings: Settings, mx_server: SMTPPeer, mx2_server: SMTPPeer
) -> None:
    mx_server.handler.greeting.append("421 4.3.2 Busy")
    mx2_server.handler.rcpt.append("550 5.1.1 No such user")
    result = await send(settings)
    assert result.outcome == "permanent"
    assert isinstance(result.error, SMTPReplyError)
    assert (result.error.code, result.error.mx_host) == (550, "mx2.support.test")
    assert [h.code for h in result.hosts] == [421, 550]


async def test_equal_preference_mx_hosts_share_the_load(
    settings: Settings, mx_server: SMTPPeer, world_dns: DNSZoneServer
) -> None:
    world_dns.add("support.test. 300 IN MX 10 mx2.support.test.")
    with Peer(ScriptedHandler(), host=MX2_IP, port=mx_server.port, hostname="mx2") as mx2:
        first = [(await send(settings, rng=random.Random(seed))).hosts[0].ip for seed in range(8)]
    assert set(first) == {MX_IP, MX2_IP}
    assert len(mx_server.messages) + len(mx2.messages) == 8


# --- connection faults ---------------------------------------------------------------------


async def test_dropped_after_the_final_dot_is_a_possible_duplicate(
    settings: Settings, mx_server: SMTPPeer
) -> None:
    mx_server.handler.data.append(DROP)
    result = await send(settings)
    assert result.outcome == "temporary"
    assert result.possible_duplicate
    assert isinstance(result.error, ConnectionFailure)
    assert result.error.after_data
    assert result.hosts[-1].stage == "dot"
    # The server did take the message: exactly the duplicate risk we report.
    assert len(mx_server.messages) == 1
    assert mx_server.handler.connections == 1, "never retried inside the attempt after the dot"


async def test_dropped_before_data_is_retried_at_once(
    settings: Settings, mx_server: SMTPPeer
) -> None:
    mx_server.handler.greeting.append(DROP)
    result = await send(settings)
    assert result.outcome == "delivered"
    assert not result.possible_duplicate
    assert [h.stage for h in result.hosts] == ["greeting", "dot"]
    assert mx_server.handler.connections == 2


async def test_dropped_every_time_is_temporary(settings: Settings, mx_server: SMTPPeer) -> None:
    mx_server.handler.rcpt.extend([DROP, DROP])
    result = await send(settings)
    assert result.outcome == "temporary"
    assert isinstance(result.error, ConnectionFailure)
    assert not result.error.after_data
    assert [h.stage for h in result.hosts] == ["rcpt", "rcpt"]


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def test_refused_connection_is_temporary(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer
) -> None:
    settings = make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address, RELAY_SMTP_PORT=str(_free_port(MX_IP))
    )
    result = await send(settings)
    assert result.outcome == "temporary"
    assert isinstance(result.error, ConnectionFailure)
    assert result.error.temporary
    assert (result.error.ip, result.error.after_data) == (MX_IP, False)
    [host] = result.hosts
    assert (host.stage, host.code) == ("connect", None)
    assert "refused" in host.text.lower()


@pytest.mark.parametrize(
    ("queue", "stage", "duplicate"),
    [("greeting", "greeting", False), ("rcpt", "rcpt", False), ("data", "dot", True)],
)
async def test_hang_is_a_temporary_timeout(
    short: Callable[..., Settings], mx_server: SMTPPeer, queue: str, stage: str, duplicate: bool
) -> None:
    getattr(mx_server.handler, queue).append(HANG)
    result = await send(short())
    assert result.outcome == "temporary"
    assert isinstance(result.error, ConnectionFailure)
    assert result.possible_duplicate is duplicate
    [host] = result.hosts
    assert host.stage == stage
    assert "timed out" in host.text


# --- STARTTLS ------------------------------------------------------------------------------


@pytest.fixture
def tls_server(
    mx_handler: ScriptedHandler, tls_context_pair: tuple[ssl.SSLContext, Path]
) -> Iterator[SMTPPeer]:
    server_ctx, _ = tls_context_pair
    with Peer(mx_handler, host=MX_IP, hostname="mx1.support.test", tls_context=server_ctx) as peer:
        yield peer


@pytest.mark.parametrize("policy", ["may", "encrypt", "verify"])
async def test_starttls(
    short: Callable[..., Settings],
    tls_server: SMTPPeer,
    tls_context_pair: tuple[ssl.SSLContext, Path],
    policy: str,
) -> None:
    _, ca_path = tls_context_pair
    settings = short(RELAY_SMTP_PORT=str(tls_server.port), RELAY_SMTP_TLS=policy)
    result = await send(settings, cafile=ca_path)
    assert result.outcome == "delivered"
    assert result.hosts[-1].tls is not None
    assert result.hosts[-1].tls.startswith("TLSv1.")
    [received] = tls_server.messages
    assert received.tls == result.hosts[-1].tls
    assert received.data == MESSAGE
    assert received.helo == settings.helo_hostname


async def test_verify_rejects_an_untrusted_certificate(
    short: Callable[..., Settings], tls_server: SMTPPeer
) -> None:
    settings = short(RELAY_SMTP_PORT=str(tls_server.port), RELAY_SMTP_TLS="verify")
    result = await send(settings)  # system CAs: our throwaway CA is not among them
    assert result.outcome == "temporary"
    assert isinstance(result.error, ConnectionFailure)
    assert result.hosts[0].stage == "starttls"
    assert tls_server.messages == []


@pytest.mark.parametrize("policy", ["encrypt", "verify"])
async def test_required_tls_not_offered_is_temporary(
    short: Callable[..., Settings], mx_server: SMTPPeer, policy: str
) -> None:
    result = await send(short(RELAY_SMTP_TLS=policy))
    assert result.outcome == "temporary"
    assert isinstance(result.error, ConnectionFailure)
    assert "not offered" in result.error.reason
    assert mx_server.messages == []


async def test_broken_starttls_under_may_falls_back_to_plain_text(
    short: Callable[..., Settings], mx_handler: ScriptedHandler, tls_server: SMTPPeer
) -> None:
    mx_handler.starttls_broken = True
    result = await send(short(RELAY_SMTP_PORT=str(tls_server.port), RELAY_SMTP_TLS="may"))
    assert result.outcome == "delivered"
    failed, plain = result.hosts
    assert (failed.stage, failed.tls) == ("starttls", None)
    assert "TLS" in failed.text
    assert (plain.stage, plain.tls, plain.ip) == ("dot", None, MX_IP)
    assert tls_server.messages[0].tls is None


async def test_broken_starttls_under_encrypt_is_temporary(
    short: Callable[..., Settings], mx_handler: ScriptedHandler, tls_server: SMTPPeer
) -> None:
    mx_handler.starttls_broken = True
    result = await send(short(RELAY_SMTP_PORT=str(tls_server.port), RELAY_SMTP_TLS="encrypt"))
    assert result.outcome == "temporary"
    assert isinstance(result.error, ConnectionFailure)
    assert [h.stage for h in result.hosts] == ["starttls"]
    assert tls_server.messages == []


# --- DNS inside an attempt -------------------------------------------------------------------


async def test_dns_failures_decide_the_attempt(
    short: Callable[..., Settings], world_dns: DNSZoneServer, mx_server: SMTPPeer
) -> None:
    settings = short(RELAY_SUPPORT_ADDRESS="help@missing.test")
    result = await deliver(
        MESSAGE,
        recipient="help@missing.test",
        envelope_from=SENDER,
        settings=settings,
        resolver=make_resolver(settings),
    )
    assert result.outcome == "permanent"
    assert isinstance(result.error, DNSPermanentError)
    assert result.hosts == ()
    assert result.summary.startswith("DNS missing.test:")

    world_dns.fail(["support.test"])
    result = await send(short())
    assert result.outcome == "temporary"
    assert isinstance(result.error, DNSTemporaryError)
    assert mx_server.handler.connections == 0


async def test_null_mx_recipient_is_permanent(short: Callable[..., Settings]) -> None:
    settings = short()
    result = await deliver(
        MESSAGE,
        recipient="help@nullmx.test",
        envelope_from=SENDER,
        settings=settings,
        resolver=make_resolver(settings),
    )
    assert result.outcome == "permanent"
    assert isinstance(result.error, DNSPermanentError)


# --- smarthost -----------------------------------------------------------------------------

USER, PASSWORD = "relay", "s3cret"


@pytest.fixture
def submission(
    tls_context_pair: tuple[ssl.SSLContext, Path],
) -> Iterator[SubmissionPeer]:
    server_ctx, _ = tls_context_pair
    with SubmissionPeer(
        ScriptedHandler(),
        users={USER: PASSWORD},
        host=MX_IP,
        hostname="mx1.support.test",
        tls_context=server_ctx,
    ) as peer:
        yield peer


async def test_smarthost_with_auth_skips_the_mx_lookup(
    short: Callable[..., Settings], submission: SubmissionPeer, world_dns: DNSZoneServer
) -> None:
    settings = short(
        RELAY_SMARTHOST=f"{MX_IP}:{submission.port}",
        RELAY_SMARTHOST_USERNAME=USER,
        RELAY_SMARTHOST_PASSWORD=PASSWORD,
    )
    result = await send(settings)
    assert result.outcome == "delivered", result.summary
    [host] = result.hosts
    assert (host.mx_host, host.ip, host.port) == (MX_IP, MX_IP, submission.port)
    assert host.tls is not None
    assert submission.messages[0].data == MESSAGE
    assert world_dns.queried("support.test", "MX") == 0


async def test_smarthost_by_name_is_resolved_and_verified(
    short: Callable[..., Settings],
    submission: SubmissionPeer,
    world_dns: DNSZoneServer,
    tls_context_pair: tuple[ssl.SSLContext, Path],
) -> None:
    settings = short(
        RELAY_SMARTHOST=f"mx1.support.test:{submission.port}",
        RELAY_SMARTHOST_USERNAME=USER,
        RELAY_SMARTHOST_PASSWORD=PASSWORD,
        RELAY_SMTP_TLS="verify",
    )
    result = await send(settings, cafile=tls_context_pair[1])
    assert result.outcome == "delivered", result.summary
    assert (result.hosts[0].mx_host, result.hosts[0].ip) == ("mx1.support.test", MX_IP)
    assert world_dns.queried("mx1.support.test", "A") == 1
    assert world_dns.queried("support.test", "MX") == 0


async def test_smarthost_wrong_password_is_temporary(
    short: Callable[..., Settings], submission: SubmissionPeer
) -> None:
    settings = short(
        RELAY_SMARTHOST=f"{MX_IP}:{submission.port}",
        RELAY_SMARTHOST_USERNAME=USER,
        RELAY_SMARTHOST_PASSWORD="wrong",
    )
    result = await send(settings)
    assert result.outcome == "temporary"
    assert isinstance(result.error, ConnectionFailure)
    [host] = result.hosts
    assert (host.stage, host.code) == ("auth", 535)
    assert submission.messages == []


async def test_smarthost_requires_starttls(
    short: Callable[..., Settings], mx_server: SMTPPeer
) -> None:
    result = await send(short(RELAY_SMARTHOST=f"{MX_IP}:{mx_server.port}"))
    assert result.outcome == "temporary"
    assert isinstance(result.error, ConnectionFailure)
    assert mx_server.messages == []
