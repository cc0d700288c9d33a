"""The form in headless Chromium against a real server: directly, and inside an iframe on a
second local origin through embed.js; keyboard-only submission; Japanese field errors; the
layout at 320 px. The hCaptcha script is replaced by a local stand-in widget and every other
non-loopback request is blocked. Screenshots go to tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server

from relay import create_app
from relay.sandbox.captcha import SiteverifyStub
from relay.settings import Settings
from relay.store.outbox import Outbox
from tests.conftest import unavailable
from tests.web.conftest import queued

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# Stands in for https://js.hcaptcha.com/1/api.js: a visible "solved" widget that puts a
# pass-* token (which the siteverify stand-in accepts once) in h-captcha-response.
STAND_IN_WIDGET = """
(function () {
  function render() {
    document.querySelectorAll(".h-captcha").forEach(function (box) {
      if (box.querySelector("textarea")) { return; }
      var field = document.createElement("textarea");
      field.name = "h-captcha-response";
      field.hidden = true;
      field.style.display = "none";
      field.value = "pass-" + Math.random().toString(36).slice(2) + Date.now();
      var badge = document.createElement("div");
      badge.textContent = "\\u2713 stand-in hCaptcha (" + box.dataset.sitekey.slice(0, 8) + ")";
      // The size of hCaptcha's normal widget iframe.
      badge.style.width = "303px";
      badge.style.height = "78px";
      badge.style.border = "1px solid #888";
      badge.style.boxSizing = "border-box";
      badge.style.padding = "1rem";
      box.appendChild(badge);
      box.appendChild(field);
    });
  }
  // As api.js does: static/captcha.js takes a script without it for one that failed.
  window.hcaptcha = { render: render };
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", render);
  } else { render(); }
})();
"""


def serve_thread(server: Any) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


class HostPage:
    """A second origin (127.0.0.1:<port>) serving a page that embeds the form."""

    def __init__(self) -> None:
        self.snippet = ""
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (
                    "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
                    "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                    "<title>Partner shop</title></head><body style='margin:0;font-family:serif'>"
                    "<h1 style='margin:8px'>Partner shop: contact</h1>"
                    f"{page.snippet}<p style='margin:8px'>Footer of the partner page.</p>"
                    "</body></html>"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        serve_thread(self.server)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def host_page() -> Iterator[HostPage]:
    page = HostPage()
    yield page
    page.close()


@pytest.fixture
def live(
    make_settings: Callable[..., Settings],
    web_env: dict[str, str],
    outbox: Outbox,
    host_page: HostPage,
) -> Iterator[str]:
    """The app on a real threaded WSGI server; yields its base URL (http://localhost:port)."""
    settings = make_settings(
        **{**web_env, "RELAY_ALLOWED_ORIGINS": f"http://localhost,{host_page.origin}"}
    )
    app = create_app(settings, outbox=outbox)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serve_thread(server)
    base = f"http://localhost:{server.server_port}"
    host_page.snippet = f'<script src="{base}/embed.js" data-title="Contact form" async></script>'
    yield base
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        unavailable(f"playwright is not installed: {exc}")
        raise
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


def route_requests(route: Any) -> None:
    url = route.request.url
    host = urlsplit(url).hostname or ""
    if url.startswith("https://js.hcaptcha.com/"):
        route.fulfill(status=200, content_type="text/javascript", body=STAND_IN_WIDGET)
    elif host in ("127.0.0.1", "localhost") or url.startswith(("data:", "about:")):
        route.continue_()
    else:
        route.abort()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    contexts: list[Any] = []

    def make(width: int = 1280, height: int = 900, locale: str = "en-US") -> Any:
        context = browser.new_context(
            viewport={"width": width, "height": height}, locale=locale, service_workers="block"
        )
        context.route("**/*", route_requests)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15000)
        return page

    yield make
    for context in contexts:
        context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fill(target: Any, **values: str) -> None:
    for field, value in values.items():
        target.locator(f"#{field}").fill(value)


VISITOR = {
    "name": "Hanako Yamada",
    "email": "hanako@visitor.test",
    "subject": "Order 1234",
    "message": "Hello,\nmy order has not arrived yet.",
}


def test_direct_form_submits_and_shows_thanks(
    live: str, new_page: Callable[..., Any], outbox: Outbox
) -> None:
    page = new_page()
    page.goto(f"{live}/form?lang=en")
    page.wait_for_selector("textarea[name='h-captcha-response']", state="attached")
    shot(page, "form-en-desktop")
    fill(page, **VISITOR)
    page.get_by_role("button", name="Send message").click()
    page.wait_for_url("**/thanks?lang=en")
    assert page.get_by_role("heading", name="Thank you").is_visible()
    page.wait_for_function("document.activeElement.id === 'thanks-title'")
    rows = queued(outbox)
    assert len(rows) == 1
    assert rows[0].subject == "Order 1234"


