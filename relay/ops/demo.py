"""`relay demo`: the whole pipeline in a sandbox on 127.0.0.1, with no configuration.

It starts, each on a free port bound to loopback only:

- a DNS server for the demo zone: our sending domain with SPF, DKIM (a throwaway key made
  for this run), DMARC and a PTR for 127.0.0.1; the support domain with its MX; the relay's
  resolver points at it;
- the support mailbox (relay.sandbox.mailbox) as that MX: it greylists each new sender once,
  verifies DKIM and SPF and stores what it accepts in a Maildir;
- the web form (relay.create_app, SQLite outbox in the demo folder) on werkzeug's server;
- the delivery worker (relay.worker) with a retry delay of a few seconds.

The CAPTCHA is hCaptcha's published test site key in the browser and `OfflineDemoVerifier`
on the server, which accepts two fixed tokens without asking hCaptcha. It exists for the demo
alone and refuses to be built for any environment but "demo".
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.nameserver
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from werkzeug.serving import BaseWSGIServer, make_server

from relay import logs
from relay.alerts import Dispatcher, default_rules
from relay.config import load_settings
from relay.errors import CaptchaError, ConfigError
from relay.logs import event
from relay.mail.mx import make_resolver
from relay.mail.signing import dkim_txt_record
from relay.ops.demo_forms import FORM_ID, SUPPORT_LOCAL, report_page, write_forms
from relay.ops.doctor import auth_verdicts, run_checks
from relay.sandbox.dns import DNSZoneServer, ptr_name, txt_record
from relay.sandbox.mailbox import Delivered, SupportMailbox
from relay.settings import HCAPTCHA_TEST_SECRET, HCAPTCHA_TEST_SITEKEY, Settings
from relay.store.outbox import Outbox
from relay.store.views import detail_text, log_table
from relay.web.app import create_app
from relay.web.captcha import MISSING
from relay.worker.delivery import Worker

log = logging.getLogger("relay.demo")

# The demo world. RFC 2606 names: nothing here can reach or impersonate a real domain.
FROM_DOMAIN = "shop.demo.test"
SUPPORT_DOMAIN = "support.demo.test"
VISITOR_DOMAIN = "customer.demo.test"
SENDING_IP = "127.0.0.1"
SELECTOR = "demo"
RETRY_SECONDS = 3
CONSOLE_USER = "demo"

# What the demo form's "demo CAPTCHA" checkbox submits, and the response token hCaptcha's
# published test site key hands out when its widget does load (docs.hcaptcha.com).
DEMO_CAPTCHA_TOKEN = "demo-offline-captcha-token"  # noqa: S105 - a public demo value
HCAPTCHA_TEST_RESPONSE = "10000000-aaaa-bbbb-cccc-000000000001"

ENV_REFUSAL = (
    "relay demo: RELAY_ENV is {env!r} in this environment. The demo runs an offline CAPTCHA "
    "verifier and is refused outside RELAY_ENV=demo (or unset); run it from a shell without "
    "the production configuration."
)


class OfflineDemoVerifier:
    """DEMO ONLY. Accepts the demo checkbox's token and hCaptcha's test-key token, offline.

    Refused for any settings whose env is not "demo", at construction and at every call, so a
    production app can never be built with it.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.env != "demo":
            raise ConfigError(
                [
                    f"RELAY_ENV: the offline demo CAPTCHA verifier is refused with env="
                    f"{settings.env!r}; only `relay demo` (env=demo) may use it"
                ]
            )
        self._settings = settings

    def verify(self, token: str, *, remoteip: str | None, hostnames: Collection[str]) -> None:
        if self._settings.env != "demo":
            raise CaptchaError(["demo-verifier-outside-demo"])
        if not token:
            raise CaptchaError([MISSING])
        if not any(
            hmac.compare_digest(token.encode(), known.encode())
            for known in (DEMO_CAPTCHA_TOKEN, HCAPTCHA_TEST_RESPONSE)
        ):
            raise CaptchaError(["invalid-input-response"])
        event(log, "demo.captcha_accepted", offline=True, ip=remoteip)


def refuse_outside_demo(environ: Mapping[str, str]) -> str | None:
    """The refusal message when the calling environment says anything but demo."""
    env = environ.get("RELAY_ENV", "")
    if env not in ("", "demo"):
        return ENV_REFUSAL.format(env=env)
    return None


# --- the world -------------------------------------------------------------------------------


