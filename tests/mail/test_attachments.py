"""A form's message: its fields listed with their labels, files as multipart/mixed with base64
parts and RFC 2231 names, every part's headers proved by parsing back, the bytes intact, and
the DKIM signature (dkimpy) covering them all."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable

import dkim
import pytest

from relay.errors import HeaderInjectionError, MessageError
from relay.mail.attachments import Attachment, filename_params, safe_filename, verify_parts
from relay.mail.message import Submission, build_message, check_lines
from relay.mail.signing import Signer
from relay.settings import Settings
from tests.mail.test_signing import DnsFunc, dnsfunc  # noqa: F401 - the fixture

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
PDF = b"%PDF-1.4\n" + b"\x00\xff binary \r\n--=_ not a boundary\r\n.\r\n" * 200 + b"%%EOF\n"


def bug_report(**changes: object) -> Submission:
    values: dict[str, object] = {
        "name": "Taro Yamada",
        "email": "taro@visitor.test",
        "subject": "[Bug] Crash on checkout (high)",
        "message": "",
        "recipient": "bugs@support.test",
        "site_name": "Example bugs",
        "form_id": "bugs",
        "fields": [
            ("概要", "Crash on checkout", False),
            ("What happened", "I pressed pay.\n\nFrom then on:\n.nothing", True),
            ("Severity", "high", False),
            ("Empty", "", False),
        ],
        "attachments": [
            Attachment("screen.png", "image/png", PNG),
            Attachment(
                safe_filename("C:\\Users\\taro\\請求書 2026年12月.pdf"), "application/pdf", PDF
            ),
        ],
        "metadata": {"client_ip": "127.0.0.1"},
    }
    values.update(changes)
    return Submission(**values)  # type: ignore[arg-type]


def test_the_fields_in_order_with_labels_and_the_files_parse_back_byte_for_byte(
    settings: Settings,
) -> None:
    built = build_message(bug_report(), settings)
    check_lines(built.raw)
    assert built.recipient == "bugs@support.test"
    msg = email.message_from_bytes(built.raw, policy=email.policy.default)
    assert str(msg["To"]) == "bugs@support.test"
    assert str(msg["From"]) == f"Taro Yamada via Example bugs <{settings.from_address}>"
    assert str(msg["Reply-To"]) == "taro@visitor.test"
    assert msg.get_content_type() == "multipart/mixed"
    text, png, pdf = msg.iter_parts()  # type: ignore[attr-defined]
    body = text.get_content().replace("\r\n", "\n")
    assert body.startswith(
        "概要: Crash on checkout\nWhat happened:\n    I pressed pay.\n\n    From then on:\n"
        "    .nothing\nSeverity: high\n\n"
    )
    assert "Empty" not in body
    assert 'Sent with the form "bugs" of Example bugs.' in body
    assert "Email: taro@visitor.test" in body
    assert "Attached: screen.png (image/png, 10 KB)" in body
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert png.get_filename() == "screen.png"
    assert png.get_content_type() == "image/png"
    assert png["Content-Transfer-Encoding"] == "base64"
    assert png.get_content() == PNG
    assert pdf.get_filename() == "請求書 2026年12月.pdf"
    assert pdf.get_content() == PDF
    assert b"filename*0*=utf-8''%E8%AB%8B" in built.raw  # RFC 2231, not an encoded word


def test_dkim_covers_the_whole_body(settings: Settings, dnsfunc: DnsFunc) -> None:  # noqa: F811
    built = build_message(bug_report(), settings)
    signed = Signer.from_settings(settings).sign(built.raw)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert b" l=" not in signed.split(b"\r\n\r\n", 1)[0]
    # One byte of a file changed: the body hash no longer matches.
    tampered = signed.replace(b"iVBORw0KGgo", b"iVBORw0KGgp", 1)
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Windows\\evil.pdf", "evil.pdf"),
        ("a\r\nBcc: x@evil.test\r\n.pdf", "aBcc: x@evil.test.pdf"),
        ("dir/a\r\nContent-Type: text/html", "html"),
        ("\u202eexe.pdf", "exe.pdf"),
        ("...hidden", "hidden"),
        ("", "attachment"),
        ("/", "attachment"),
        ("résumé.docx", "résumé.docx"),
        ("x" * 300 + ".pdf", "x" * 96 + ".pdf"),
    ],
)
def test_file_names_are_made_harmless(raw: str, safe: str) -> None:
    assert safe_filename(raw) == safe


@pytest.mark.parametrize(
    "name",
    [
        "report.pdf",
        'quote"and\\back.pdf',
        "=?utf-8?q?evil=0D=0A?=.pdf",
        "名前" * 40 + ".pdf",
        "%41%42.pdf",
        "a;b=c.pdf",
    ],
)
def test_every_name_survives_the_round_trip(settings: Settings, name: str) -> None:
    item = Attachment(safe_filename(name), "application/pdf", PDF)
    built = build_message(bug_report(attachments=[item]), settings)
    check_lines(built.raw)
    msg = email.message_from_bytes(built.raw, policy=email.policy.default)
    part = list(msg.iter_parts())[1]  # type: ignore[attr-defined]
    assert part.get_filename() == item.filename
    for line in built.raw.split(b"\r\n"):
        assert len(line) <= 78 or re.fullmatch(rb"[A-Za-z0-9+/=]{1,76}", line)


def test_long_names_use_rfc2231_continuations() -> None:
    value = filename_params("名前" * 40 + ".pdf")
    assert value.startswith("attachment;\r\n filename*0*=utf-8''%E5")
    assert "filename*1*=" in value
    assert all(len(line) <= 78 for line in value.split("\r\n"))


def test_a_tampered_part_is_refused(settings: Settings) -> None:
    sub = bug_report()
    built = build_message(sub, settings)
    mark = re.search(rb'boundary="([^"]+)"', built.raw)
    assert mark is not None
    boundary = mark.group(1).decode()
    text = email.message_from_bytes(built.raw, policy=email.policy.default)
    first = next(iter(text.iter_parts()))  # type: ignore[attr-defined]
    body = first.get_content().replace("\r\n", "\n").removesuffix("\n")  # type: ignore[attr-defined]
    verify_parts(built.raw, boundary, body, sub.attachments)
    injected = built.raw.replace(
        b"Content-Type: image/png\r\n", b"Content-Type: image/png\r\nBcc: x@evil.test\r\n", 1
    )
    with pytest.raises(HeaderInjectionError):
        verify_parts(injected, boundary, body, sub.attachments)
    renamed = built.raw.replace(b'filename="screen.png"', b'filename="screen.exe"', 1)
    with pytest.raises(HeaderInjectionError):
        verify_parts(renamed, boundary, body, sub.attachments)
    extra = built.raw.replace(
        f"--{boundary}--".encode(),
        f"--{boundary}\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n--{boundary}--".encode(),
    )
    with pytest.raises(MessageError):
        verify_parts(extra, boundary, body, sub.attachments)


def test_unsafe_names_and_types_are_not_built(settings: Settings) -> None:
    with pytest.raises(MessageError, match="not made safe"):
        build_message(
            bug_report(attachments=[Attachment("../x.pdf", "application/pdf", PDF)]), settings
        )
    with pytest.raises(MessageError, match="MIME type"):
        build_message(
            bug_report(attachments=[Attachment("x.pdf", "text/html\r\nX: y", PDF)]), settings
        )


def test_a_form_without_files_is_one_quoted_printable_text(
    make_settings: Callable[..., Settings],
) -> None:
    built = build_message(bug_report(attachments=[]), make_settings())
    msg = email.message_from_bytes(built.raw, policy=email.policy.default)
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_content().startswith("概要: Crash on checkout\r\n")