def test_keyboard_only_submission(live: str, new_page: Callable[..., Any], outbox: Outbox) -> None:
    page = new_page()
    page.goto(f"{live}/form?lang=en")
    page.wait_for_selector("textarea[name='h-captcha-response']", state="attached")
    page.locator("body").focus()
    focused = []
    # Skip link, language link, then the four fields; the honeypot is never reached.
    for _ in range(12):
        page.keyboard.press("Tab")
        active = page.evaluate("document.activeElement.id || document.activeElement.tagName")
        focused.append(active)
        if active in VISITOR:
            page.keyboard.type(VISITOR[active])
        if active == "BUTTON":
            break
    assert "website" not in focused
    assert [f for f in focused if f in VISITOR] == list(VISITOR)
    page.keyboard.press("Enter")
    page.wait_for_url("**/thanks?lang=en")
    assert len(queued(outbox)) == 1


def test_japanese_field_errors_at_320px(
    live: str, new_page: Callable[..., Any], outbox: Outbox
) -> None:
    page = new_page(width=320, height=720, locale="ja-JP")
    page.goto(f"{live}/form")
    page.wait_for_selector("textarea[name='h-captcha-response']", state="attached")
    assert page.locator("h1").inner_text() == "お問い合わせ"
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    widget = page.locator(".h-captcha > div").bounding_box()
    assert widget is not None
    assert widget["x"] + widget["width"] <= 320
    shot(page, "form-ja-320")
    # A local error on each field (the domain is asked in DNS only after the CAPTCHA).
    fill(page, name="", email="someone@", subject="件名", message="")
    page.get_by_role("button", name="送信する").click()
    page.wait_for_selector("#error-summary")
    summary = page.locator("#error-summary")
    assert "次の項目を修正してください" in summary.inner_text()
    assert page.evaluate("document.activeElement.id") == "error-summary"
    assert page.locator("#name-error").inner_text().endswith("お名前を入力してください。")
    assert "有効なメールアドレスを入力してください" in page.locator("#email-error").inner_text()
    assert page.locator("#name").get_attribute("aria-invalid") == "true"
    assert "name-error" in (page.locator("#name").get_attribute("aria-describedby") or "")
    assert page.locator("#subject").input_value() == "件名"
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    shot(page, "form-ja-320-errors")
    # The error summary links move focus to the field.
    summary.get_by_role("link").first.click()
    assert page.evaluate("document.activeElement.id") == "name"
    assert queued(outbox) == []


def test_desktop_error_state_screenshot(live: str, new_page: Callable[..., Any]) -> None:
    page = new_page()
    page.goto(f"{live}/form?lang=en")
    page.wait_for_selector("textarea[name='h-captcha-response']", state="attached")
    fill(page, name="Hanako", email="hanako@", subject="", message="Hi")
    page.get_by_role("button", name="Send message").click()
    page.wait_for_selector("#error-summary")
    assert "Please enter a valid email address" in page.locator("#email-error").inner_text()
    shot(page, "form-en-desktop-errors")


def test_embedded_in_a_cross_origin_iframe(
    live: str, host_page: HostPage, new_page: Callable[..., Any], outbox: Outbox
) -> None:
    page = new_page(width=1024, height=800)
    page.goto(host_page.origin + "/")
    frame_element = page.wait_for_selector("iframe[title='Contact form']")
    frame = frame_element.content_frame()
    assert frame is not None
    frame.wait_for_selector("textarea[name='h-captcha-response']", state="attached")
    assert frame.locator("header").count() == 0
    # embed.js resized the iframe to the height the framed page reported.
    page.wait_for_function(
        "() => { const f = document.querySelector('iframe');"
        " return f.style.height !== '40rem' && f.getBoundingClientRect().height > 300; }"
    )
    inner = frame.evaluate("Math.ceil(document.documentElement.getBoundingClientRect().height)")
    outer = page.evaluate("document.querySelector('iframe').getBoundingClientRect().height")
    assert abs(inner - outer) <= 2
    shot(page, "form-embedded")
    fill(frame, **VISITOR)
    frame.get_by_role("button", name="Send message").click()
    frame.wait_for_url("**/thanks?lang=en&embed=1")
    assert frame.get_by_role("heading", name="Thank you").is_visible()
    shot(page, "form-embedded-thanks")
    rows = queued(outbox)
    assert len(rows) == 1
    assert rows[0].meta["form"] == "embed"


