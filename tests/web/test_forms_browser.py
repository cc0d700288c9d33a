"""Two forms in real Chromium, each embedded with embed.js `data-form` on a local origin of
its own: the sales form (a select, a thank-you page on its site) and the bug form (radios,
checkboxes, an image and a PDF uploaded, listed with their sizes before sending, a file too
big said at once). Each form refuses to be framed by the other's site."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from relay import create_app
from relay.settings import Settings
from relay.store.outbox import Outbox
from tests.formfiles import three_forms
from tests.web.conftest import queued
from tests.web.test_browser import (  # noqa: F401 - fixtures
    HostPage,
    browser,
    new_page,
    serve_thread,
    shot,
)
from tests.web.test_forms import PDF, PNG

pytestmark = pytest.mark.browser


@pytest.fixture
def sites() -> Iterator[tuple[HostPage, HostPage]]:
    a, b = HostPage(), HostPage()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def live(
    make_settings: Callable[..., Settings],
    web_env: dict[str, str],
    outbox: Outbox,
    sites: tuple[HostPage, HostPage],
    tmp_path: Path,
) -> Iterator[str]:
    a, b = sites
    settings = make_settings(
        **web_env, RELAY_FORMS_FILE=str(three_forms(tmp_path, a.origin, b.origin))
    )
    server = make_server("127.0.0.1", 0, create_app(settings, outbox=outbox), threaded=True)
    serve_thread(server)
    base = f"http://localhost:{server.server_port}"
    a.snippet = (
        f'<script src="{base}/embed.js" data-form="sales" data-title="Sales" async></script>'
    )
    b.snippet = f'<script src="{base}/embed.js" data-form="bugs" data-title="Bugs" async></script>'
    yield base
    server.shutdown()
    server.server_close()


def framed(page: Any, title: str) -> Any:
    frame = page.wait_for_selector(f"iframe[title='{title}']").content_frame()
    assert frame is not None
    frame.wait_for_selector("textarea[name='h-captcha-response']", state="attached")
    return frame


def raw_of(outbox: Outbox, outbox_id: str) -> bytes:
    body = outbox.show(outbox_id).body
    assert body is not None
    return bytes(body)


def test_two_forms_on_two_sites_one_with_an_image_and_a_pdf(
    live: str,
    sites: tuple[HostPage, HostPage],
    new_page: Callable[..., Any],  # noqa: F811
    outbox: Outbox,
) -> None:
    a, b = sites
    sales_page = new_page(width=1024, height=900)
    sales_page.goto(a.origin + "/")
    sales = framed(sales_page, "Sales")
    assert sales.locator("h1").inner_text() == "Talk to sales"
    sales.locator("#email").fill("hanako@visitor.test")
    sales.locator("#subject").fill("Quote for 40 seats")
    sales.select_option("#plan", "Business")
    sales.get_by_role("button", name="Send message").click()
    sales.wait_for_url("**/f/sales/thanks?lang=en&embed=1")
    assert sales.get_by_role("heading", name="Thank you").is_visible()

    bugs_page = new_page(width=1024, height=1400, locale="ja-JP")
    bugs_page.goto(b.origin + "/")
    bugs = framed(bugs_page, "Bugs")
    bugs.locator("#email").fill("taro@visitor.test")
    bugs.locator("#summary").fill("決済で落ちる")
    bugs.locator("#severity-1").check()
    bugs.locator("#areas").check()
    bugs.locator("#agree").check()
    bugs.locator("#details").fill("支払うを押しました。\n何も起きません。")
    bugs.locator("#files").set_input_files(
        [
            {"name": "screen.png", "mimeType": "image/png", "buffer": PNG},
            {"name": "請求書.pdf", "mimeType": "application/pdf", "buffer": PDF},
        ]
    )
    listed = bugs.locator("#files-list")
    listed.wait_for(state="visible")
    assert listed.locator("li").all_inner_texts() == ["screen.png (2 kB)", "請求書.pdf (1 kB)"]
    shot(bugs_page, "forms-bugs-files-ja")
    bugs.get_by_role("button", name="送信する").click()
    bugs.wait_for_url("**/f/bugs/thanks?lang=ja&embed=1")
    assert bugs.get_by_role("heading", name="ありがとうございました").is_visible()

    rows = {row.form_id: row for row in queued(outbox)}
    assert sorted(rows) == ["bugs", "sales"]
    assert rows["sales"].recipient == "sales@support.test"
    assert rows["bugs"].recipient == "bugs@support.test"
    assert rows["bugs"].meta["form"] == "embed"
    msg = email.message_from_bytes(raw_of(outbox, rows["bugs"].id), policy=email.policy.default)
    _text, png, pdf = msg.iter_parts()  # type: ignore[attr-defined]
    assert (png.get_filename(), png.get_content()) == ("screen.png", PNG)
    assert (pdf.get_filename(), pdf.get_content()) == ("請求書.pdf", PDF)


def test_the_thank_you_page_of_the_forms_site(
    live: str,
    sites: tuple[HostPage, HostPage],
    new_page: Callable[..., Any],  # noqa: F811
) -> None:
    """Opened on its own (a link from the site), the sales form redirects to its site's
    thank-you page."""
    a, _b = sites
    page = new_page()
    page.goto(f"{live}/f/sales?lang=en")
    page.wait_for_selector("textarea[name='h-captcha-response']", state="attached")
    page.locator("#email").fill("hanako@visitor.test")
    page.locator("#subject").fill("Quote")
    page.get_by_role("button", name="Send message").click()
    page.wait_for_url(f"{a.origin}/thanks")
    assert "Partner shop" in page.content()


def test_a_file_too_big_is_said_before_sending_and_framing_is_per_form(
    live: str,
    sites: tuple[HostPage, HostPage],
    new_page: Callable[..., Any],  # noqa: F811
    outbox: Outbox,
) -> None:
    a, b = sites
    page = new_page(width=1024, height=1400)
    page.goto(b.origin + "/")
    bugs = framed(page, "Bugs")
    bugs.locator("#files").set_input_files(
        [{"name": "huge.png", "mimeType": "image/png", "buffer": PNG + b"\x00" * 500_000}]
    )
    warning = bugs.locator("#files-list .too-big")
    warning.wait_for(state="visible")
    assert warning.inner_text() == (
        "huge.png is too large (502 kB); each file may be at most 400 kB."
    )
    bugs.get_by_role("button", name="Send message").click()
    assert bugs.evaluate("document.activeElement.id") == "files"
    assert queued(outbox) == []

    # The bug form on the sales site: frame-ancestors names only the bug form's site.
    a.snippet = b.snippet
    other = new_page()
    messages: list[str] = []
    other.on("console", lambda msg: messages.append(msg.text))
    other.goto(a.origin + "/")
    frame = other.wait_for_selector("iframe").content_frame()
    assert frame is not None
    other.wait_for_timeout(500)
    assert frame.locator("#email").count() == 0
    assert any("frame-ancestors" in m for m in messages)
