"""Several forms on one relay, through the Flask test client: three forms (tests/formfiles.py)
on two sites to three support addresses beside the default one; every field type rendered,
validated and listed in the message; per-form origins, CSP, CORS and rate limits; files typed
from their bytes, the dangerous ones refused; limits; bodies that are not UTF-8."""

from __future__ import annotations

import email
import email.policy
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from relay.sandbox.captcha import SiteverifyStub
from relay.store.outbox import Outbox
from tests.formfiles import SITE_A, SITE_B, three_forms
from tests.web.conftest import queued, text_of, token, valid_form

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" + b"\x00\xff" * 500 + b"\n%%EOF\n"
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 200 + b"PE\x00\x00"


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")
    return buffer.getvalue()


@pytest.fixture
def forms_file(tmp_path: Path) -> Path:
    return three_forms(tmp_path)


@pytest.fixture
def app(make_app: Callable[..., Flask], forms_file: Path) -> Flask:
    return make_app(RELAY_FORMS_FILE=str(forms_file))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def bug(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "email": "taro@visitor.test",
        "name": "Taro Yamada",
        "summary": "Crash on checkout",
        "severity": "high",
        "areas": ["web", "mail"],
        "agree": "yes",
        "phone": "+81 3 1234 5678",
        "page": "https://shop-b.test/cart",
        "count": "3",
        "seen": "2026-12-01",
        "ticket": "AB-1234",
        "details": "I pressed pay.\nNothing happened.",
        "h-captcha-response": token(),
    }
    data.update(changes)
    return data


def with_files(data: dict[str, Any], *files: tuple[bytes, str]) -> dict[str, Any]:
    return {**data, "files": list(files)}


def multipart(data: dict[str, Any]) -> tuple[bytes, str]:
    """The body a browser sends (werkzeug's test client would spool a large one to a
    temporary file of its own that nobody closes when the app refuses it unread)."""
    mark = "----formrelay-test-boundary"
    parts = []
    for name, value in data.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, tuple):
                content, filename = item
                head = (
                    f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream"
                )
            else:
                content = str(item).encode()
                head = f'Content-Disposition: form-data; name="{name}"'
            parts.append(f"--{mark}\r\n{head}\r\n\r\n".encode() + content + b"\r\n")
    body = b"".join(parts) + f"--{mark}--\r\n".encode()
    return body, f"multipart/form-data; boundary={mark}"


def post_bug(client: FlaskClient, data: dict[str, Any], **headers: str) -> Any:
    body, content_type = multipart(data)
    return client.post(
        "/f/bugs?lang=en",
        data=body,
        content_type=content_type,
        headers={"Origin": SITE_B, **headers},
    )


def raw_of(outbox: Outbox, outbox_id: str) -> bytes:
    body = outbox.show(outbox_id).body
    assert body is not None
    return bytes(body)


# --- pages ------------------------------------------------------------------------------------


def test_each_form_renders_its_own_fields_in_the_page_language(client: FlaskClient) -> None:
    sales = client.get("/f/sales?lang=en").get_data(as_text=True)
    assert "<h1>Talk to sales</h1>" in sales
    assert '<label for="email">Your email</label>' in sales
    assert '<select id="plan" name="plan"' in sales
    assert '<option value="Business">Business</option>' in sales
    assert 'action="/f/sales?lang=en"' in sales
    assert "multipart/form-data" not in sales
    assert 'name="website"' in sales  # the honeypot
    assert "data-sitekey=" in sales
    bugs = client.get("/f/bugs?lang=ja").get_data(as_text=True)
    assert "概要" in bugs
    assert "一行で。" in bugs
    assert 'enctype="multipart/form-data"' in bugs
    for html in (
        '<input id="phone" name="phone" type="tel" autocomplete="tel"',
        '<input id="page" name="page" type="url" autocomplete="url"',
        '<input id="count" name="count" type="text" inputmode="decimal"',
        '<input id="seen" name="seen" type="date"',
        '<input id="severity" name="severity" type="radio" value="low"',
        '<input id="severity-1" name="severity" type="radio" value="high"',
        '<input id="areas" name="areas" type="checkbox" value="web"',
        '<input id="agree" name="agree" type="checkbox" value="yes" required',
        '<textarea id="details" name="details" rows="8" required',
        '<input id="files" name="files" type="file" multiple accept="application/msword,',
        'data-max-file-bytes="400000"',
        '<ul class="file-list" id="files-list" aria-live="polite" hidden></ul>',
        "(任意)",
        "3 個まで、1 ファイル 400 kB まで、合計 600 kB まで添付できます。",
    ):
        assert html in bugs, html
    assert "All fields are required." not in bugs
    assert 'src="/static/files.js"' in bugs
    embedded = client.get("/f/careers?embed=1").get_data(as_text=True)
    assert "<header" not in embedded
    assert 'action="/f/careers?lang=en&amp;embed=1"' in embedded
    assert "<h1>Contact us</h1>" in embedded