def test_embedding_from_an_unlisted_origin_is_blocked(
    make_settings: Callable[..., Settings],
    web_env: dict[str, str],
    outbox: Outbox,
    host_page: HostPage,
    new_page: Callable[..., Any],
) -> None:
    """frame-ancestors: a page not in RELAY_ALLOWED_ORIGINS cannot show the form."""
    app = create_app(make_settings(**web_env), outbox=outbox)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serve_thread(server)
    try:
        base = f"http://localhost:{server.server_port}"
        host_page.snippet = f'<script src="{base}/embed.js"></script>'
        page = new_page()
        messages: list[str] = []
        page.on("console", lambda msg: messages.append(msg.text))
        page.goto(host_page.origin + "/")
        frame = page.wait_for_selector("iframe").content_frame()
        assert frame is not None
        page.wait_for_function(
            "() => document.querySelector('iframe').contentWindow !== null", timeout=5000
        )
        page.wait_for_timeout(500)
        assert frame.locator("#name").count() == 0
        assert any("frame-ancestors" in m for m in messages)
    finally:
        server.shutdown()
        server.server_close()


def is_hcaptcha_script(url: str) -> bool:
    return url.startswith("https://js.hcaptcha.com/")


def test_captcha_that_cannot_load_is_explained_with_a_retry(
    live: str, new_page: Callable[..., Any], outbox: Outbox, siteverify: SiteverifyStub
) -> None:
    """A blocked hCaptcha script (an extension, a proxy, an outage) left an empty gap under
    "Please confirm you are not a robot."; now a translated notice says why, with a retry
    link that loads the widget in place. A post without the token lists every error at once,
    the CAPTCHA's beside the fields', and siteverify is not asked."""
    blocked = True

    def hcaptcha(route: Any) -> None:
        if blocked:
            route.abort()
        else:
            route.fulfill(status=200, content_type="text/javascript", body=STAND_IN_WIDGET)

    page = new_page()
    page.route(is_hcaptcha_script, hcaptcha)
    page.goto(f"{live}/form?lang=en")
    notice = page.locator("#captcha-unavailable")
    notice.wait_for(state="visible")
    assert "The CAPTCHA could not be loaded" in notice.inner_text()
    assert page.locator(".h-captcha").is_hidden()  # no widget-sized gap
    shot(page, "form-captcha-blocked")

    fill(page, **{**VISITOR, "email": "hanako@"})
    page.get_by_role("button", name="Send message").click()
    page.wait_for_selector("#error-summary")
    summary = page.locator("#error-summary").inner_text()
    assert "Please enter a valid email address" in summary
    assert "CAPTCHA: Please complete the CAPTCHA." in summary
    assert siteverify.requests == []
    notice.wait_for(state="visible")  # still blocked after the round trip

    blocked = False
    page.get_by_role("link", name="Try loading the CAPTCHA again").click()
    page.wait_for_selector("textarea[name='h-captcha-response']", state="attached")
    assert notice.is_hidden()
    assert page.locator(".h-captcha").is_visible()
    assert page.locator("#subject").input_value() == VISITOR["subject"]  # nothing lost
    page.locator("#email").fill(VISITOR["email"])
    page.get_by_role("button", name="Send message").click()
    page.wait_for_url("**/thanks?lang=en")
    assert len(queued(outbox)) == 1

    japanese = new_page(locale="ja-JP")
    japanese.route(is_hcaptcha_script, lambda route: route.abort())
    japanese.goto(f"{live}/form")
    japanese.locator("#captcha-unavailable").wait_for(state="visible")
    assert "CAPTCHA を読み込めなかった" in japanese.locator("#captcha-unavailable").inner_text()
    assert japanese.get_by_role("link", name="CAPTCHA をもう一度読み込む").is_visible()


FETCH_JSON = """
async ([url, token]) => {
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: {"Content-Type": "application/json", "Accept": "application/json"},
      body: JSON.stringify({name: "Taro", email: "taro@visitor.test", subject: "From JS",
                            message: "Sent with fetch", "h-captcha-response": token}),
    });
    return {status: response.status, body: await response.json()};
  } catch (error) {
    return {error: String(error)};
  }
}
"""


def test_json_api_with_cors_from_an_allowed_origin(
    live: str, host_page: HostPage, new_page: Callable[..., Any], outbox: Outbox
) -> None:
    page = new_page()
    page.goto(host_page.origin + "/")
    result = page.evaluate(FETCH_JSON, [f"{live}/form", "pass-fetch-1"])
    assert result.get("status") == 202, result
    assert result["body"]["status"] == "queued"
    assert [row.id for row in queued(outbox)] == [result["body"]["id"]]


def test_json_api_is_blocked_for_an_unlisted_origin(
    make_settings: Callable[..., Settings],
    web_env: dict[str, str],
    outbox: Outbox,
    host_page: HostPage,
    new_page: Callable[..., Any],
) -> None:
    app = create_app(make_settings(**web_env), outbox=outbox)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serve_thread(server)
    try:
        page = new_page()
        page.goto(host_page.origin + "/")
        result = page.evaluate(
            FETCH_JSON, [f"http://localhost:{server.server_port}/form", "pass-fetch-2"]
        )
        assert "error" in result, result
        assert queued(outbox) == []
    finally:
        server.shutdown()
        server.server_close()
