"""The form through the Flask test client: rendering, every validation path, CAPTCHA outcomes,
honeypot, origins and CORS, headers, store failures and hostile bodies. Real peers throughout:
the loopback DNS server, the siteverify stand-in and a SQLite outbox."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from email import message_from_bytes, policy

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr

from relay import create_app
from relay.errors import CaptchaError, ConfigError
from relay.mail.mx import make_resolver
from relay.sandbox.captcha import SiteverifyStub
from relay.sandbox.dns import DNSZoneServer
from relay.settings import HCAPTCHA_TEST_SECRET, HCAPTCHA_TEST_SITEKEY, Settings
from relay.store.outbox import Outbox
from tests.web.conftest import EVIL, PARTNER, queued, text_of, token, valid_form


def raw_of(outbox: Outbox, outbox_id: str) -> bytes:
    body = outbox.show(outbox_id).body
    assert body is not None
    return bytes(body)


# --- GET /form --------------------------------------------------------------------------------


def test_form_page_has_labelled_fields_honeypot_and_captcha(client: FlaskClient) -> None:
    response = client.get("/form")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    for field in ("name", "email", "subject", "message"):
        assert f'<label for="{field}">' in html
        assert f'id="{field}"' in html
    assert 'aria-invalid="true"' not in html
    honeypot = re.search(r'<div class="hp" aria-hidden="true">.*?</div>', html, re.S)
    assert honeypot is not None
    assert 'tabindex="-1"' in honeypot.group(0)
    assert 'autocomplete="off"' in honeypot.group(0)
    assert 'data-sitekey="30000000-ffff-ffff-ffff-000000000003"' in html
    # static/captcha.js loads the widget's script, so that it can tell when it cannot.
    assert 'data-script="https://js.hcaptcha.com/1/api.js?hl=en"' in html
    assert 'src="/static/captcha.js"' in html
    assert '<html lang="en">' in html
    assert 'name="viewport" content="width=device-width, initial-scale=1"' in html
    assert "<header" in html


def test_honeypot_is_off_screen_not_display_none(client: FlaskClient) -> None:
    with client.get("/static/form.css") as response:
        css = response.get_data(as_text=True)
    rule = re.search(r"\.hp \{([^}]*)\}", css)
    assert rule is not None
    assert "left: -10000px" in rule.group(1)
    assert "display: none" not in rule.group(1)


def test_embed_mode_has_no_page_chrome(client: FlaskClient) -> None:
    html = client.get("/form?embed=1").get_data(as_text=True)
    assert "<header" not in html
    assert "<footer" not in html
    assert 'class="embed"' in html
    assert 'action="/form?lang=en&amp;embed=1"' in html


@pytest.mark.parametrize(
    ("headers", "query", "lang", "heading"),
    [
        ({"Accept-Language": "ja,en;q=0.5"}, "", "ja", "お問い合わせ"),
        ({"Accept-Language": "fr, en;q=0.8"}, "", "en", "Contact us"),
        ({"Accept-Language": "ja"}, "?lang=en", "en", "Contact us"),
        ({"Accept-Language": "en"}, "?lang=ja", "ja", "お問い合わせ"),
        ({}, "?lang=xx", "en", "Contact us"),
    ],
)
def test_language_from_accept_language_and_lang_override(
    client: FlaskClient, headers: dict[str, str], query: str, lang: str, heading: str
) -> None:
    html = client.get("/form" + query, headers=headers).get_data(as_text=True)
    assert f'<html lang="{lang}">' in html
    assert f"<h1>{heading}</h1>" in html
    assert f"api.js?hl={lang}" in html


# --- successful submissions -----------------------------------------------------------------


def test_html_submission_is_queued_and_redirects_to_thanks(
    client: FlaskClient, outbox: Outbox, siteverify: SiteverifyStub, web_settings: Settings
) -> None:
    response = client.post("/form?lang=ja", data=valid_form())
    assert response.status_code == 303
    assert response.headers["Location"] == "/thanks?lang=ja"
    rows = queued(outbox)
    assert len(rows) == 1
    assert rows[0].recipient == "help@support.test"
    assert rows[0].meta["language"] == "ja"
    msg = message_from_bytes(raw_of(outbox, rows[0].id), policy=policy.default)
    assert str(msg["Reply-To"]) == "hanako@visitor.test"
    assert str(msg["To"]) == "help@support.test"
    asked = siteverify.requests[-1]
    assert asked["sitekey"] == web_settings.hcaptcha_sitekey
    assert asked["remoteip"] == "127.0.0.1"
    assert asked["secret"] == siteverify.secret

    thanks = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "ありがとうございました" in thanks


def test_json_submission_answers_202_with_the_outbox_id(
    client: FlaskClient, outbox: Outbox
) -> None:
    response = client.post("/form", json=valid_form())
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued"
    assert [row.id for row in queued(outbox)] == [body["id"]]


def test_form_encoded_with_accept_json_answers_json(client: FlaskClient) -> None:
    response = client.post("/form", data=valid_form(), headers={"Accept": "application/json"})
    assert response.status_code == 202
    assert response.get_json()["status"] == "queued"


def test_multipart_submission_is_accepted(client: FlaskClient, outbox: Outbox) -> None:
    response = client.post("/form", data=valid_form(), content_type="multipart/form-data")
    assert response.status_code == 303
    assert len(queued(outbox)) == 1


def test_recipient_fields_in_the_request_are_ignored(client: FlaskClient, outbox: Outbox) -> None:
    extra = {
        "to": "victim@evil.test",
        "cc": "victim@evil.test",
        "bcc": "victim@evil.test",
        "recipient": "victim@evil.test",
    }
    assert client.post("/form", data={**valid_form(), **extra}).status_code == 303
    assert client.post("/form", json={**valid_form(), **extra}).status_code == 202
    for row in queued(outbox):
        assert row.recipient == "help@support.test"
        assert b"evil.test" not in raw_of(outbox, row.id)


def test_thanks_url_setting_redirects_there_and_is_allowed_by_form_action(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(RELAY_THANKS_URL="https://shop.example.test/thanks.html").test_client()
    embedded = client.post("/form?embed=1&lang=ja", data=valid_form())
    assert embedded.headers["Location"] == "/thanks?lang=ja&embed=1"
    response = client.post("/form", data=valid_form())
    assert response.status_code == 303
    assert response.headers["Location"] == "https://shop.example.test/thanks.html"
    assert (
        "form-action 'self' https://shop.example.test"
        in response.headers["Content-Security-Policy"]
    )


def test_dns_servfail_on_the_visitor_domain_does_not_reject(
    client: FlaskClient, outbox: Outbox, world_dns: DNSZoneServer
) -> None:
    world_dns.fail(["visitor.test"], how="servfail")
    response = client.post("/form", data=valid_form())
    assert response.status_code == 303
    assert len(queued(outbox)) == 1


def test_dns_timeout_on_the_visitor_domain_does_not_reject_and_is_bounded(
    client: FlaskClient, outbox: Outbox, world_dns: DNSZoneServer
) -> None:
    world_dns.fail(["visitor.test"], how="timeout")
    started = time.monotonic()
    response = client.post("/form", data=valid_form())
    assert response.status_code == 303
    assert time.monotonic() - started < 1.0 + 1.5  # RELAY_DNS_TIMEOUT=1, plus the rest
    assert len(queued(outbox)) == 1


def test_the_injected_resolver_answers_for_the_form(
    make_settings: Callable[..., Settings],
    web_settings: Settings,
    web_env: dict[str, str],
    outbox: Outbox,
    world_dns: DNSZoneServer,
) -> None:
    """create_app(resolver=...) is the seam: relay.mx's async resolver, aimed here at a server
    that says null MX for visitor.test, decides (the view asks through its blocking twin)."""
    with DNSZoneServer("visitor.test. 300 IN MX 0 .\n") as other:
        elsewhere = make_settings(**{**web_env, "RELAY_DNS_NAMESERVERS": other.address})
        app = create_app(web_settings, outbox=outbox, resolver=make_resolver(elsewhere))
        response = app.test_client().post("/form", data=valid_form())
        assert response.status_code == 422
        assert "does not accept mail" in text_of(response.get_data(as_text=True))
        assert other.queried("visitor.test", "MX") == 1
    assert world_dns.queried("visitor.test") == 0
    assert not queued(outbox)


def test_address_with_an_a_record_only_is_accepted(client: FlaskClient, outbox: Outbox) -> None:
    assert client.post("/form", data=valid_form(email="someone@example.test")).status_code == 303
    assert len(queued(outbox)) == 1


# --- field errors ---------------------------------------------------------------------------


def test_missing_fields_rerender_with_accessible_errors_and_kept_input(
    client: FlaskClient, outbox: Outbox
) -> None:
    response = client.post(
        "/form", data=valid_form(name="", subject="  ", message="Keep <this> text & more")
    )
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert 'id="error-summary"' in html
    assert 'role="alert"' in html
    assert '<a href="#name">' in html
    assert '<a href="#subject">' in html
    assert 'id="name-error"' in html
    name_input = re.search(r'<input id="name"[^>]*>', html, re.S)
    assert name_input is not None
    assert 'aria-invalid="true"' in name_input.group(0)
    assert 'aria-describedby="name-hint name-error"' in name_input.group(0)
    email_input = re.search(r'<input id="email"[^>]*>', html, re.S)
    assert email_input is not None
    assert 'value="hanako@visitor.test"' in email_input.group(0)
    assert "aria-invalid" not in email_input.group(0)
    assert "Keep &lt;this&gt; text &amp; more</textarea>" in html
    assert "Please enter your name." in html
    assert "Please enter a subject." in html
    assert queued(outbox) == []


def test_json_errors_are_keyed_by_field(client: FlaskClient, outbox: Outbox) -> None:
    response = client.post("/form", json={"email": "not an address", "message": "x"})
    assert response.status_code == 400
    errors = response.get_json()["errors"]
    # The missing CAPTCHA is reported in the same round as the fields.
    assert set(errors) == {"name", "email", "subject", "h-captcha-response"}
    assert errors["h-captcha-response"] == ["Please complete the CAPTCHA."]
    assert errors["email"] == ["Please enter a valid email address, like name@example.com."]
    assert queued(outbox) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "x" * 201, "Please use at most 200 characters."),
        ("subject", "s" * 201, "Please use at most 200 characters."),
        ("message", "m" * 20001, "Please use at most 20000 characters."),
        ("email", "a" * 250 + "@visitor.test", "Please use at most 254 characters."),
        ("name", "Eve\r\nBcc: victim@evil.test", "Please remove control characters"),
        ("subject", "Hi\x00there", "Please remove control characters"),
        ("subject", "Hi\u202ereversed", "Please remove control characters"),
        ("message", "bell \x07 in body", "Please remove control characters"),
        ("name", "lone \ud800 surrogate", "Please remove control characters"),
        ("subject", "isolate \u2066x\u2069", "Please remove control characters"),
        ("subject", "line\u2028separator", "Please remove control characters"),
        ("name", "tab\tname", "Please remove control characters"),
        ("message", "C1 \x85 control", "Please remove control characters"),
        ("message", "unassigned \U000e0fff", "Please remove control characters"),
        ("email", "hanako@visitor.test\r\nBcc: x@evil.test", "Please remove control characters"),
        ("email", "hanako@visitor.test, x@evil.test", "Please enter a valid email"),
        ("email", "hanako@", "Please enter a valid email"),
        ("email", '"a@evil.test"@visitor.test', "Please enter a valid email"),
        ("email", "someone@nxdomain.test", "does not accept mail"),
        ("email", "someone@nullmx.test", "does not accept mail"),
        ("email", "someone@noaddress.test", "does not accept mail"),
    ],
)
def test_field_is_rejected(
    client: FlaskClient, outbox: Outbox, field: str, value: str, message: str
) -> None:
    response = client.post("/form", json=valid_form(**{field: value}))
    assert response.status_code == 400
    errors = response.get_json()["errors"]
    assert list(errors) == [field]
    assert message in errors[field][0]
    assert queued(outbox) == []


@pytest.mark.parametrize(
    "name",
    ["Family 👨\u200d👩\u200d👧", "Soft\u00adhyphen", "نیما\u200cرضا", "髙橋 𠮷野"],
)
def test_joiners_and_rare_letters_are_accepted(
    client: FlaskClient, outbox: Outbox, name: str
) -> None:
    assert client.post("/form", json=valid_form(name=name)).status_code == 202
    assert len(queued(outbox)) == 1


def test_multiline_message_with_tabs_and_newlines_is_fine(
    client: FlaskClient, outbox: Outbox
) -> None:
    text = "Line one\r\n\tindented\nline three 日本語 👍🏽"
    assert client.post("/form", json=valid_form(message=text)).status_code == 202
    (row,) = queued(outbox)
    msg = message_from_bytes(raw_of(outbox, row.id), policy=policy.default)
    assert "\tindented\nline three 日本語 👍🏽" in msg.get_content().replace("\r\n", "\n")


def test_field_errors_in_japanese(client: FlaskClient) -> None:
    response = client.post(
        "/form?lang=ja",
        data=valid_form(name="", email="someone@", message=""),
        headers={"Accept-Language": "en"},
    )
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "お名前を入力してください。" in html
    assert "有効なメールアドレスを入力してください" in html
    assert "お問い合わせ内容を入力してください。" in html
    assert "次の項目を修正してください" in html

    # The domain is asked in DNS last (after the CAPTCHA), so its error comes on its own.
    domain = client.post("/form?lang=ja", data=valid_form(email="someone@nullmx.test"))
    assert domain.status_code == 422
    assert "このメールアドレスのドメインはメールを受信できません。" in domain.get_data(as_text=True)

    as_json = client.post("/form", json={}, headers={"Accept-Language": "ja"})
    assert as_json.get_json()["errors"]["email"] == ["メールアドレスを入力してください。"]


# --- CAPTCHA ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("fail", "The CAPTCHA check failed or expired"),
        ("host", "The CAPTCHA check failed or expired"),
        ("sitekey", "The CAPTCHA check failed or expired"),
        ("truthy", "The CAPTCHA check failed or expired"),
        ("slow", "We could not check the CAPTCHA just now"),
        ("error", "We could not check the CAPTCHA just now"),
        ("garbage", "We could not check the CAPTCHA just now"),
    ],
)
def test_captcha_outcomes_that_must_not_pass(
    client: FlaskClient, outbox: Outbox, kind: str, message: str
) -> None:
    response = client.post("/form", json=valid_form(**{"h-captcha-response": token(kind)}))
    assert response.status_code == 400
    errors = response.get_json()["errors"]
    assert list(errors) == ["h-captcha-response"]
    assert message in errors["h-captcha-response"][0]
    assert queued(outbox) == []


def test_missing_captcha_asks_to_complete_it(client: FlaskClient, outbox: Outbox) -> None:
    form = valid_form()
    del form["h-captcha-response"]
    response = client.post("/form?lang=ja", data=form)
    assert response.status_code == 422
    assert "CAPTCHA を完了してください。" in response.get_data(as_text=True)
    assert queued(outbox) == []


def test_a_token_is_good_once(client: FlaskClient, outbox: Outbox) -> None:
    reused = token()
    assert (
        client.post("/form", json=valid_form(**{"h-captcha-response": reused})).status_code == 202
    )
    again = client.post("/form", json=valid_form(**{"h-captcha-response": reused}))
    assert again.status_code == 400
    assert len(queued(outbox)) == 1


def test_field_errors_do_not_spend_the_captcha(
    client: FlaskClient, siteverify: SiteverifyStub
) -> None:
    client.post("/form", json=valid_form(name=""))
    assert siteverify.requests == []


def test_captcha_error_is_translated(client: FlaskClient) -> None:
    response = client.post(
        "/form?lang=ja", json=valid_form(**{"h-captcha-response": token("slow")})
    )
    assert response.get_json()["errors"]["h-captcha-response"] == [
        "現在 CAPTCHA を確認できません。もう一度お試しください。"
    ]


def test_verifier_seam_replaces_hcaptcha(web_settings: Settings, outbox: Outbox) -> None:
    seen: list[tuple[str, str | None, frozenset[str]]] = []

    class Offline:
        def verify(self, token: str, *, remoteip: str | None, hostnames: object) -> None:
            seen.append((token, remoteip, frozenset(hostnames)))  # type: ignore[arg-type]
            if token != "offline-ok":
                raise CaptchaError(["offline-refused"])

    app = create_app(web_settings, outbox=outbox, verifier=Offline())
    client = app.test_client()
    assert (
        client.post("/form", json=valid_form(**{"h-captcha-response": "nope"})).status_code == 400
    )
    assert (
        client.post("/form", json=valid_form(**{"h-captcha-response": "offline-ok"})).status_code
        == 202
    )
    assert seen[-1][0] == "offline-ok"
    assert {"localhost", "partner.test"} <= seen[-1][2]


def test_create_app_refuses_the_published_test_secret_in_production(
    web_settings: Settings, outbox: Outbox
) -> None:
    production = web_settings.model_copy(
        update={"env": "production", "hcaptcha_secret": SecretStr(HCAPTCHA_TEST_SECRET)}
    )
    with pytest.raises(ConfigError, match="RELAY_HCAPTCHA_SECRET"):
        create_app(production, outbox=outbox)
    test_sitekey = web_settings.model_copy(
        update={"env": "production", "hcaptcha_sitekey": HCAPTCHA_TEST_SITEKEY}
    )
    with pytest.raises(ConfigError, match="RELAY_HCAPTCHA_SITEKEY"):
        create_app(test_sitekey, outbox=outbox)
    no_keys = web_settings.model_copy(
        update={"env": "production", "hcaptcha_sitekey": None, "hcaptcha_secret": None}
    )
    with pytest.raises(ConfigError) as info:
        create_app(no_keys, outbox=outbox)
    assert len(info.value.problems) == 2
    # The same settings are fine for development, where the test keys are the default.
    create_app(no_keys.model_copy(update={"env": "development"}), outbox=outbox)


# --- honeypot ---------------------------------------------------------------------------------


def test_honeypot_looks_like_success_but_is_not_queued(
    client: FlaskClient,
    outbox: Outbox,
    siteverify: SiteverifyStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    html = client.post("/form", data=valid_form(website="http://spam.test"))
    assert html.status_code == 303
    assert html.headers["Location"] == "/thanks?lang=en"
    as_json = client.post("/form", json=valid_form(website="x"))
    assert as_json.status_code == 202
    assert as_json.get_json()["status"] == "queued"
    assert re.fullmatch(r"[a-z2-7]{16}", as_json.get_json()["id"])
    assert queued(outbox) == []
    assert siteverify.requests == []
    assert sum("form.honeypot" in r.getMessage() for r in caplog.records) == 2


# --- origins, CORS, headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": EVIL},
        {"Origin": "null"},
        {"Origin": "http://localhost.evil.test"},
        {"Referer": EVIL + "/page.html"},
        {"Referer": "not a url"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_posts_from_other_origins_are_refused(
    client: FlaskClient, outbox: Outbox, headers: dict[str, str]
) -> None:
    html = client.post("/form", data=valid_form(), headers=headers)
    assert html.status_code == 403
    assert "This form cannot be sent from this page." in html.get_data(as_text=True)
    as_json = client.post("/form", json=valid_form(), headers=headers)
    assert as_json.status_code == 403
    assert as_json.get_json()["errors"]["form"]
    assert queued(outbox) == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "http://localhost"},
        {"Origin": "http://localhost:80"},
        {"Referer": "http://localhost/form?embed=1"},
        {"Origin": PARTNER, "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-origin"},
    ],
)
def test_posts_from_allowed_origins_pass(
    client: FlaskClient, outbox: Outbox, headers: dict[str, str]
) -> None:
    assert client.post("/form", json=valid_form(), headers=headers).status_code == 202
    assert len(queued(outbox)) == 1


def test_public_url_origin_is_our_own(make_app: Callable[..., Flask], outbox: Outbox) -> None:
    client = make_app(RELAY_PUBLIC_URL="https://forms.shop.test/").test_client()
    response = client.post(
        "/form", json=valid_form(), headers={"Origin": "https://forms.shop.test"}
    )
    assert response.status_code == 202


def test_refused_origin_is_translated(client: FlaskClient) -> None:
    response = client.post("/form?lang=ja", data=valid_form(), headers={"Origin": EVIL})
    assert "このページからはフォームを送信できません。" in response.get_data(as_text=True)


def test_cors_preflight_and_response_for_an_allowed_origin(client: FlaskClient) -> None:
    preflight = client.options(
        "/form",
        headers={
            "Origin": PARTNER,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == PARTNER
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    assert "Origin" in preflight.headers["Vary"]

    response = client.post("/form", json=valid_form(), headers={"Origin": PARTNER})
    assert response.status_code == 202
    assert response.headers["Access-Control-Allow-Origin"] == PARTNER


def test_cors_preflight_from_an_unknown_origin_is_refused(client: FlaskClient) -> None:
    preflight = client.options(
        "/form", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 403
    assert "Access-Control-Allow-Origin" not in preflight.headers
    page = client.get("/form", headers={"Origin": EVIL})
    assert "Access-Control-Allow-Origin" not in page.headers


@pytest.mark.parametrize("path", ["/form", "/form?embed=1", "/thanks", "/healthz", "/nope"])
def test_security_headers_on_every_page(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    csp = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'self' http://localhost http://partner.test" in csp
    assert "https://js.hcaptcha.com" in csp
    assert "https://*.hcaptcha.com" in csp
    assert "object-src 'none'" in csp
    assert "'unsafe-inline'" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert "X-Frame-Options" not in response.headers
    assert "Strict-Transport-Security" not in response.headers
    assert "Set-Cookie" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    assert "Accept-Language" in response.headers["Vary"]


def test_script_nonce_matches_the_csp(client: FlaskClient) -> None:
    response = client.get("/form")
    nonce = re.search(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"])
    assert nonce is not None
    assert f'nonce="{nonce.group(1)}"' in response.get_data(as_text=True)
    other = client.get("/form").headers["Content-Security-Policy"]
    assert nonce.group(1) not in other


def test_hsts_only_behind_https(make_app: Callable[..., Flask]) -> None:
    client = make_app(RELAY_TRUSTED_PROXIES="1").test_client()
    assert "Strict-Transport-Security" not in client.get("/form").headers
    secure = client.get("/form", headers={"X-Forwarded-Proto": "https"})
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=")
    untrusted = make_app().test_client().get("/form", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" not in untrusted.headers


def test_embed_js_checks_origin_and_is_script(client: FlaskClient) -> None:
    response = client.get("/embed.js")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/javascript")
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert response.headers["Cache-Control"] == "public, max-age=300"
    js = response.get_data(as_text=True)
    assert "event.origin !== base.origin" in js
    assert "event.source !== frame.contentWindow" in js
    assert "formrelay:height" in js


# --- store failures and health --------------------------------------------------------------


@pytest.fixture
def dead_outbox() -> Outbox:
    """A real outbox whose PostgreSQL server refuses connections (port 1 on loopback)."""
    return Outbox("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")


def test_store_down_answers_503_with_retry_after_and_keeps_input(
    make_app: Callable[..., Flask], dead_outbox: Outbox
) -> None:
    client = make_app(outbox_=dead_outbox).test_client()
    response = client.post("/form?lang=ja", data=valid_form(subject="Keep me"))
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    html = response.get_data(as_text=True)
    assert "現在お問い合わせを受け付けられません" in html
    assert 'value="Keep me"' in html

    as_json = client.post("/form", json=valid_form())
    assert as_json.status_code == 503
    assert as_json.headers["Retry-After"]
    assert "try again" in as_json.get_json()["errors"]["form"][0]


def test_healthz(client: FlaskClient, make_app: Callable[..., Flask], dead_outbox: Outbox) -> None:
    ok = client.get("/healthz")
    assert ok.status_code == 200
    assert ok.get_json()["status"] == "ok"
    down = make_app(outbox_=dead_outbox).test_client().get("/healthz")
    assert down.status_code == 503
    assert down.get_json()["status"] == "unavailable"


# --- hostile bodies: never a 500 ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"name=%FF%FE&email=\xff\xfe@visitor.test", "application/x-www-form-urlencoded", 422),
        (b"\xff\xfe{not json", "application/json", 400),
        (b'{"name": "a"', "application/json", 400),
        (b"[1, 2, 3]", "application/json", 400),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json", 400),
        (b'"just a string"', "application/json", 400),
        (b"null", "application/json", 400),
        (b"", "application/json", 400),
        (b"", "application/x-www-form-urlencoded", 422),
        (b"garbage", "text/plain", 422),
        (b"--x\r\nbroken multipart", "multipart/form-data; boundary=x", 422),
        (b"name=a&name=b&" * 5 + b"email=e", "application/x-www-form-urlencoded", 422),
    ],
)
def test_malformed_bodies_get_a_4xx(
    client: FlaskClient, body: bytes, content_type: str, status: int
) -> None:
    response = client.post("/form", data=body, content_type=content_type)
    assert response.status_code == status


def test_invalid_utf8_is_a_field_error(client: FlaskClient) -> None:
    body = b"".join(
        b'--x\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k, v)
        for k, v in [(b"name", b"\xff\xfeabc"), (b"email", b"a@visitor.test")]
    )
    response = client.post(
        "/form",
        data=body + b"--x--\r\n",
        content_type="multipart/form-data; boundary=x",
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 400
    assert response.get_json()["errors"]["name"] == ["This contains characters we could not read."]


@pytest.mark.parametrize(
    "payload",
    [
        {"name": 5, "email": ["a@visitor.test"], "subject": {"x": 1}, "message": True},
        {"name": None, "email": 1.5, "subject": "s", "message": "m"},
    ],
)
def test_wrong_json_types_are_field_errors(client: FlaskClient, payload: dict[str, object]) -> None:
    response = client.post("/form", json=payload)
    assert response.status_code == 400
    errors = response.get_json()["errors"]
    assert errors["email"] == ["This must be text."]


def test_non_object_json_is_a_form_error(client: FlaskClient) -> None:
    response = client.post("/form", data="[]", content_type="application/json")
    assert response.get_json() == {"errors": {"form": ["The request must be a JSON object."]}}


@pytest.mark.parametrize("as_json", [False, True])
def test_huge_body_is_413_with_a_friendly_message(client: FlaskClient, as_json: bool) -> None:
    big = "x" * 2_000_000
    if as_json:
        response = client.post(
            "/form", data=json.dumps({"message": big}), content_type="application/json"
        )
        assert response.status_code == 413
        assert "too large" in response.get_json()["errors"]["form"][0]
    else:
        response = client.post("/form?lang=ja", data={"message": big})
        assert response.status_code == 413
        assert "送信内容が大きすぎます" in text_of(response.get_data(as_text=True))


def test_unknown_paths_and_methods_are_friendly(client: FlaskClient) -> None:
    missing = client.get("/wp-login.php?lang=ja")
    assert missing.status_code == 404
    assert "このアドレスにはページがありません。" in missing.get_data(as_text=True)
    wrong = client.delete("/form")
    assert wrong.status_code == 405
    assert client.post("/thanks").status_code == 405


def test_captcha_host_is_the_public_url_host_not_the_host_header(
    make_settings: Callable[..., Settings], web_env: dict[str, str], outbox: Outbox
) -> None:
    seen: list[set[str]] = []

    class Recording:
        def verify(self, token: str, *, remoteip: str | None, hostnames: object) -> None:
            seen.append(set(hostnames))  # type: ignore[call-overload]

    settings = make_settings(**web_env, RELAY_PUBLIC_URL="https://forms.shop.test")
    client = create_app(settings, outbox=outbox, verifier=Recording()).test_client()
    response = client.post("/form", json=valid_form(), headers={"Host": "attacker.test"})
    assert response.status_code == 202
    assert seen == [{"forms.shop.test", "localhost", "partner.test"}]


def test_an_unexpected_failure_is_a_friendly_500_without_details(
    web_settings: Settings, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def verify(self, token: str, *, remoteip: str | None, hostnames: object) -> None:
            raise RuntimeError("secret internals")

    client = create_app(web_settings, outbox=outbox, verifier=Broken()).test_client()
    html = client.post("/form?lang=ja", data=valid_form())
    assert html.status_code == 500
    page = html.get_data(as_text=True)
    assert "こちら側で問題が発生しました。もう一度お試しください。" in page
    assert "secret internals" not in page
    as_json = client.post("/form", json=valid_form())
    assert as_json.status_code == 500
    assert as_json.get_json() == {
        "errors": {"form": ["Something went wrong on our side. Please try again."]}
    }
    assert "web.error" in caplog.text
    assert queued(outbox) == []


def test_a_refused_captcha_costs_no_dns_query_and_no_store(
    client: FlaskClient, outbox: Outbox, world_dns: DNSZoneServer, siteverify: SiteverifyStub
) -> None:
    """The order of the accept pipeline: local checks, siteverify, then DNS. A bot's post with
    a bad token (a spam burst) is refused after one siteverify call, without a query."""
    asked, queries = len(siteverify.requests), world_dns.queried("visitor.test")
    response = client.post("/form", json=valid_form(**{"h-captcha-response": token("fail")}))
    assert response.status_code == 400
    assert "h-captcha-response" in response.get_json()["errors"]
    assert len(siteverify.requests) == asked + 1
    assert world_dns.queried("visitor.test") == queries
    assert queued(outbox) == []


def test_the_domain_is_asked_only_after_the_captcha_passed(
    client: FlaskClient, outbox: Outbox, world_dns: DNSZoneServer, siteverify: SiteverifyStub
) -> None:
    asked, queries = len(siteverify.requests), world_dns.queried("nullmx.test", "MX")
    # A typo in a field: neither siteverify nor DNS is asked.
    response = client.post("/form", json=valid_form(email="someone@nullmx.test", name=""))
    assert response.status_code == 400
    assert list(response.get_json()["errors"]) == ["name"]
    assert len(siteverify.requests) == asked
    assert world_dns.queried("nullmx.test", "MX") == queries
    # Valid otherwise: the CAPTCHA passes, then the domain is refused.
    response = client.post("/form", json=valid_form(email="someone@nullmx.test"))
    assert response.status_code == 400
    assert list(response.get_json()["errors"]) == ["email"]
    assert len(siteverify.requests) == asked + 1
    assert world_dns.queried("nullmx.test", "MX") == queries + 1
    assert queued(outbox) == []
