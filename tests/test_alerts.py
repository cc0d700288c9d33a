"""Alerts end to end: a real worker fails a message at a loopback MX, the dispatcher groups
the event and sends it to a real HTTP receiver on loopback (one that answers 500, then
recovers) and mails it through the outbox, which the worker delivers to a loopback SMTP
server; the queue-age and DKIM rules; `relay alerts test`. Over SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.alerts import DKIM_MISMATCH, NO_WORKER, Dispatcher, DkimRule, QueueAgeRule
from relay.config import load_settings
from relay.mail.mx import make_resolver
from relay.ops.cli import main
from relay.ops.doctor import dkim_checks
from relay.sandbox.dns import DNSZoneServer
from relay.settings import Settings
from relay.store.alerts import MESSAGE_FAILED, QUEUE_AGE
from relay.store.outbox import Outbox
from relay.worker.delivery import Worker
from tests.peers.smtp import SMTPPeer
from tests.store.test_outbox import POLICY, FakeClock, built, refused

OPS = "ops@support.test"


class Receiver:
    """A webhook endpoint on loopback: answers the scripted statuses in turn, then 200."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.posts: list[dict[str, Any]] = []
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.posts.append(
                    {
                        "status": status,
                        "json": json.loads(body),
                        "type": self.headers["Content-Type"],
                    }
                )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                receiver.got.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/formrelay"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


@pytest.fixture
def alert_settings(
    make_settings: Callable[..., Settings],
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    receiver: Receiver,
) -> Settings:
    return make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
        RELAY_ALERT_WEBHOOK_URL=receiver.url,
        RELAY_ALERT_EMAIL=OPS,
        RELAY_ALERT_GROUP_WINDOW="0",
        RELAY_ALERT_QUEUE_AGE="600",
        RELAY_PUBLIC_URL="https://forms.relay.test",
        RELAY_ADMIN_TRUSTED_HEADER="X-Forwarded-User",
        RELAY_TRUSTED_PROXIES="1",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[Outbox]:
    outbox = Outbox(database_url, clock=clock)
    yield outbox
    outbox.dispose()


async def test_a_permanent_failure_reaches_the_webhook_and_the_mailbox(
    store: Outbox,
    clock: FakeClock,
    alert_settings: Settings,
    mx_server: SMTPPeer,
    receiver: Receiver,
) -> None:
    mx_server.handler.rcpt.append("550 5.1.1 No such user here")
    failed = store.enqueue(built(alert_settings, 1))
    dispatcher = Dispatcher(store, alert_settings)
    worker = Worker(store, alert_settings, poll_interval=0.05, alerts=dispatcher)
    await worker.run(once=True)  # the 550, then one round of alerts
    assert store.get(failed).status == "failed"
    (first,) = receiver.posts
    # The webhook: Slack/Mattermost's text, and the event's fields.
    payload = first["json"]
    assert first["type"] == "application/json"
    assert payload["kind"] == MESSAGE_FAILED
    assert payload["count"] == 1
    assert payload["subjects"] == [failed]
    assert payload["text"].startswith("formrelay (relay.test): a message failed permanently\n")
    assert "550 5.1.1 No such user here" in payload["text"]
    assert payload["console"] == f"https://forms.relay.test/admin/messages/{failed}"
    # The mail: queued in the same outbox as an alert; the worker delivers it.
    notices = [row for row in store.list_messages() if row.purpose == "alert"]
    assert [n.recipient for n in notices] == [OPS]
    await worker.run(once=True)
    (received,) = mx_server.messages
    assert received.rcpt_tos == [OPS]
    message = received.message
    assert message["Subject"] == "[formrelay] a message failed permanently"
    assert message["From"] == "Example Shop <form@relay.test>"
    assert received.data.startswith(b"DKIM-Signature:")
    assert failed in message.get_payload(decode=True).decode()
    (alert,) = store.alerts.recent()
    assert {d.channel: d.status for d in alert.deliveries} == {"webhook": "sent", "email": "sent"}


