"""The console in headless Chromium against a real server, a real worker and a loopback MX:
sign in, filter the log, open a failed message, retry it and see it delivered; a wrong
password; the console refuses to load in a frame; 320 px and the keyboard. Screenshots of
the sign-in page, the log and a message, in English and Japanese, go to tests/artifacts/."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from argon2 import PasswordHasher
from werkzeug.serving import make_server

from relay import create_app
from relay.ops.demo import WorkerThread
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.worker.delivery import Worker
from tests.conftest import unavailable
from tests.peers.smtp import SMTPPeer
from tests.store.test_outbox import built
from tests.web.test_browser import (
    CHROMIUM,
    LAUNCH_ARGS,
    HostPage,
    route_requests,
    serve_thread,
    shot,
)

pytestmark = pytest.mark.browser

PASSWORD = "a long console password"
HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    contexts: list[Any] = []

    def make(width: int = 1280, height: int = 900, locale: str = "en-US") -> Any:
        context = browser.new_context(viewport={"width": width, "height": height}, locale=locale)
        context.route("**/*", route_requests)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15000)
        return page

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def host_page() -> Iterator[HostPage]:
    page = HostPage()
    yield page
    page.close()


@pytest.fixture
def console_settings(
    make_settings: Callable[..., Settings], web_env: dict[str, str], mx_server: SMTPPeer
) -> Settings:
    return make_settings(
        **web_env,
        RELAY_SMTP_PORT=str(mx_server.port),
        RELAY_ADMIN_USERS=f"ops:{HASH}",
        RELAY_RETRY_INITIAL="60",
    )


@pytest.fixture
def live(console_settings: Settings, outbox: Outbox) -> Iterator[str]:
    """relay.create_app (the composition root, with the doctor's checks) on a real server."""
    app = create_app(console_settings, outbox=outbox)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serve_thread(server)
    yield f"http://localhost:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def worker(console_settings: Settings, outbox: Outbox) -> Iterator[Worker]:
    running = Worker(outbox, console_settings, poll_interval=0.1, shutdown_grace=2)
    thread = WorkerThread(running)
    thread.start()
    yield running
    thread.stop()


def wait_for(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def sign_in(page: Any, base: str, password: str = PASSWORD, lang: str = "en") -> None:
    page.goto(f"{base}/admin/?lang={lang}")
    page.wait_for_url("**/admin/login**")
    page.locator("#user").fill("ops")
    page.locator("#password").fill(password)
    page.locator("form.login button[type=submit]").click()


def test_sign_in_filter_retry_and_see_it_delivered(
    live: str,
    worker: Worker,
    outbox: Outbox,
    console_settings: Settings,
    mx_server: SMTPPeer,
    new_page: Callable[..., Any],
) -> None:
    mx_server.handler.rcpt.append("550 5.7.1 Not today")
    failed = outbox.enqueue(built(console_settings, 1))
    wait_for(lambda: outbox.get(failed).status == "failed")
    for n in range(2, 5):
        outbox.enqueue(built(console_settings, n))
    wait_for(lambda: len(mx_server.messages) == 3)

    page = new_page()
    page.goto(f"{live}/admin/login?lang=en")
    shot(page, "console-login-en")
    sign_in(page, live, password="not the password")
    assert (
        "The user name or the password is not right." in page.locator("#login-error").inner_text()
    )
    page.locator("#password").fill(PASSWORD)
    page.locator("form.login button[type=submit]").click()
    page.wait_for_url(f"{live}/admin/?lang=en")  # where the sign-in page was asked from
    assert page.locator("h1").inner_text() == "Log"
    page.select_option("#status", "failed")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**status=failed**")
    rows = page.locator("table.log tbody tr")
    assert rows.count() == 1
    shot(page, "console-log-en")
    page.get_by_role("link", name=failed).click()
    page.wait_for_url(f"**/admin/messages/{failed}**")
    hosts = page.locator("table.hosts tbody tr").first.inner_text().split("\t")
    assert hosts[0] == "mx1.support.test"
    assert hosts[1].startswith("127.0.0.2:")
    assert hosts[2:6] == ["550", "5.7.1", "Not today", "rcpt"]
    assert "550 5.7.1 Not today (mx1.support.test)" in page.locator(".facts").inner_text()
    assert "my order has not arrived." in page.locator("pre.body").inner_text()
    assert page.locator("ul.checks li").count() >= 4  # SPF, DKIM, DMARC, alignment now
    shot(page, "console-message-en")
    page.get_by_role("button", name="Retry now").click()
    assert "Due now" in page.locator(".flash").inner_text()
    wait_for(lambda: outbox.get(failed).status == "delivered")
    page.reload()
    assert page.locator(".facts .status").inner_text() == "delivered"
    assert len(mx_server.messages) == 4


def test_japanese_screens_and_320_px(
    live: str, outbox: Outbox, console_settings: Settings, new_page: Callable[..., Any]
) -> None:
    held = outbox.enqueue(built(console_settings, 1), held_by="words.subject: order")
    outbox.enqueue(built(console_settings, 2))
    page = new_page(width=320, height=720, locale="ja-JP")
    page.goto(f"{live}/admin/login")
    assert page.locator("h1").inner_text() == "サインイン"
    shot(page, "console-login-ja")
    sign_in(page, live, lang="ja")
    page.wait_for_url("**/admin/?lang=ja")
    assert page.locator("h1").inner_text() == "ログ"
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    shot(page, "console-log-ja")
    page.goto(f"{live}/admin/messages/{held}?lang=ja")
    assert "保留" in page.locator(".facts").inner_text()
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    shot(page, "console-message-ja")
    # By keyboard: the skip link first, then the release button is reachable and works.
    page.locator("body").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "保留を解除して送信する":
            break
    page.keyboard.press("Enter")
    page.wait_for_selector(".flash")
    assert outbox.get(held).status == "queued"


def test_the_console_refuses_to_be_framed(
    live: str, host_page: HostPage, new_page: Callable[..., Any]
) -> None:
    host_page.snippet = f'<iframe src="{live}/admin/login" title="console"></iframe>'
    page = new_page()
    messages: list[str] = []
    page.on("console", lambda msg: messages.append(msg.text))
    page.goto(host_page.origin + "/")
    frame = page.wait_for_selector("iframe").content_frame()
    assert frame is not None
    page.wait_for_timeout(500)
    assert frame.locator("#password").count() == 0
    assert any("frame-ancestors" in m for m in messages), messages