def make_key(path: Path) -> bytes:
    """A fresh RSA-2048 DKIM key for this run, written with mode 600."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return pem


def demo_zone(dkim_record: str, mx_ip: str) -> str:
    """Everything a careful receiver looks up, published correctly."""
    return "\n".join(
        [
            f"{FROM_DOMAIN}. 300 IN MX 10 mail.{FROM_DOMAIN}.",
            f"mail.{FROM_DOMAIN}. 300 IN A {SENDING_IP}",
            txt_record(f"{FROM_DOMAIN}.", f"v=spf1 ip4:{SENDING_IP} -all"),
            txt_record(f"{SELECTOR}._domainkey.{FROM_DOMAIN}.", dkim_record),
            txt_record(f"_dmarc.{FROM_DOMAIN}.", "v=DMARC1; p=reject; adkim=s; aspf=r"),
            f"{ptr_name(SENDING_IP)} 300 IN PTR mail.{FROM_DOMAIN}.",
            f"{SUPPORT_DOMAIN}. 300 IN MX 10 mx.{SUPPORT_DOMAIN}.",
            f"mx.{SUPPORT_DOMAIN}. 300 IN A {mx_ip}",
            # The visitors' domain: the form checks it accepts mail before using Reply-To.
            f"{VISITOR_DOMAIN}. 300 IN MX 10 mx.{VISITOR_DOMAIN}.",
            f"mx.{VISITOR_DOMAIN}. 300 IN A 127.0.0.1",
        ]
    )


def demo_settings(
    folder: Path,
    *,
    dns_address: str,
    smtp_port: int,
    base_url: str,
    shop_url: str | None = None,
    console_password: str | None = None,
) -> Settings:
    """The demo's Settings, validated like any other; nothing is read from the environment.
    With `console_password`, the console signs in user `demo` with it."""
    values = {
        "RELAY_ENV": "demo",
        "RELAY_SUPPORT_ADDRESS": f"help@{SUPPORT_DOMAIN}",
        "RELAY_FROM_ADDRESS": f"form@{FROM_DOMAIN}",
        "RELAY_FROM_NAME": "Demo Shop",
        "RELAY_HELO_HOSTNAME": f"mail.{FROM_DOMAIN}",
        "RELAY_PUBLIC_URL": base_url,
        "RELAY_DKIM_SELECTOR": SELECTOR,
        "RELAY_DKIM_PRIVATE_KEY_FILE": str(folder / "dkim-rsa.pem"),
        "RELAY_DNS_NAMESERVERS": dns_address,
        "RELAY_DNS_TIMEOUT": "2",
        "RELAY_SMTP_PORT": str(smtp_port),
        "RELAY_SMTP_CONNECT_TIMEOUT": "5",
        "RELAY_SMTP_TIMEOUT": "10",
        "RELAY_SMTP_DATA_TIMEOUT": "10",
        "RELAY_RETRY_INITIAL": str(RETRY_SECONDS),
        "RELAY_RETRY_MAX": "30",
        "RELAY_RETRY_GIVE_UP": "600",
        "RELAY_WORKER_LEASE": "30",
        "RELAY_INSTANCE_PATH": str(folder),
        "RELAY_SECRET_KEY": secrets.token_urlsafe(48),
        "RELAY_HCAPTCHA_SITEKEY": HCAPTCHA_TEST_SITEKEY,
        "RELAY_HCAPTCHA_SECRET": HCAPTCHA_TEST_SECRET,
        "RELAY_ALLOWED_ORIGINS": ",".join(u for u in (base_url, shop_url) if u),
        "RELAY_ALERT_GROUP_WINDOW": "5",
        "RELAY_FORMS_FILE": str(
            write_forms(
                folder,
                support=f"{SUPPORT_LOCAL}@{SUPPORT_DOMAIN}",
                base=base_url,
                shop=shop_url or base_url,
            )
        ),
    }
    if console_password:
        from argon2 import PasswordHasher  # noqa: PLC0415

        values["RELAY_ADMIN_USERS"] = f"{CONSOLE_USER}:{PasswordHasher().hash(console_password)}"
    return load_settings(values, env_file=None)


def env_file_text(settings: Settings) -> str:
    """The variables `relay log` and `relay show` need to open the demo's outbox."""
    assert settings.dkim_private_key_file is not None
    values = {
        "RELAY_ENV": "demo",
        "RELAY_SUPPORT_ADDRESS": settings.support_address,
        "RELAY_FROM_ADDRESS": settings.from_address,
        "RELAY_HELO_HOSTNAME": settings.helo_hostname,
        "RELAY_DKIM_SELECTOR": settings.dkim_selector,
        "RELAY_DKIM_PRIVATE_KEY_FILE": str(settings.dkim_private_key_file.resolve()),
        "RELAY_INSTANCE_PATH": str(settings.instance_path.resolve()),
    }
    return "".join(f"{key}={value}\n" for key, value in values.items())


