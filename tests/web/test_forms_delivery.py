"""Two forms to two support addresses, end to end: submitted through the app, delivered by
the real worker to the loopback MX, which checks which address got which message; each
signed with DKIM (verified by dkimpy against the world DNS) and parsed back with the email
package, the files byte for byte."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from pathlib import Path

import dkim
from flask import Flask

from relay.mail.mx import make_resolver
from relay.sandbox.dns import DNSZoneServer
from relay.store.outbox import Outbox
from relay.worker.delivery import Worker
from tests.formfiles import SITE_A, SITE_B, three_forms
from tests.mail.test_signing import world_txt
from tests.peers.smtp import SMTPPeer
from tests.web.conftest import token
from tests.web.test_forms import PDF, PNG, bug, multipart


async def test_two_forms_reach_two_addresses_signed_and_intact(
    make_app: Callable[..., Flask],
    tmp_path: Path,
    outbox: Outbox,
    mx_server: SMTPPeer,
    world_dns: DNSZoneServer,
) -> None:
    app = make_app(RELAY_FORMS_FILE=str(three_forms(tmp_path)), RELAY_SMTP_PORT=str(mx_server.port))
    client = app.test_client()
    sales = client.post(
        "/f/sales",
        json={
            "email": "hanako@visitor.test",
            "subject": "Quote for 40 seats",
            "plan": "Business",
            "h-captcha-response": token(),
        },
        headers={"Origin": SITE_A},
    )
    assert sales.status_code == 202
    files = [(PNG, "screen.png"), (PDF, "請求書 12月.pdf")]
    body, content_type = multipart({**bug(), "files": files})
    bugs = client.post(
        "/f/bugs",
        data=body,
        content_type=content_type,
        headers={"Origin": SITE_B, "Accept": "application/json"},
    )
    assert bugs.status_code == 202, bugs.get_json()
    default = client.post(
        "/form",
        json={
            "name": "Jiro",
            "email": "jiro@visitor.test",
            "subject": "Where is my order?",
            "message": "Order 99.",
            "h-captcha-response": token(),
        },
    )
    assert default.status_code == 202

    settings = app.extensions["formrelay"].settings
    worker = Worker(outbox, settings, resolver=make_resolver(settings), poll_interval=0.05)
    await worker.run(once=True)

    by_rcpt = {tuple(m.rcpt_tos): m for m in mx_server.handler.messages}
    assert sorted(by_rcpt) == [
        ("bugs@support.test",),
        ("help@support.test",),
        ("sales@support.test",),
    ]
    dnsfunc = world_txt(world_dns)
    for received in by_rcpt.values():
        assert dkim.verify(received.data, dnsfunc=dnsfunc), received.rcpt_tos
        assert received.mail_from == settings.envelope_sender
    parsed = {
        rcpt[0]: email.message_from_bytes(m.data, policy=email.policy.default)
        for rcpt, m in by_rcpt.items()
    }
    for rcpt, msg in parsed.items():
        assert str(msg["To"]) == rcpt  # the envelope and the header agree
    assert str(parsed["sales@support.test"]["Subject"]) == "[Sales] Quote for 40 seats"
    assert "Plan: Business" in parsed["sales@support.test"].get_content()
    assert str(parsed["sales@support.test"]["Reply-To"]) == "hanako@visitor.test"
    report = parsed["bugs@support.test"]
    assert str(report["Subject"]) == "[Bug] Crash on checkout (high)"
    assert str(report["Reply-To"]) == "taro@visitor.test"
    _text, png, pdf = report.iter_parts()  # type: ignore[attr-defined]
    assert (png.get_filename(), png.get_content()) == ("screen.png", PNG)
    assert (pdf.get_filename(), pdf.get_content()) == ("請求書 12月.pdf", PDF)
    assert str(parsed["help@support.test"]["Subject"]) == "Where is my order?"
    assert {row.form_id: row.status for row in outbox.list_messages()} == {
        "sales": "delivered",
        "bugs": "delivered",
        "default": "delivered",
    }
