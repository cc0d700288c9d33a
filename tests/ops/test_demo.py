"""`relay demo`: the sandbox end to end as a real subprocess, and its demo-only guards."""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.errors import CaptchaError, ConfigError
from relay.mail.signing import Signer, dkim_txt_record
from relay.ops.demo import (
    DEMO_CAPTCHA_TOKEN,
    FROM_DOMAIN,
    SUPPORT_DOMAIN,
    OfflineDemoVerifier,
    demo_settings,
    demo_zone,
    make_key,
    refuse_outside_demo,
    sync_resolver,
)
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.mailbox import check_dkim, check_spf
from relay.settings import Settings
from tests.conftest import unavailable
from tests.web.test_forms import PNG

RELAY = Path(sys.executable).with_name("relay")


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any RELAY_ variable: the demo must need none."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(extra)
    return env


@pytest.mark.slow
def test_smoke_delivers_through_the_greylist_with_dkim_and_spf_passing(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(RELAY), "demo", "--smoke", "--folder", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
        env=_clean_env(),
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    greylisted = out.index("mailbox: greylisted form@shop.demo.test")
    received = out.index("mailbox: received <")
    assert greylisted < received, "the delivery must come after the greylist deferral"
    assert "DKIM:     pass (d=shop.demo.test s=demo a=rsa-sha256)" in out
    assert "SPF:      pass" in out
    # The log shows both attempts: the 451 deferral, then the delivery.
    assert "delivered  2" in out
    assert "451 4.7.1 Greylisted" in out[out.index("relay show") :]
    assert "smoke: OK" in out
    # relay doctor ran against the demo zone and nothing failed.
    report = out[out.index("relay doctor (the demo zone") : out.index("web: POST /form")]
    assert "PASS  spf" in report
    assert "PASS  ptr" in report
    assert "FAIL" not in report
    # The worker logged the deferral with its data, then the delivery.
    assert "delivery.deferred" in result.stderr
    assert "code=451" in result.stderr
    assert "delivery.delivered" in result.stderr
    stored = list((tmp_path / "demo" / "Maildir" / "new").iterdir())
    assert len(stored) == 1
    assert stored[0].read_bytes().startswith(b"Authentication-Results: mx.support.demo.test;")
    assert ((tmp_path / "demo" / "dkim-rsa.pem").stat().st_mode & 0o777) == 0o600


@pytest.mark.slow
def test_interactive_demo_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """A process manager's SIGTERM takes the same clean path as Ctrl-C: exit 0."""
    proc = subprocess.Popen(
        [str(RELAY), "demo", "--folder", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
    )
    assert proc.stdout is not None
    try:
        banner = ""
        deadline = time.monotonic() + 60
        while "Console:" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert "Form:        http://127.0.0.1:" in banner, banner
        console = re.search(r"Console:\s+(\S+)\s+\(user demo, password (\S+)\)", banner)
        assert console is not None, banner
        _sign_in_to_the_console(console.group(1), console.group(2))
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, banner + rest
    assert "stopped: worker, web, mailbox and DNS are down." in rest


def _sign_in_to_the_console(url: str, password: str) -> None:
    """The login the banner prints opens the console."""
    import httpx

    with httpx.Client(base_url=url.replace("localhost", "127.0.0.1"), timeout=10) as client:
        page = client.get("login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None, page.text
        # httpx keeps Secure cookies only over https: carry the session cookie by hand.
        cookie = page.headers["set-cookie"].split(";", 1)[0]
        signed = client.post(
            "login",
            data={"csrf_token": token.group(1), "user": "demo", "password": password},
            headers={"Cookie": cookie},
        )
        assert signed.status_code == 303, signed.text
        session = signed.headers["set-cookie"].split(";", 1)[0]
        log = client.get("", headers={"Cookie": session})
        assert log.status_code == 200
        assert "formrelay console" in log.text


def test_demo_refuses_a_production_environment(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(RELAY), "demo", "--smoke", "--folder", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=_clean_env(RELAY_ENV="production"),
        check=False,
    )
    assert result.returncode == 2
    assert "refused outside RELAY_ENV=demo" in result.stderr
    assert not (tmp_path / "demo").exists(), "nothing may start before the refusal"


def test_refusal_reads_only_relay_env() -> None:
    assert refuse_outside_demo({}) is None
    assert refuse_outside_demo({"RELAY_ENV": "demo"}) is None
    for env in ("production", "development", "test"):
        assert refuse_outside_demo({"RELAY_ENV": env}) is not None


def test_offline_verifier_is_refused_outside_demo(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # Production refuses .test addresses, so the test world's settings are relabelled.
    production = make_settings().model_copy(update={"env": "production"})
    with pytest.raises(ConfigError) as refused:
        OfflineDemoVerifier(production)
    assert "RELAY_ENV" in refused.value.problems[0]
    with pytest.raises(ConfigError):
        OfflineDemoVerifier(make_settings(RELAY_ENV="test"))


@pytest.fixture
def demo_world(tmp_path: Path) -> Iterator[tuple[Settings, DNSZoneServer, bytes]]:
    """The demo's settings and its DNS zone, served, as `relay demo` builds them."""
    pem = make_key(tmp_path / "dkim-rsa.pem")
    with DNSZoneServer(demo_zone(dkim_txt_record(pem), "127.0.0.2")) as server:
        settings = demo_settings(
            tmp_path, dns_address=server.address, smtp_port=2525, base_url="http://127.0.0.1:1"
        )
        yield settings, server, pem


def test_offline_verifier_accepts_only_its_tokens(
    demo_world: tuple[Settings, DNSZoneServer, bytes],
) -> None:
    settings, _server, _pem = demo_world
    verifier = OfflineDemoVerifier(settings)
    verifier.verify(DEMO_CAPTCHA_TOKEN, remoteip="127.0.0.1", hostnames=["127.0.0.1"])
    for token in ("", "pass-anything", DEMO_CAPTCHA_TOKEN + "x"):
        with pytest.raises(CaptchaError):
            verifier.verify(token, remoteip="127.0.0.1", hostnames=["127.0.0.1"])


def test_demo_settings_need_no_environment(
    demo_world: tuple[Settings, DNSZoneServer, bytes],
) -> None:
    settings, _server, _pem = demo_world
    assert settings.env == "demo"
    assert settings.from_domain == FROM_DOMAIN
    assert settings.support_address.endswith("@" + SUPPORT_DOMAIN)
    assert settings.retry_initial <= 5
    assert settings.dkim_key_pem


def test_mailbox_checks_catch_a_forged_sender(
    demo_world: tuple[Settings, DNSZoneServer, bytes],
) -> None:
    """The verdicts the demo prints are real: a wrong IP fails SPF, a changed body fails DKIM."""
    settings, server, _pem = demo_world
    resolver = sync_resolver(server.address)
    helo = settings.helo_hostname
    assert check_spf("127.0.0.1", settings.from_address, helo, resolver)[0] == "pass"
    assert check_spf("127.0.0.77", settings.from_address, helo, resolver)[0] == "fail"
    raw = (
        b"From: Demo Shop <form@shop.demo.test>\r\nTo: help@support.demo.test\r\n"
        b"Subject: hello\r\nMessage-ID: <1@shop.demo.test>\r\n\r\nBody line.\r\n"
    )
    signed = Signer.from_settings(settings).sign(raw)
    assert [r.result for r in check_dkim(signed, resolver)] == ["pass"]
    tampered = signed.replace(b"Body line.", b"Body line!")
    assert [r.result for r in check_dkim(tampered, resolver)] == ["fail"]
    assert check_dkim(raw, resolver) == ()


@pytest.mark.browser
def test_demo_form_works_offline_in_a_browser(tmp_path: Path) -> None:
    """With hCaptcha unreachable (as here), the demo CAPTCHA box still lets a visitor send,
    through the form embedded in the demo's stand-in for the operator's site."""
    import re
    import shutil

    from relay.ops.demo import sandbox

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("Debian's chromium is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed")
    with sandbox(tmp_path / "demo") as box, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page()
            page.route(re.compile(r"https://([\w-]+\.)*hcaptcha\.com/.*"), lambda r: r.abort())
            # The operator's own site on another origin, embedding the form with embed.js.
            page.goto(box.shop_url + "/")
            form = page.frame_locator("iframe")
            form.locator("#name").fill("Grace Hopper")
            form.locator("#email").fill("grace@customer.demo.test")
            form.locator("#subject").fill("Browser demo")
            form.locator("#message").fill("Sent from the embedded demo form in a browser.")
            form.locator("#demo-captcha").check()
            form.locator("button[type=submit]").click()
            form.locator("#thanks-title").wait_for()
            # The second demo form, with a file field, on its own page of the shop.
            page.goto(box.shop_url + "/report")
            report = page.frame_locator("iframe")
            report.locator("#email").fill("grace@customer.demo.test")
            report.locator("#summary").fill("The basket forgets items")
            report.locator("#severity-1").check()
            report.locator("#screenshot").set_input_files(
                [{"name": "basket.png", "mimeType": "image/png", "buffer": PNG}]
            )
            report.locator("#demo-captcha").check()
            report.locator("button[type=submit]").click()
            report.locator("#thanks-title").wait_for()
        finally:
            browser.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(box.mailbox.delivered) < 2:
            time.sleep(0.1)
    assert box.mailbox.greylisted == 2
    by_subject = {item.subject: item for item in box.mailbox.delivered}
    assert sorted(by_subject) == ["Browser demo", "[Bug] The basket forgets items"]
    for item in by_subject.values():
        assert item.dkim_pass
        assert item.spf == "pass"
    report_mail = by_subject["[Bug] The basket forgets items"]
    assert report_mail.recipients == ("bugs@support.demo.test",)
    stored = (tmp_path / "demo" / "Maildir" / "new" / report_mail.key).read_bytes()
    parts = list(email.message_from_bytes(stored, policy=email.policy.default).iter_parts())
    assert (parts[1].get_filename(), parts[1].get_content()) == ("basket.png", PNG)


def test_form_outside_the_demo_has_no_demo_captcha(make_settings: Callable[..., Settings]) -> None:
    from relay import create_app

    app = create_app(make_settings())
    page = app.test_client().get("/form").get_data(as_text=True)
    assert "h-captcha" in page
    assert "demo-captcha" not in page
    assert DEMO_CAPTCHA_TOKEN not in page


def test_mailbox_greylists_once_and_relays_for_nobody(
    demo_world: tuple[Settings, DNSZoneServer, bytes], tmp_path: Path
) -> None:
    import smtplib

    from relay.sandbox.mailbox import SupportMailbox

    settings, server, _pem = demo_world
    mailbox = SupportMailbox(
        tmp_path / "Maildir",
        domain=SUPPORT_DOMAIN,
        resolver=sync_resolver(server.address),
        greylist_seconds=0.2,
    )
    raw = Signer.from_settings(settings).sign(
        b"From: form@shop.demo.test\r\nTo: help@support.demo.test\r\nSubject: hi\r\n"
        b"Message-ID: <2@shop.demo.test>\r\n\r\nHello.\r\n"
    )
    with mailbox, smtplib.SMTP(mailbox.host, mailbox.port, timeout=10) as client:
        client.ehlo(settings.helo_hostname)
        client.mail(settings.from_address)
        assert client.rcpt("someone@elsewhere.test")[0] == 550
        assert client.rcpt(settings.support_address)[0] == 451
        client.rset()
        time.sleep(0.3)
        client.mail(settings.from_address)
        assert client.rcpt(settings.support_address)[0] == 250
        code, _text = client.data(raw)
        assert code == 250
    [item] = mailbox.delivered
    assert mailbox.greylisted == 1
    assert item.dkim_pass
    assert item.spf == "pass"
    stored = list((tmp_path / "Maildir" / "new").iterdir())
    assert len(stored) == 1
    assert b"dkim=pass header.d=shop.demo.test" in stored[0].read_bytes()
