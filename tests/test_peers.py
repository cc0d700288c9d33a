"""The test peers themselves behave like the real thing they stand in for."""

from __future__ import annotations

import smtplib

import dns.resolver
import httpx
import pytest

from relay.sandbox.captcha import TEST_SECRET, SiteverifyStub
from relay.sandbox.dns import DNSZoneServer
from tests.peers.smtp import DROP, SMTPPeer


def _resolver(server: DNSZoneServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = 1
    return resolver


def test_dns_distinguishes_nxdomain_nodata_and_servfail(world_dns: DNSZoneServer) -> None:
    resolver = _resolver(world_dns)
    assert [r.exchange.to_text() for r in resolver.resolve("support.test", "MX")] == [
        "mx1.support.test."
    ]
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("mx1.support.test", "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("missing.support.test", "A")
    world_dns.fail(["support.test"])
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("support.test", "MX")
    assert world_dns.queried("support.test", "MX") == 2


def test_smtp_peer_accepts_and_scripts_faults(mx_server: SMTPPeer) -> None:
    mx_server.handler.rcpt.append("451 4.7.1 Try again later")
    with smtplib.SMTP(mx_server.host, mx_server.port, timeout=5) as client:
        client.ehlo("mail.relay.test")
        code, _ = client.mail("a@relay.test")
        assert code == 250
        code, text = client.rcpt("help@support.test")
        assert (code, text) == (451, b"4.7.1 Try again later")
        client.rset()
        assert (
            client.sendmail("a@relay.test", ["help@support.test"], b"Subject: x\r\n\r\nbody\r\n")
            == {}
        )
    assert mx_server.messages[0].helo == "mail.relay.test"
    assert mx_server.messages[0].data.startswith(b"Subject: x")


def test_smtp_peer_greeting_fault(mx_server: SMTPPeer) -> None:
    mx_server.handler.greeting.append("421 4.3.2 Service not available")
    with pytest.raises(smtplib.SMTPConnectError) as info:
        smtplib.SMTP(mx_server.host, mx_server.port, timeout=5)
    assert info.value.smtp_code == 421
    mx_server.handler.data.append(DROP)
    with (
        smtplib.SMTP(mx_server.host, mx_server.port, timeout=5) as client,
        pytest.raises(smtplib.SMTPServerDisconnected),
    ):
        client.sendmail("a@relay.test", ["help@support.test"], b"Subject: x\r\n\r\nbody\r\n")


@pytest.mark.parametrize(
    ("token", "success", "codes"),
    [
        ("pass-1", True, None),
        ("fail-1", False, ["invalid-input-response"]),
        ("truthy-1", "true", None),
    ],
)
def test_siteverify_stub(
    siteverify: SiteverifyStub, token: str, success: object, codes: object
) -> None:
    form = {"secret": TEST_SECRET, "response": token, "sitekey": "k"}
    body = httpx.post(siteverify.url, data=form).json()
    assert body["success"] == success
    assert body.get("error-codes") == codes
    again = httpx.post(siteverify.url, data=form).json()
    assert again == {"success": False, "error-codes": ["already-seen-response"]}