def sync_resolver(address: str) -> dns.resolver.Resolver:
    """A blocking resolver for the mailbox's DKIM and SPF checks, aimed at the demo DNS."""
    host, _, port = address.rpartition(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, int(port))]
    resolver.cache = None
    resolver.lifetime = 3
    return resolver


# --- running it ------------------------------------------------------------------------------


@dataclass
class Sandbox:
    settings: Settings
    dns: DNSZoneServer
    mailbox: SupportMailbox
    web: BaseWSGIServer
    base_url: str
    shop_url: str
    outbox: Outbox
    worker: Worker
    env_file: Path
    console_password: str = ""

    @property
    def form_url(self) -> str:
        return f"{self.base_url}/form"

    @property
    def report_url(self) -> str:
        return f"{self.base_url}/f/{FORM_ID}"

    @property
    def console_url(self) -> str:
        """On localhost: browsers keep the console's Secure cookie there without TLS."""
        return self.base_url.replace("127.0.0.1", "localhost") + "/admin/"


def _mx_host() -> str:
    """127.0.0.2 shows the MX as a host of its own; some systems only have 127.0.0.1."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            return "127.0.0.1"
    return "127.0.0.2"


@contextmanager
def sandbox(
    folder: Path,
    *,
    on_greylisted: Callable[[str, str, str], None] | None = None,
    on_delivered: Callable[[Delivered], None] | None = None,
) -> Iterator[Sandbox]:
    """Start DNS, mailbox, web and worker; stop them all, in reverse order, on exit."""
    if folder.exists():  # a throwaway world: last run's outbox and key go
        for name in ("relay.sqlite3", "relay.sqlite3-wal", "relay.sqlite3-shm", "dkim-rsa.pem"):
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    pem = make_key(folder / "dkim-rsa.pem")
    mx_ip = _mx_host()

    with ExitStack() as stack:
        zone = DNSZoneServer(demo_zone(dkim_txt_record(pem), mx_ip))
        stack.enter_context(zone)
        mailbox = SupportMailbox(
            folder / "Maildir",
            domain=SUPPORT_DOMAIN,
            resolver=sync_resolver(zone.address),
            host=mx_ip,
            hostname=f"mx.{SUPPORT_DOMAIN}",
            greylist_seconds=1.0,
            on_greylisted=on_greylisted,
            on_delivered=on_delivered,
        )
        stack.enter_context(mailbox)

        # Bind first so the settings can name the real URL; the app is attached below.
        def not_ready(_environ: Any, start_response: Any) -> list[bytes]:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"starting\n"]

        web = make_server("127.0.0.1", 0, not_ready, threaded=True)
        stack.callback(web.server_close)
        base_url = f"http://127.0.0.1:{web.server_port}"
        # The customer's own site, on another origin, embedding the form with embed.js.
        shop = make_server("127.0.0.1", 0, shop_page(base_url), threaded=True)
        stack.callback(shop.server_close)
        shop_url = f"http://127.0.0.1:{shop.server_port}"
        console_password = secrets.token_urlsafe(12)
        settings = demo_settings(
            folder,
            dns_address=zone.address,
            smtp_port=mailbox.port,
            base_url=base_url,
            shop_url=shop_url,
            console_password=console_password,
        )
        outbox = Outbox.from_settings(settings)
        outbox.upgrade()
        stack.callback(outbox.dispose)

        app = create_app(
            settings, outbox=outbox, verifier=OfflineDemoVerifier(settings), checks=auth_verdicts
        )

        @app.context_processor
        def demo_captcha() -> dict[str, Any]:
            return {"demo_captcha_token": DEMO_CAPTCHA_TOKEN}

        web.app = app
        for name, server in (("web", web), ("shop", shop)):
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True, name=name
            )
            thread.start()
            stack.callback(thread.join, 5)
            stack.callback(server.shutdown)

        worker = Worker(
            outbox,
            settings,
            resolver=make_resolver(settings),
            poll_interval=0.2,
            shutdown_grace=5.0,
            alerts=Dispatcher(outbox, settings, rules=default_rules(settings)),
        )
        runner = WorkerThread(worker)
        runner.start()
        stack.callback(runner.stop)

        env_file = folder / "env"
        env_file.write_text(env_file_text(settings))
        yield Sandbox(
            settings,
            zone,
            mailbox,
            web,
            base_url,
            shop_url,
            outbox,
            worker,
            env_file,
            console_password,
        )


def shop_page(base_url: str) -> Callable[[Any, Any], list[bytes]]:
    """A stand-in for the operator's own website: one page embedding the form."""
    html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Demo Shop: contact us</title></head>