def test_the_default_form_is_unchanged_beside_them(client: FlaskClient, outbox: Outbox) -> None:
    html = client.get("/form").get_data(as_text=True)
    for field in ("name", "email", "subject", "message"):
        assert f'<label for="{field}">' in html
    assert "All fields are required." in html
    assert client.post("/form", data=valid_form()).headers["Location"] == "/thanks?lang=en"
    (row,) = queued(outbox)
    assert row.form_id == "default"
    assert row.recipient == "help@support.test"


def test_an_unknown_form_is_the_404_page(client: FlaskClient) -> None:
    for response in (
        client.get("/f/nosuch"),
        client.post("/f/nosuch", data={"email": "a@visitor.test"}),
        client.get("/f/nosuch/thanks"),
        client.get("/f/Bad!"),
    ):
        assert response.status_code == 404
        assert "There is no page at this address." in text_of(response.get_data(as_text=True))
    assert client.post("/f/nosuch", json={}).get_json() == {
        "errors": {"form": ["There is no page at this address."]}
    }


# --- origins, framing, CORS -------------------------------------------------------------------


def test_frame_ancestors_and_cors_are_the_forms_own(client: FlaskClient) -> None:
    sales = client.get("/f/sales").headers["Content-Security-Policy"]
    assert f"frame-ancestors 'self' {SITE_A}" in sales
    assert SITE_B not in sales
    assert f"form-action 'self' {SITE_A}" in sales  # its thank-you page
    bugs = client.get("/f/bugs").headers["Content-Security-Policy"]
    assert f"frame-ancestors 'self' {SITE_B}" in bugs
    default = client.get("/form").headers["Content-Security-Policy"]
    assert "frame-ancestors 'self' http://localhost http://partner.test" in default
    ok = client.options("/f/bugs", headers={"Origin": SITE_B})
    assert ok.status_code == 204
    assert ok.headers["Access-Control-Allow-Origin"] == SITE_B
    assert client.options("/f/bugs", headers={"Origin": SITE_A}).status_code == 403
    assert client.options("/f/sales", headers={"Origin": SITE_A}).status_code == 204


def test_the_origin_check_is_per_form(client: FlaskClient, outbox: Outbox) -> None:
    sales = {"email": "hanako@visitor.test", "subject": "Quote", "h-captcha-response": token()}
    wrong = client.post("/f/sales", data=sales, headers={"Origin": SITE_B})
    assert wrong.status_code == 403
    right = client.post(
        "/f/sales", json={**sales, "h-captcha-response": token()}, headers={"Origin": SITE_A}
    )
    assert right.status_code == 202
    assert right.headers["Access-Control-Allow-Origin"] == SITE_A
    assert [r.form_id for r in queued(outbox)] == ["sales"]


# --- a submission of every field type ---------------------------------------------------------