async def test_the_webhook_is_retried_until_it_recovers(
    store: Outbox, clock: FakeClock, alert_settings: Settings, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    settings = alert_settings.model_copy(update={"alert_email": None})
    outbox_id = store.enqueue(built(settings, 1))
    (claimed,) = store.claim("w1", 1, 60)
    store.record_attempt(claimed, refused(), owner="w1", policy=POLICY)
    dispatcher = Dispatcher(store, settings)
    await dispatcher.tick()
    assert [p["status"] for p in receiver.posts] == [500]
    await dispatcher.tick()
    assert len(receiver.posts) == 1  # not due again yet
    (alert,) = store.alerts.recent()
    (delivery,) = alert.deliveries
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert delivery.last_error is not None
    assert delivery.last_error.startswith("HTTP 500")
    clock.advance(40)  # the first retry comes 30-36 s later
    await dispatcher.tick()
    clock.advance(80)
    await dispatcher.tick()
    assert [p["status"] for p in receiver.posts] == [500, 503, 200]
    assert all(p["json"]["alert_id"] == alert.id for p in receiver.posts)
    assert store.alerts.recent()[0].deliveries[0].status == "sent"
    assert outbox_id in receiver.posts[-1]["json"]["subjects"]


async def test_fifty_failures_in_a_burst_are_one_alert(
    store: Outbox, clock: FakeClock, alert_settings: Settings, receiver: Receiver
) -> None:
    settings = alert_settings.model_copy(update={"alert_email": None, "alert_group_window": 30})
    for n in range(50):
        store.enqueue(built(settings, n))
    dispatcher = Dispatcher(store, settings)
    for claimed in store.claim("w1", 50, 60):
        store.record_attempt(claimed, refused(), owner="w1", policy=POLICY)
        clock.advance(0.5)
        await dispatcher.tick()
    assert receiver.posts == []  # the window is open
    clock.advance(10)
    await dispatcher.tick()
    (post,) = receiver.posts
    assert post["json"]["count"] == 50
    assert post["json"]["text"].startswith("formrelay (relay.test): 50 messages failed")
    assert post["json"]["console"] == "https://forms.relay.test/admin/?status=failed"


async def test_a_message_waiting_too_long_alerts_once(
    store: Outbox, clock: FakeClock, alert_settings: Settings, receiver: Receiver
) -> None:
    settings = alert_settings.model_copy(update={"alert_email": None})
    waiting = store.enqueue(built(settings, 1))
    dispatcher = Dispatcher(store, settings, rules=[QueueAgeRule(timedelta(minutes=10))])
    await dispatcher.tick(all_rules=True)
    assert receiver.posts == []
    clock.advance(601)
    await dispatcher.tick(all_rules=True)
    await dispatcher.tick(all_rules=True)
    (post,) = receiver.posts
    assert (post["json"]["kind"], post["json"]["subjects"]) == (QUEUE_AGE, [waiting])
    assert "has waited 10m (limit 10m; queued, 0 tries)" in post["json"]["text"]


async def test_the_dkim_key_in_dns_that_is_not_ours_alerts(
    store: Outbox,
    alert_settings: Settings,
    make_settings: Callable[..., Settings],
    world_dns: DNSZoneServer,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """The doctor's own DKIM check (the CLI injects it): DNS publishes another key now."""
    other = tmp_path / "rotated.pem"
    other.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    other.chmod(0o600)
    settings = alert_settings.model_copy(update={"alert_email": None})
    ours = make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address, RELAY_DKIM_PRIVATE_KEY_FILE=str(other)
    )
    rule = DkimRule(lambda: dkim_checks(ours, resolver=make_resolver(ours)))
    dispatcher = Dispatcher(store, settings, rules=[rule])
    await dispatcher.tick(all_rules=True)
    await dispatcher.tick(all_rules=True)  # the same finding is not alerted again today
    (post,) = receiver.posts
    assert post["json"]["kind"] == DKIM_MISMATCH
    assert post["json"]["text"].startswith(
        "formrelay (relay.test): the DKIM key in DNS is not ours\nDKIM selector s1: "
    )
    assert "is not the public half of" in post["json"]["text"]
    # With the published key, nothing to say.
    matching = make_settings(RELAY_DNS_NAMESERVERS=world_dns.address)
    fine = DkimRule(lambda: dkim_checks(matching, resolver=make_resolver(matching)))
    assert await fine(store) == []


async def test_the_worker_sends_alerts_while_it_runs(
    store: Outbox, alert_settings: Settings, mx_server: SMTPPeer, receiver: Receiver
) -> None:
    settings = alert_settings.model_copy(update={"alert_email": None})
    mx_server.handler.rcpt.append("550 5.7.1 Rejected by policy")
    dispatcher = Dispatcher(store, settings, every=0.1)
    worker = Worker(store, settings, poll_interval=0.05, alerts=dispatcher)
    task = asyncio.create_task(worker.run())
    store.enqueue(built(settings, 1))
    try:
        await asyncio.wait_for(asyncio.to_thread(receiver.got.wait, 10), timeout=15)
    finally:
        worker.stop()
        await task
    assert "5.7.1 Rejected by policy" in receiver.posts[0]["json"]["text"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_relay_alerts_test_sends_on_every_channel(
    alert_settings: Settings,
    base_env: dict[str, str],
    database_url: str,
    receiver: Receiver,
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {
        **base_env,
        "RELAY_DATABASE_URL": database_url,
        "RELAY_ALERT_WEBHOOK_URL": receiver.url,
        "RELAY_ALERT_EMAIL": OPS,
        "RELAY_DNS_NAMESERVERS": world_dns.address,
        "RELAY_SMTP_PORT": str(mx_server.port),
    }
    result = CliRunner().invoke(main, ["alerts", "test"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "webhook: sent (HTTP 200)"
    # No worker runs here, so the command delivered its alert mail itself.
    assert lines[1].startswith("email: sent (queued ")
    assert lines[1].endswith("delivered here (no worker running))")
    assert receiver.posts[0]["json"]["kind"] == "test"
    (mail,) = mx_server.messages
    assert mail.rcpt_tos == [OPS]
    receiver.statuses = [500]
    failing = CliRunner().invoke(main, ["alerts", "test"], env=env)
    assert failing.exit_code == 1
    assert failing.stdout.startswith("webhook: NOT sent (HTTP 500")
    none = CliRunner().invoke(
        main,
        ["alerts", "test"],
        env={**env, "RELAY_ALERT_WEBHOOK_URL": "", "RELAY_ALERT_EMAIL": ""},
    )
    assert none.exit_code == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_unit_failed_alerts_even_without_the_store(
    base_env: dict[str, str],
    database_url: str,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """systemd's OnFailure= hook: stored and sent; with the store down, sent directly."""
    monkeypatch.chdir(tmp_path)
    env = {**base_env, "RELAY_DATABASE_URL": database_url, "RELAY_ALERT_WEBHOOK_URL": receiver.url}
    stored = CliRunner().invoke(
        main, ["alerts", "unit-failed", "formrelay-worker.service"], env=env
    )
    assert stored.exit_code == 0, stored.output
    assert stored.stdout == "webhook: sent (HTTP 200)\n"
    down = {**env, "RELAY_DATABASE_URL": "postgresql+psycopg://x@127.0.0.1:1/x?connect_timeout=1"}
    direct = CliRunner().invoke(main, ["alerts", "unit-failed", "formrelay-web.service"], env=down)
    assert direct.exit_code == 0, direct.output
    assert direct.stdout == "webhook: sent (HTTP 200) without the store\n"
    texts = [p["json"]["text"] for p in receiver.posts]
    assert texts[0].startswith("formrelay (relay.test): a formrelay service failed\n")
    assert (
        "formrelay-worker.service failed; see `journalctl -u formrelay-worker.service`" in texts[0]
    )
    assert "formrelay-web.service failed" in texts[1]
    assert "the store is unavailable" in texts[1]


def test_no_worker_while_mail_is_due_reaches_the_webhook_and_the_mailbox(
    base_env: dict[str, str],
    database_url: str,
    receiver: Receiver,
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker is stopped and mail is due: `relay alerts check` (the 20 s timer) raises
    "no worker is delivering mail" at once, on the webhook and by mail, which it delivers
    itself (no worker would); the visitor's message is left for the worker. Once an hour."""
    monkeypatch.chdir(tmp_path)
    env = {
        **base_env,
        "RELAY_DATABASE_URL": database_url,
        "RELAY_ALERT_WEBHOOK_URL": receiver.url,
        "RELAY_ALERT_EMAIL": OPS,
        "RELAY_DNS_NAMESERVERS": world_dns.address,
        "RELAY_SMTP_PORT": str(mx_server.port),
        "RELAY_WORKER_DEAD_AFTER": "3",
    }
    store = Outbox(database_url)
    try:
        waiting = store.enqueue(built(load_settings(env, env_file=None), 1))
        quiet = CliRunner().invoke(main, ["alerts", "check"], env=env)
        assert quiet.exit_code == 0, quiet.output
        assert receiver.posts == [], "due for less than RELAY_WORKER_DEAD_AFTER: no alert yet"
        time.sleep(3.2)
        result = CliRunner().invoke(main, ["alerts", "check"], env=env)
        assert result.exit_code == 0, result.output
        (post,) = receiver.posts
        assert post["json"]["kind"] == NO_WORKER
        assert post["json"]["text"].startswith(
            "formrelay (relay.test): no worker is delivering mail\n"
        )
        assert "1 message(s) due and no worker has sent a heartbeat" in post["json"]["text"]
        (mail,) = mx_server.messages
        assert mail.rcpt_tos == [OPS]
        assert mail.message["Subject"] == "[formrelay] no worker is delivering mail"
        assert store.get(waiting).status == "queued", "the visitor's mail waits for a worker"
        again = CliRunner().invoke(main, ["alerts", "check"], env=env)
        assert again.exit_code == 0, again.output
        assert len(receiver.posts) == 1
        assert len(mx_server.messages) == 1
    finally:
        store.dispose()