<body style="font-family: sans-serif; max-width: 44rem; margin: 2rem auto">
<h1>Demo Shop</h1>
<p>This page stands for your own website, on another origin. The form below is the relay's,
embedded with one script tag:</p>
<pre>&lt;script src="{base_url}/embed.js" async&gt;&lt;/script&gt;</pre>
<script src="{base_url}/embed.js" async></script>
<p><a href="/report">Report a problem (a second form, with a file field)</a></p>
</body></html>
""".encode()
    pages = {"/": html, "/report": report_page(base_url)}

    def app(environ: Any, start_response: Any) -> list[bytes]:
        page = pages.get(environ.get("PATH_INFO", "/"))
        if page is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [page]

    return app


class WorkerThread(threading.Thread):
    """The worker's asyncio loop in a thread of its own; `stop()` is its SIGTERM."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="worker", daemon=True)
        self.worker = worker
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = threading.Event()

    def run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.started.set()
            await self.worker.run()

        asyncio.run(main())

    def stop(self) -> None:
        if self.started.wait(5) and self.loop is not None:
            self.loop.call_soon_threadsafe(self.worker.stop)
        self.join(15)


# --- output ----------------------------------------------------------------------------------


def describe(delivered: Delivered) -> str:
    dkim_text = (
        ", ".join(
            f"{r.result} (d={r.domain} s={r.selector} a={r.algorithm})" for r in delivered.dkim
        )
        or "none (no signature)"
    )
    waited = (
        f" after greylisting {delivered.greylisted_for:.1f}s ago"
        if delivered.greylisted_for is not None
        else ""
    )
    return (
        f"mailbox: received {delivered.message_id}{waited}\n"
        f"  From:     {delivered.from_header}\n"
        f"  Reply-To: {delivered.reply_to}\n"
        f"  Subject:  {delivered.subject}\n"
        f"  DKIM:     {dkim_text or 'none (no signature)'}\n"
        f"  SPF:      {delivered.spf} ({delivered.spf_explanation})\n"
        f"  client:   {delivered.peer}, EHLO {delivered.helo}, MAIL FROM <{delivered.mail_from}>\n"
        f"  stored:   Maildir/new/{delivered.key}"
    )


PRODUCTION_RETRY = Settings.model_fields["retry_initial"].default


def banner(box: Sandbox, folder: Path) -> str:
    relay_bin = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "relay"
    if relay_bin != "relay":
        relay_bin = "relay"
    return f"""
formrelay demo: everything runs on 127.0.0.1 and stops with Ctrl-C.

  Form:        {box.form_url}
  Second form: {box.report_url} (a file field; to {SUPPORT_LOCAL}@{SUPPORT_DOMAIN})
  Console:     {box.console_url}  (user {CONSOLE_USER}, password {box.console_password})
               Use a visitor address at {VISITOR_DOMAIN} (the demo DNS knows only its own
               .test names). Without internet the hCaptcha widget cannot load: tick the
               "demo CAPTCHA" box instead (demo only; refused outside RELAY_ENV=demo).
  Embed:       <script src="{box.base_url}/embed.js" async></script>
  Your site:   {box.shop_url}/ (another origin, embedding the form with that snippet)
               {box.shop_url}/report (the second form: data-form="{FORM_ID}")
  Support:     {box.settings.support_address} -> mx.{SUPPORT_DOMAIN} on \
{box.mailbox.host}:{box.mailbox.port} (greylists each new sender once)
  Mailbox:     {folder / "Maildir"}
  DNS:         {box.dns.address} (SPF, DKIM selector {SELECTOR}, DMARC, PTR for {SENDING_IP})
  Retry delay: {RETRY_SECONDS}s (production default {PRODUCTION_RETRY}s)
  Read the log (another shell, in this folder):
               (set -a; . {box.env_file}; .venv/bin/{relay_bin} log)
               (set -a; . {box.env_file}; .venv/bin/{relay_bin} show ID)
"""