def test_every_field_type_and_two_files_reach_the_bugs_address(
    client: FlaskClient, outbox: Outbox, siteverify: SiteverifyStub
) -> None:
    response = post_bug(
        client, with_files(bug(), (PNG, "screen.png"), (PDF, "../../etc/請求書.pdf"))
    )
    assert response.status_code == 303, text_of(response.get_data(as_text=True))
    assert response.headers["Location"] == "/f/bugs/thanks?lang=en"
    thanks = client.get(response.headers["Location"]).get_data(as_text=True)
    assert 'href="/f/bugs?lang=en"' in thanks
    assert siteverify.requests[-1]["remoteip"] == "127.0.0.1"
    (row,) = queued(outbox)
    assert (row.form_id, row.recipient, row.visitor) == (
        "bugs",
        "bugs@support.test",
        "taro@visitor.test",
    )
    assert row.subject == "[Bug] Crash on checkout (high)"
    msg = email.message_from_bytes(raw_of(outbox, row.id), policy=email.policy.default)
    assert str(msg["To"]) == "bugs@support.test"
    assert str(msg["Reply-To"]) == "taro@visitor.test"
    text, png, pdf = msg.iter_parts()  # type: ignore[attr-defined]
    body = text.get_content().replace("\r\n", "\n")
    # The form's language is Japanese: its labels in the message, in its order.
    expected = (
        "概要: Crash on checkout\n重要度: high\n場所: web, mail\n連絡を受けてもよい: yes\n"
        "電話番号: +81 3 1234 5678\nページ: https://shop-b.test/cart\n回数: 3\n"
        "発生日: 2026-12-01\nチケット: AB-1234\n内容:\n    I pressed pay.\n    Nothing happened.\n"
    )
    assert body.startswith(expected), body
    assert "Name: Taro Yamada" in body
    assert "Email: taro@visitor.test" in body
    assert (png.get_filename(), png.get_content_type(), png.get_content()) == (
        "screen.png",
        "image/png",
        PNG,
    )
    assert (pdf.get_filename(), pdf.get_content()) == ("請求書.pdf", PDF)


def test_json_submission_to_a_form_with_a_checkbox_group(
    client: FlaskClient, outbox: Outbox
) -> None:
    response = client.post("/f/bugs", json=bug(), headers={"Origin": SITE_B})
    assert response.status_code == 202, response.get_json()
    (row,) = queued(outbox)
    msg = email.message_from_bytes(raw_of(outbox, row.id), policy=email.policy.default)
    assert "場所: web, mail" in msg.get_content()


def test_sales_redirects_to_its_thank_you_page_but_not_inside_the_frame(
    client: FlaskClient,
) -> None:
    data = {"email": "a@visitor.test", "subject": "Quote", "plan": "Business"}
    page = client.post(
        "/f/sales", data={**data, "h-captcha-response": token()}, headers={"Origin": SITE_A}
    )
    assert page.headers["Location"] == f"{SITE_A}/thanks"
    framed = client.post(
        "/f/sales?embed=1&lang=ja",
        data={**data, "h-captcha-response": token()},
        headers={"Origin": SITE_A},
    )
    assert framed.headers["Location"] == "/f/sales/thanks?lang=ja&embed=1"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"phone": "call me"}, "phone", "Please enter a phone number"),
        ({"page": "ftp://x.test/"}, "page", "Please enter a web address starting with https://."),
        ({"count": "4x"}, "count", "Please enter a number"),
        ({"seen": "2026-13-01"}, "seen", "Please enter a date"),
        ({"ticket": "ab-1"}, "ticket", "Please use the format shown."),
        ({"severity": "medium"}, "severity", "Please choose one of the options."),
        ({"severity": ""}, "severity", "Please choose one of the options."),
        ({"areas": ["web", "desktop"]}, "areas", "Please choose one of the options."),
        ({"agree": ""}, "agree", "Please tick this box."),
        ({"summary": "x" * 201}, "summary", "Please use at most 200 characters."),
        ({"summary": "a\u202eb"}, "summary", "Please remove control characters"),
        ({"details": " "}, "details", "Please fill in this field."),
        ({"email": ""}, "email", "Please enter your email address."),
        ({"email": "a@nullmx.test"}, "email", "does not accept mail"),
        ({"h-captcha-response": ""}, "h-captcha-response", "Please complete the CAPTCHA."),
    ],
)
def test_each_field_type_has_its_error(
    client: FlaskClient, outbox: Outbox, changes: dict[str, Any], field: str, message: str
) -> None:
    response = client.post("/f/bugs", json=bug(**changes), headers={"Origin": SITE_B})
    assert response.status_code == 400
    errors = response.get_json()["errors"]
    assert message in " ".join(errors[field]), errors
    assert queued(outbox) == []


def test_errors_on_the_page_are_linked_and_input_is_kept(client: FlaskClient) -> None:
    response = post_bug(client, bug(phone="call me", agree=""))
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert 'id="error-summary"' in html
    assert '<a href="#phone">Phone: Please enter a phone number, like +81 3 1234 5678.</a>' in html
    assert '<a href="#agree">I may be contacted: Please tick this box.</a>' in html
    assert 'aria-describedby="phone-hint phone-error"' in html
    assert 'value="call me"' in html
    assert 'value="Crash on checkout"' in html
    assert 'value="web" checked' in html
    assert 'value="high" checked' in html


