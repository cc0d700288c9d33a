"""The console through the Flask test client over a real SQLite outbox: off unless
configured, sign-in (argon2, generic errors, rate limits of its own, timeouts, the SSO
header only from the proxy), CSRF on every action, its own CSP, the log's filters and pages,
a message's detail, the actions with their counts and confirmations, the CSV export."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from flask import Flask
from flask.testing import FlaskClient

from relay.store.outbox import Outbox
from relay.store.workers import WorkerInfo
from tests.formfiles import three_forms
from tests.store.test_outbox import POLICY, built, refused
from tests.web.conftest import text_of, valid_form

PASSWORD = "correct horse battery staple"
# Cheap parameters: verification cost follows the hash, and tests verify many times.
HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)


@pytest.fixture
def console_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(RELAY_ADMIN_USERS=f"alice:{HASH} bob:{HASH}")


@pytest.fixture
def client(console_app: Flask) -> FlaskClient:
    return console_app.test_client()


def csrf(client: FlaskClient, path: str = "/admin/login") -> str:
    html = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def sign_in(client: FlaskClient, user: str = "alice", password: str = PASSWORD) -> Any:
    return client.post(
        "/admin/login",
        data={"csrf_token": csrf(client), "user": user, "password": password, "next": "/admin/"},
    )


def client_from(app: Flask, address: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


@pytest.fixture
def signed_in(client: FlaskClient) -> FlaskClient:
    assert sign_in(client).status_code == 303
    return client


@pytest.fixture
def failed(outbox: Outbox, web_settings: Any) -> Iterator[str]:
    outbox_id = outbox.enqueue(built(web_settings, 7))
    (claimed,) = outbox.claim("w1", 1, 60)
    outbox.record_attempt(claimed, refused(), owner="w1", policy=POLICY)
    return outbox_id


def test_off_unless_configured(client: FlaskClient, make_app: Callable[..., Flask]) -> None:
    plain = make_app().test_client()
    for path in ("/admin", "/admin/", "/admin/login", "/admin/messages/x"):
        assert plain.get(path).status_code == 404
    assert plain.get("/form").headers.get("Set-Cookie") is None


def test_sign_in_page_and_its_cookie(client: FlaskClient) -> None:
    redirect = client.get("/admin/")
    assert redirect.status_code == 303
    assert redirect.headers["Location"].startswith("/admin/login?next=/admin/")
    page = client.get("/admin/login")
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    assert "hcaptcha" not in csp
    assert "partner.test" not in csp  # RELAY_ALLOWED_ORIGINS never applies here
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith("formrelay_console=")
    for attribute in ("Secure", "HttpOnly", "Path=/admin", "SameSite=Strict"):
        assert attribute in cookie
    assert "Expires" not in cookie  # a browser-session cookie; the server times it out


def test_wrong_password_and_unknown_user_get_one_generic_error(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "relay.console")
    wrong = sign_in(client, password="not it")
    unknown = sign_in(client, user="mallory")
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert "The user name or the password is not right." in response.get_data(as_text=True)
    assert client.get("/admin/").status_code == 303
    assert "console.login_failed user=alice" in caplog.text
    assert PASSWORD not in caplog.text


def test_a_post_without_the_csrf_token_is_refused(
    client: FlaskClient, signed_in: FlaskClient, failed: str, outbox: Outbox
) -> None:
    login = client.post("/admin/login", data={"user": "alice", "password": PASSWORD})
    assert login.status_code == 400
    retry = client.post(f"/admin/messages/{failed}/retry")
    assert retry.status_code == 400
    assert "This form had expired" in retry.get_data(as_text=True)
    forged = client.post(f"/admin/messages/{failed}/retry", data={"csrf_token": "x" * 40})
    assert forged.status_code == 400
    assert outbox.get(failed).status == "failed"


def test_retry_one_message_is_logged_with_who(
    signed_in: FlaskClient, failed: str, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "relay.console")
    page = signed_in.get(f"/admin/messages/{failed}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    text = text_of(html)
    assert "550 5.1.1 No such user" in text
    assert "mx1.support.test" in text
    assert "127.0.0.2:25" in text
    assert "Reply-To" in text
    assert "my order has not arrived." in text  # the text as the helpdesk sees it
    assert "Possible duplicate no" in text
    token = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert token is not None
    done = signed_in.post(f"/admin/messages/{failed}/retry", data={"csrf_token": token.group(1)})
    assert done.status_code == 303
    assert outbox.get(failed).status == "deferred"
    assert "console.retry user=alice" in caplog.text
    assert f"id={failed}" in caplog.text
    assert "Due now" in signed_in.get(done.headers["Location"]).get_data(as_text=True)


def test_visitor_text_is_escaped(signed_in: FlaskClient, outbox: Outbox, web_settings: Any) -> None:
    from relay.mail.message import Submission, build_message

    evil = build_message(
        Submission(
            name="<b>Eve</b>",
            email="eve@visitor.test",
            subject="<script>alert(1)</script>",
            message="<img src=x onerror=alert(2)>",
        ),
        web_settings,
    )
    outbox_id = outbox.enqueue(evil)
    for path in ("/admin/", f"/admin/messages/{outbox_id}"):
        html = signed_in.get(path).get_data(as_text=True)
        assert "<script>alert(1)" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<img src=x" not in html


def test_idle_and_absolute_timeouts(signed_in: FlaskClient, console_app: Flask) -> None:
    state = console_app.extensions["formrelay_console"]
    start = state.clock()
    state.clock = lambda: start + 1700
    assert signed_in.get("/admin/").status_code == 200  # and seen now
    state.clock = lambda: start + 1700 + 1801
    assert signed_in.get("/admin/").status_code == 303  # idle too long
    assert sign_in(signed_in).status_code == 303
    for n in range(1, 30):  # active every 25 minutes, but not past 12 hours from sign-in
        state.clock = lambda n=n: start + 1700 + 1801 + n * 1500
        if signed_in.get("/admin/").status_code != 200:
            break
    assert n * 1500 > 43200 - 1500


def test_the_login_limit_is_its_own(make_app: Callable[..., Flask]) -> None:
    app = make_app(
        RELAY_ADMIN_USERS=f"alice:{HASH}",
        RELAY_ADMIN_LOGIN_RATE_LIMIT="3/minute",
        RELAY_RATE_LIMIT="2/minute",
    )
    client = app.test_client()
    for _ in range(3):
        assert sign_in(client, password="guess").status_code == 401
    limited = sign_in(client)  # even the right password
    assert limited.status_code == 429
    assert "Too many sign-in attempts" in limited.get_data(as_text=True)
    # The form's limit did not count the sign-ins, and counts its own.
    assert [client.post("/form", data=valid_form()).status_code for _ in range(3)] == [
        303,
        303,
        429,
    ]
    other = client_from(app, "127.0.0.9")
    assert sign_in(other).status_code == 303  # per client IP


def test_the_sso_header_only_through_the_proxy(make_app: Callable[..., Flask]) -> None:
    app = make_app(RELAY_ADMIN_TRUSTED_HEADER="X-Forwarded-User", RELAY_TRUSTED_PROXIES="1")
    header = {"X-Forwarded-User": "carol@example.test"}
    proxy = client_from(app, "127.0.0.1")
    page = proxy.get("/admin/", headers={**header, "X-Forwarded-For": "198.51.100.7"})
    assert page.status_code == 200
    assert "Sign out carol@example.test" in page.get_data(as_text=True)
    assert proxy.get("/admin/").status_code == 401  # no header: sign in at the proxy
    direct = client_from(app, "203.0.113.5")
    assert direct.get("/admin/", headers=header).status_code == 401


def test_filters_pages_and_export(
    signed_in: FlaskClient, outbox: Outbox, web_settings: Any, failed: str
) -> None:
    ids = [outbox.enqueue(built(web_settings, n)) for n in range(60)]
    first = signed_in.get("/admin/").get_data(as_text=True)
    assert first.count('href="/admin/messages/') == 50
    older = re.search(r'href="(/admin/\?after=[^"]+)" rel="next"', first)
    assert older is not None
    second = signed_in.get(older.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert second.count('href="/admin/messages/') == 11
    shown = set(re.findall(r'href="/admin/messages/([a-z0-9]+)"', first + second))
    assert shown == {*ids, failed}
    only_failed = signed_in.get("/admin/?status=failed").get_data(as_text=True)
    assert re.findall(r'href="/admin/messages/([a-z0-9]+)"', only_failed) == [failed]
    search = signed_in.get("/admin/?q=Order+42+is").get_data(as_text=True)
    assert re.findall(r'href="/admin/messages/([a-z0-9]+)"', search) == [ids[42]]
    export = signed_in.get("/admin/export.csv?status=queued")
    assert export.headers["Content-Disposition"].startswith("attachment")
    rows = list(csv.DictReader(io.StringIO(export.get_data(as_text=True))))
    assert {r["id"] for r in rows} == set(ids)
    assert "Queue" in text_of(first)
    assert "Due now 60" in text_of(first)


def test_retry_all_failed_needs_the_count_confirmed(
    signed_in: FlaskClient, failed: str, outbox: Outbox, web_settings: Any
) -> None:
    page = signed_in.get("/admin/retry-failed").get_data(as_text=True)
    assert "1 failed message(s) will be due now" in page
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    stale = signed_in.post(
        "/admin/retry-failed", data={"csrf_token": token, "count": "2", "confirm": "yes"}
    )
    assert stale.status_code == 409  # the operator saw another number
    assert outbox.get(failed).status == "failed"
    done = signed_in.post(
        "/admin/retry-failed", data={"csrf_token": token, "count": "1", "confirm": "yes"}
    )
    assert done.status_code == 303
    assert outbox.get(failed).status == "deferred"


def test_purge_and_held_actions(
    signed_in: FlaskClient, failed: str, outbox: Outbox, web_settings: Any
) -> None:
    token = csrf(signed_in, "/admin/")
    assert signed_in.get("/admin/purge?days=0").status_code == 200
    page = signed_in.get("/admin/purge?days=0").get_data(as_text=True)
    assert "1 message(s) older than 0 days have a body to purge" in page
    done = signed_in.post(
        "/admin/purge", data={"csrf_token": token, "days": "0", "count": "1", "confirm": "yes"}
    )
    assert done.status_code == 303
    assert outbox.show(failed).body is None
    held = outbox.enqueue(built(web_settings, 1), held_by="words.subject: order")
    kept = outbox.enqueue(built(web_settings, 2), held_by="words.subject: order")
    detail = signed_in.get(f"/admin/messages/{held}").get_data(as_text=True)
    assert "words.subject: order" in detail
    signed_in.post(f"/admin/messages/{held}/release", data={"csrf_token": token})
    assert outbox.get(held).status == "queued"
    gone = signed_in.post(f"/admin/messages/{kept}/discard", data={"csrf_token": token})
    assert gone.headers["Location"].startswith("/admin/?status=held")
    assert signed_in.get(f"/admin/messages/{kept}").status_code == 404


def test_no_cors_for_the_console(signed_in: FlaskClient) -> None:
    response = signed_in.get("/admin/", headers={"Origin": "http://partner.test"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_japanese(signed_in: FlaskClient, failed: str) -> None:
    html = signed_in.get("/admin/?lang=ja").get_data(as_text=True)
    assert '<html lang="ja">' in html
    assert "ログ" in html
    assert 'href="/admin/messages/' in html
    assert "lang=ja" in html


def test_the_queue_panel_lists_the_workers_from_their_heartbeats(
    signed_in: FlaskClient, outbox: Outbox, web_settings: Any
) -> None:
    page = signed_in.get("/admin/")
    assert "No worker has sent a heartbeat today" in page.get_data(as_text=True)
    outbox.workers.register(WorkerInfo("mail1:4123:9f2c1a", "mail1", "", 4123, "0.1.0", 10))
    outbox.workers.register(WorkerInfo("mail1:3911:41b0de", "mail1", "", 3911, "0.1.0", 10))
    outbox.workers.deregister("mail1:3911:41b0de")
    outbox.enqueue(built(web_settings))
    (held,) = outbox.claim("mail1:4123:9f2c1a", 1, 60)
    page = signed_in.get("/admin/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    live = re.search(
        r'<tr class="worker-live"><th scope="row">mail1:4123:9f2c1a</th>(.*?)</tr>', html
    )
    assert live is not None, html
    assert "<td>live</td>" in live.group(1)
    assert live.group(1).endswith("<td>1</td>")  # the message it holds
    assert '<tr class="worker-stopped"><th scope="row">mail1:3911:41b0de</th>' in html
    assert held.id


def test_the_log_filters_by_form(
    make_app: Callable[..., Flask], outbox: Outbox, web_settings: Any, tmp_path: Path
) -> None:
    app = make_app(RELAY_ADMIN_USERS=f"alice:{HASH}", RELAY_FORMS_FILE=str(three_forms(tmp_path)))
    client = app.test_client()
    assert sign_in(client).status_code == 303
    default = outbox.enqueue(built(web_settings, 1))
    sales = outbox.enqueue(built(web_settings, 2), form_id="sales")
    page = client.get("/admin/").get_data(as_text=True)
    assert '<select id="form" name="form">' in page
    assert '<option value="careers">careers</option>' in page
    assert "Form: sales" in text_of(page)
    only = client.get("/admin/?form=sales").get_data(as_text=True)
    assert re.findall(r'href="/admin/messages/([a-z0-9]+)"', only) == [sales]
    assert '<option value="sales" selected>' in only
    assert "form=sales" in only  # the export and the pages keep it
    rows = list(csv.DictReader(io.StringIO(client.get("/admin/export.csv?form=default").text)))
    assert [(r["id"], r["form_id"]) for r in rows] == [(default, "default")]
    unknown = client.get("/admin/?form=nosuch").get_data(as_text=True)
    assert set(re.findall(r'href="/admin/messages/([a-z0-9]+)"', unknown)) == {default, sales}


def test_the_message_page_shows_its_form(
    make_app: Callable[..., Flask], outbox: Outbox, web_settings: Any, tmp_path: Path
) -> None:
    """The form's id beside the address, linked to that form's log; in Japanese too; a form
    no longer configured is shown unlinked, an alert mail (no form) without the line."""
    app = make_app(RELAY_ADMIN_USERS=f"alice:{HASH}", RELAY_FORMS_FILE=str(three_forms(tmp_path)))
    client = app.test_client()
    assert sign_in(client).status_code == 303
    sales = outbox.enqueue(built(web_settings, 1), form_id="sales")
    default = outbox.enqueue(built(web_settings, 2))
    gone = outbox.enqueue(built(web_settings, 3), form_id="retired")
    alert = outbox.enqueue(built(web_settings, 4), form_id=None)
    html = client.get(f"/admin/messages/{sales}").get_data(as_text=True)
    assert '<dt>Form</dt><dd><a href="/admin/?form=sales"><code>sales</code></a></dd>' in html, html
    assert "Form sales" in text_of(html)
    ja = client.get(f"/admin/messages/{sales}?lang=ja").get_data(as_text=True)
    assert '<dt>フォーム</dt><dd><a href="/admin/?form=sales&amp;lang=ja">' in ja
    assert "フォーム sales" in text_of(ja)
    assert "Form default" in text_of(
        client.get(f"/admin/messages/{default}").get_data(as_text=True)
    )
    retired = client.get(f"/admin/messages/{gone}").get_data(as_text=True)
    assert "<dt>Form</dt><dd><code>retired</code></dd>" in retired
    assert "<dt>Form</dt>" not in client.get(f"/admin/messages/{alert}").get_data(as_text=True)