def doctor_report(settings: Settings) -> str:
    """`relay doctor` against the demo world: what a receiver would find in its DNS."""

    try:
        checks = asyncio.run(run_checks(settings, resolver=make_resolver(settings), ip=SENDING_IP))
    except Exception as exc:  # the doctor is a bonus here; the demo goes on without it
        return f"relay doctor could not run: {type(exc).__name__}: {exc}"
    width = max(len(c.name) for c in checks)
    lines = ["relay doctor (the demo zone, as a receiver sees it):"]
    for check in checks:
        note = "  (expected in the demo)" if check.name == "hcaptcha" else ""
        lines.append(f"  {check.status:<4}  {check.name:<{width}}  {check.summary}{note}")
    return "\n".join(lines)


def print_log(box: Sandbox, out: Callable[[str], None]) -> None:
    now = box.outbox.clock()
    rows = box.outbox.list_messages(status=None, since=None, limit=20)
    out("relay log:")
    out(log_table(rows, now, reply_width=None))
    for row in rows:
        out(f"relay show {row.id}:")
        out(detail_text(box.outbox.show(row.id), now))


def submit(box: Sandbox, *, name: str, email: str, subject: str, message: str) -> dict[str, Any]:
    """POST one submission as a browser on the form's own origin would, as JSON."""
    body = json.dumps(
        {
            "name": name,
            "email": email,
            "subject": subject,
            "message": message,
            "h-captcha-response": DEMO_CAPTCHA_TOKEN,
        }
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - our own loopback URL
        box.form_url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Origin": box.base_url,
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            status = response.status
            payload = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        status = exc.code
        payload = {"error": exc.read().decode(errors="replace")}
    return {**payload, "http_status": status}


def run(folder: Path, *, smoke: bool = False, timeout: float = 60.0) -> int:
    """Run the demo; with `smoke`, one submission end to end, 0 only if DKIM and SPF pass."""
    refusal = refuse_outside_demo(os.environ)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    logs.configure("INFO")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    lock = threading.Lock()

    def out(text: str) -> None:
        with lock:
            print(text, flush=True)

    def greylisted(peer: str, sender: str, rcpt: str) -> None:
        out(f"mailbox: greylisted {sender} -> {rcpt} from {peer}: answered 451 4.7.1, retry later")

    def delivered(item: Delivered) -> None:
        out(describe(item))

    # SIGTERM (a process manager, `kill`) stops the demo the same clean way as Ctrl-C, at
    # any phase: the sandbox's context managers stop worker, web, mailbox and DNS.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with sandbox(folder, on_greylisted=greylisted, on_delivered=delivered) as box:
            out(banner(box, folder))
            out(doctor_report(box.settings) + "\n")
            if not smoke:
                return _serve_until_interrupted()
            return _smoke(box, out, timeout)
    except ConfigError as exc:
        print(f"relay demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped: worker, web, mailbox and DNS are down.", flush=True)
        return 130 if smoke else 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve_until_interrupted() -> int:
    while True:
        time.sleep(0.5)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _smoke(box: Sandbox, out: Callable[[str], None], timeout: float) -> int:
    reply = submit(
        box,
        name="Ada Lovelace",
        email=f"ada@{VISITOR_DOMAIN}",
        subject="Smoke test: order 1234 has not arrived",
        message="Hello,\n\nmy order 1234 has not arrived yet. Could you check?\n\nAda",
    )
    out(f"web: POST /form -> {reply['http_status']} {json.dumps(reply)}")
    if reply["http_status"] != 202:
        out("smoke: FAILED: the form did not accept the submission")
        return 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not box.mailbox.delivered:
        time.sleep(0.1)
    time.sleep(0.5)  # let the worker record the delivery before the log is read
    print_log(box, out)
    if not box.mailbox.delivered:
        out(f"smoke: FAILED: nothing arrived within {timeout:.0f}s")
        return 1
    item = box.mailbox.delivered[0]
    checks = {
        "greylisted first": box.mailbox.greylisted >= 1,
        "DKIM pass": item.dkim_pass,
        "SPF pass": item.spf == "pass",
    }
    for name, ok in checks.items():
        out(f"smoke: {name}: {'ok' if ok else 'NO'}")
    if all(checks.values()):
        out("smoke: OK: delivered through the greylist retry with DKIM pass and SPF pass")
        return 0
    out("smoke: FAILED")
    return 1