def test_the_honeypot_and_the_hold_rules_apply_to_every_form(
    make_app: Callable[..., Flask], forms_file: Path, tmp_path: Path, outbox: Outbox
) -> None:
    rules = tmp_path / "hold.toml"
    rules.write_text('[words]\nsubject = ["casino"]\nmessage = ["lottery"]\n')
    client = make_app(
        RELAY_FORMS_FILE=str(forms_file), RELAY_HOLD_RULES_FILE=str(rules)
    ).test_client()
    trap = client.post("/f/bugs", json=bug(website="http://spam.test"), headers={"Origin": SITE_B})
    assert trap.status_code == 202
    assert queued(outbox) == []
    subject = client.post("/f/bugs", json=bug(summary="Casino offer"), headers={"Origin": SITE_B})
    body = client.post(
        "/f/bugs", json=bug(details="You won the lottery"), headers={"Origin": SITE_B}
    )
    assert subject.status_code == body.status_code == 202
    held = {r.id: r.held_by for r in queued(outbox)}
    assert held == {
        subject.get_json()["id"]: "words.subject: casino",
        body.get_json()["id"]: "words.message: lottery",
    }


def test_a_forms_own_rate_limit_counts_apart(
    make_app: Callable[..., Flask], tmp_path: Path, outbox: Outbox
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(
        "[forms.tiny]\nsupport_address = 'tiny@support.test'\nrate_limit = '1/minute'\n"
        "[[forms.tiny.fields]]\nname = 'email'\ntype = 'email'\nrequired = true\nlabel = 'E'\n"
    )
    client = make_app(RELAY_FORMS_FILE=str(path)).test_client()
    first = client.post("/f/tiny", json={"email": "a@visitor.test", "h-captcha-response": token()})
    assert first.status_code == 202
    again = client.post("/f/tiny", json={"email": "a@visitor.test", "h-captcha-response": token()})
    assert again.status_code == 429
    assert 1 <= int(again.headers["Retry-After"]) <= 60
    assert client.post("/form", json=valid_form()).status_code == 202
    assert sorted(r.form_id for r in queued(outbox)) == ["default", "tiny"]


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (EXE, "invoice.pdf", "invoice.pdf is a program, a script or a web page"),
        (EXE, "setup.exe", "setup.exe is a program"),
        (b"<!DOCTYPE html><script>alert(1)</script>", "notes.txt", "is a program, a script"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script/></svg>', "logo.png", "a web page"),
        (b"#!/bin/sh\nrm -rf /\n", "readme.txt", "a script"),
        (b"echo hi\r\n", "run.bat", "run.bat is a program"),
        (zip_bytes(), "photos.zip", "photos.zip is an archive"),
        (b"\x00\x01\x02\x03" * 50, "data.bin", "We cannot tell what kind of file data.bin is."),
        (b"", "empty.txt", "empty.txt is empty."),
    ],
)
def test_dangerous_or_unknown_files_are_refused_with_a_field_error(
    client: FlaskClient, outbox: Outbox, content: bytes, name: str, message: str
) -> None:
    response = post_bug(client, with_files(bug(), (content, name)), Accept="application/json")
    assert response.status_code == 400
    assert message in " ".join(response.get_json()["errors"]["files"])
    assert queued(outbox) == []


def test_a_file_is_typed_by_its_bytes_not_its_name(client: FlaskClient, outbox: Outbox) -> None:
    response = post_bug(
        client, with_files(bug(), (PNG, "photo.txt"), (b"plain notes\n", "notes.log"))
    )
    assert response.status_code == 303
    (row,) = queued(outbox)
    msg = email.message_from_bytes(raw_of(outbox, row.id), policy=email.policy.default)
    parts = list(msg.iter_parts())[1:]  # type: ignore[attr-defined]
    assert [(p.get_filename(), p.get_content_type()) for p in parts] == [
        ("photo.txt.png", "image/png"),
        ("notes.log", "text/plain"),
    ]


def test_a_form_allow_list_narrows_the_kinds(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    path = tmp_path / "pdf.toml"
    path.write_text(
        "[forms.pdf]\nsupport_address = 'pdf@support.test'\n"
        "attachments = { allowed = ['pdf'] }\n"
        "[[forms.pdf.fields]]\nname = 'email'\ntype = 'email'\nrequired = true\nlabel = 'E'\n"
        "[[forms.pdf.fields]]\nname = 'doc'\ntype = 'file'\nrequired = true\nlabel = 'Doc'\n"
    )
    client = make_app(RELAY_FORMS_FILE=str(path)).test_client()

    def send(*files: tuple[bytes, str]) -> Any:
        body, content_type = multipart(
            {"email": "a@visitor.test", "h-captcha-response": token(), "doc": list(files)}
        )
        return client.post(
            "/f/pdf", data=body, content_type=content_type, headers={"Accept": "application/json"}
        )

    assert send().get_json()["errors"]["doc"] == ["Please attach a file."]
    refused = send((PNG, "a.png")).get_json()["errors"]["doc"]
    assert refused == ["This form does not accept files like a.png."]
    assert send((PDF, "a.pdf")).status_code == 202


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([500_000], "is too large (500 kB); each file may be at most 400 kB."),
        ([250_000] * 3, "These files are too large together (750 kB); the limit is 600 kB."),
        ([1000] * 4, "Please attach at most 3 files."),
    ],
)
def test_file_limits_are_field_errors(
    client: FlaskClient, outbox: Outbox, sizes: list[int], message: str
) -> None:
    files = [(PNG + b"\x00" * (size - len(PNG)), f"shot{n}.png") for n, size in enumerate(sizes)]
    response = post_bug(client, with_files(bug(), *files), Accept="application/json")
    assert response.status_code == 400
    assert any(message in m for m in response.get_json()["errors"]["files"])
    assert queued(outbox) == []


def test_a_body_over_the_forms_cap_is_413_saying_so(client: FlaskClient, app: Flask) -> None:
    big = with_files(bug(), (PNG + b"\x00" * 1_500_000, "huge.png"))
    page = post_bug(client, big)
    assert page.status_code == 413
    assert "the files may be at most 600 kB together" in text_of(page.get_data(as_text=True))
    as_json = post_bug(
        client,
        with_files(bug(), (PNG + b"\x00" * 1_500_000, "huge.png")),
        Accept="application/json",
    )
    assert as_json.status_code == 413
    assert "600 kB" in as_json.get_json()["errors"]["form"][0]
    # The default form's cap is unchanged: the same body to /form is refused sooner.
    small = client.post("/form", data={"message": "x" * 400_000})
    assert small.status_code == 413


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        (b"name=%FF%FEabc&email=a%40visitor.test", "application/x-www-form-urlencoded", "name"),
        (b"subject=caf\xe9&email=a%40visitor.test", "application/x-www-form-urlencoded", "subject"),
        (b'{"message": "caf\xe9", "email": "a@visitor.test"}', "application/json", "message"),
        (b'{"name": "ok", "subject": "\xed\xa0\x80"}', "application/json", "subject"),
    ],
)
def test_text_that_is_not_utf8_is_an_error_on_its_field(
    client: FlaskClient, body: bytes, content_type: str, field: str
) -> None:
    response = client.post(
        "/form", data=body, content_type=content_type, headers={"Accept": "application/json"}
    )
    assert response.status_code == 400
    errors = response.get_json()["errors"]
    assert errors[field] == ["This contains characters we could not read."], errors


def test_utf8_form_bodies_still_read_as_before(client: FlaskClient, outbox: Outbox) -> None:
    body = (
        "name=%E5%B1%B1%E7%94%B0&email=a%40visitor.test&subject=Caf%C3%A9+au+lait&message=ok+%2B+1"
    )
    response = client.post(
        "/form",
        data=body + "&h-captcha-response=" + token(),
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 303
    (row,) = queued(outbox)
    assert row.subject == "Café au lait"
    assert json.dumps(row.meta)  # stored


def test_files_that_cannot_be_stored_are_a_clear_error_and_nothing_is_accepted(
    make_app: Callable[..., Flask], forms_file: Path, outbox: Outbox
) -> None:
    """The files are inside the message, one row: a store that cannot commit it is a 503
    (the visitor is told to try again), never a message accepted without its files."""
    dead = Outbox("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    try:
        client = make_app(outbox_=dead, RELAY_FORMS_FILE=str(forms_file)).test_client()
        response = post_bug(client, with_files(bug(), (PNG, "screen.png")))
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) > 0
        html = response.get_data(as_text=True)
        assert "We could not accept your message just now" in html
        assert 'value="Crash on checkout"' in html
    finally:
        dead.dispose()
    assert queued(outbox) == []
