"""The message builder: exact headers, readable non-ASCII, a 7-bit body, no header injection."""

from __future__ import annotations

import email.policy
import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from relay.errors import HeaderInjectionError, MessageError
from relay.mail import message as message_module
from relay.mail import qp
from relay.mail.message import (
    EMAIL_MAX,
    HEADER_SET,
    MESSAGE_MAX,
    NAME_MAX,
    NO_SUBJECT,
    SUBJECT_MAX,
    BuiltMessage,
    Submission,
    build_message,
    build_notice,
    check_lines,
    header_text,
    make_message_id,
    sanitize_text,
    verify_message,
)
from relay.settings import Settings

NOW = datetime(2026, 11, 28, 12, 30, 5, tzinfo=UTC)
CVE_2024_6923 = "=?utf-8?q?hi=0D=0ABcc:_x@evil.test?="


@pytest.fixture
def cfg(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


def submission(**overrides: object) -> Submission:
    values: dict[str, object] = {
        "name": "Jane Doe",
        "email": "jane@visitor.test",
        "subject": "Where is my order?",
        "message": "Hello,\nmy parcel has not arrived.\n\nJane",
        "metadata": {"page_url": "https://shop.test/contact", "client_ip": "203.0.113.7"},
    }
    values.update(overrides)
    return Submission(**values)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def body_of(raw: bytes) -> str:
    content = parse(raw).get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def assert_wire_clean(raw: bytes) -> None:
    """7-bit, CRLF only, lines <= 998, exactly HEADER_SET in order."""
    assert raw.isascii()
    assert raw.endswith(b"\r\n")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert list(parse(raw).keys()) == list(HEADER_SET)


# --- the message as built -----------------------------------------------------------------


def test_header_set_order_and_values(cfg: Settings) -> None:
    built = build_message(submission(), cfg, now=NOW)
    assert_wire_clean(built.raw)
    header_block = built.raw.split(b"\r\n\r\n", 1)[0].decode()
    names = [line.split(":", 1)[0] for line in header_block.split("\r\n") if line[0] != " "]
    assert names == list(HEADER_SET)
    msg = parse(built.raw)
    (sender,) = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == (
        "Jane Doe via Example Shop",
        cfg.from_address,
    )
    assert [a.addr_spec for a in msg["To"].addresses] == ["help@support.test"]
    assert [(a.display_name, a.addr_spec) for a in msg["Reply-To"].addresses] == [
        ("", "jane@visitor.test")
    ]
    assert str(msg["Subject"]) == "Where is my order?"
    assert msg["Date"].datetime == NOW
    assert str(msg["MIME-Version"]) == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert str(msg["Content-Transfer-Encoding"]) == "quoted-printable"
    assert "Auto-Submitted" not in msg
    assert built == BuiltMessage(
        message_id=built.message_id,
        raw=built.raw,
        recipient="help@support.test",
        envelope_from=cfg.envelope_sender,
        subject="Where is my order?",
        reply_to="jane@visitor.test",
    )


def test_from_name_falls_back_to_site_name(cfg: Settings) -> None:
    msg = parse(build_message(submission(name=" \u200b "), cfg, now=NOW).raw)
    assert msg["From"].addresses[0].display_name == "Example Shop"


def test_japanese_name_and_subject_are_encoded_and_decode_back(cfg: Settings) -> None:
    built = build_message(
        submission(name="山田 太郎", subject="お問い合わせ：配送について（至急）"), cfg, now=NOW
    )
    assert_wire_clean(built.raw)
    assert b"=?utf-8?" in built.raw
    msg = parse(built.raw)
    assert msg["From"].addresses[0].display_name == "山田 太郎 via Example Shop"
    assert str(msg["Subject"]) == "お問い合わせ：配送について（至急）"
    assert "山田 太郎" in body_of(built.raw)


@pytest.mark.parametrize(
    "name",
    [
        'Doe, Jane "JD" (Sales)',
        "O'Brien <boss>",
        "back\\slash; semi: colon",
        "Lösch, Martin",
        '山田, "太郎" (営業)',
        "é" * 190,
        "x" * 300,
        "Bcc: victim@evil.test",
    ],
)
def test_display_names_with_specials_round_trip(cfg: Settings, name: str) -> None:
    built = build_message(submission(name=name), cfg, now=NOW)
    assert_wire_clean(built.raw)
    (sender,) = parse(built.raw)["From"].addresses
    expected = sanitize_text(name, max_length=NAME_MAX, multiline=False) + " via Example Shop"
    assert "".join(sender.display_name.split()) == "".join(expected.split())
    assert sender.addr_spec == cfg.from_address


def test_body_is_quoted_printable_and_repeats_visitor_and_metadata(cfg: Settings) -> None:
    sub = submission(
        message="Grüße!\nこんにちは\n" + "long " * 100,
        metadata={"page_url": "https://shop.test/contact?x=1", "language": "de", "ua": "Firefox"},
    )
    built = build_message(sub, cfg, now=NOW)
    assert_wire_clean(built.raw)
    wire_body = built.raw.split(b"\r\n\r\n", 1)[1]
    assert all(len(line) <= 76 for line in wire_body.split(b"\r\n"))
    assert b"=C3=BC" in wire_body  # ü
    text = body_of(built.raw)
    assert text.startswith("Grüße!\nこんにちは\nlong long")
    for line in [
        "Name: Jane Doe",
        "Email: jane@visitor.test",
        "page_url: https://shop.test/contact?x=1",
        "language: de",
        "ua: Firefox",
    ]:
        assert line in text.splitlines()


def test_lone_dot_and_from_lines_survive_and_are_encoded(cfg: Settings) -> None:
    built = build_message(submission(message="one\n.\nFrom me\n..\ntwo"), cfg, now=NOW)
    wire_lines = built.raw.split(b"\r\n")
    assert b"." not in wire_lines
    assert not any(line.startswith((b".", b"From ")) for line in wire_lines[len(HEADER_SET) :])
    assert body_of(built.raw).startswith("one\n.\nFrom me\n..\ntwo\n")


def test_message_id_is_ours_unique_and_stable_when_passed(cfg: Settings) -> None:
    first = build_message(submission(), cfg, now=NOW)
    second = build_message(submission(), cfg, now=NOW)
    assert re.fullmatch(r"<[0-9a-f]{32}@relay\.test>", first.message_id)
    assert first.message_id != second.message_id
    again = build_message(submission(), cfg, now=NOW, message_id=first.message_id)
    assert again.message_id == first.message_id
    assert again.raw == first.raw
    assert str(parse(again.raw)["Message-ID"]) == first.message_id
    assert make_message_id(cfg).endswith("@relay.test>")


@pytest.mark.parametrize(
    "bad_id", ["no-brackets@relay.test", "<a@b>\r\nBcc: x@evil.test", "<@relay.test>", "<a b@c>"]
)
def test_unusable_message_id_is_refused(cfg: Settings, bad_id: str) -> None:
    with pytest.raises(MessageError):
        build_message(submission(), cfg, now=NOW, message_id=bad_id)


def test_date_comes_from_submission_then_now(cfg: Settings) -> None:
    tokyo = timezone(timedelta(hours=9))
    at = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=tokyo)
    msg = parse(build_message(submission(submitted_at=at), cfg, now=NOW).raw)
    assert msg["Date"].datetime == at.replace(microsecond=0)
    assert str(msg["Date"]).endswith("+0000")
    assert parse(build_message(submission(), cfg, now=NOW).raw)["Date"].datetime == NOW
    with pytest.raises(MessageError):
        build_message(submission(submitted_at=datetime(2026, 1, 1)), cfg)


def test_lengths_are_capped(cfg: Settings) -> None:
    built = build_message(
        submission(name="n" * 5000, subject="s" * 5000, message="m" * 50000), cfg, now=NOW
    )
    assert_wire_clean(built.raw)
    msg = parse(built.raw)
    assert str(msg["Subject"]) == "s" * SUBJECT_MAX
    assert built.subject == "s" * SUBJECT_MAX
    assert msg["From"].addresses[0].display_name == "n" * NAME_MAX + " via Example Shop"
    assert body_of(built.raw).startswith("m" * MESSAGE_MAX + "\n\n")
    assert "m" * (MESSAGE_MAX + 1) not in body_of(built.raw)


def test_limits_for_forms() -> None:
    assert (NAME_MAX, SUBJECT_MAX, EMAIL_MAX, MESSAGE_MAX) == (200, 200, 254, 20000)


def test_empty_subject_gets_a_placeholder(cfg: Settings) -> None:
    assert str(parse(build_message(submission(subject="\r\n"), cfg, now=NOW).raw)["Subject"]) == (
        NO_SUBJECT
    )


def test_idn_visitor_domain_goes_out_as_punycode(cfg: Settings) -> None:
    built = build_message(submission(email="kunde@bücher.test"), cfg, now=NOW)
    assert parse(built.raw)["Reply-To"].addresses[0].addr_spec == "kunde@xn--bcher-kva.test"


@pytest.mark.parametrize(
    "address",
    [
        '"a@evil.test"@good.test',  # CVE-2023-27043
        "Eve <eve@evil.test>",
        "eve@evil.test, bob@evil.test",
        "eve@evil.test (comment)",
        "eve@[127.0.0.1]",
        "eve@evil.test\r\nBcc: x@evil.test",
        "eve@evil.test\nBcc: x@evil.test",
        " eve@evil.test",
        "",
        "no-at-sign",
        "ü@evil.test",
        "a=?utf-8?q?x?=@evil.test",
        "eve@localhost",
        "a" * 250 + "@evil.test",
        "eve@-evil.test",
    ],
)
def test_visitor_address_must_be_one_plain_addr_spec(cfg: Settings, address: str) -> None:
    with pytest.raises(MessageError):
        build_message(submission(email=address), cfg, now=NOW)


# --- sanitize_text ------------------------------------------------------------------------


def test_sanitize_single_line() -> None:
    dirty = "  a\r\nb\rc\nd\u2028e\u2029f\x85g\x00h\x1bi\u202ej\u2066k\u200bl\ufeffm\tn  "
    assert sanitize_text(dirty, max_length=100, multiline=False) == "a b c d e f ghijklm n"


def test_sanitize_multiline_keeps_lines_and_tabs() -> None:
    dirty = "one\r\ntwo\rthree\u2028four\x00\x07\tfive\u202e \n\n"
    assert sanitize_text(dirty, max_length=100, multiline=True) == "one\ntwo\nthree\nfour\tfive"


def test_sanitize_caps_after_cleaning() -> None:
    assert sanitize_text("\x00" * 10 + "abcdef", max_length=3, multiline=False) == "abc"
    assert sanitize_text("\ud800x", max_length=3, multiline=False) == "x"  # lone surrogate


def test_sanitize_keeps_text_newer_than_this_pythons_unicode_tables() -> None:
    shaking_face = "\U0001fae8"  # Unicode 15; unassigned for Python 3.11's unicodedata
    assert sanitize_text(f"hi {shaking_face}", max_length=10, multiline=False).endswith(
        shaking_face
    )
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ sequence, kept in the body
    assert sanitize_text(family, max_length=10, multiline=True) == family


def test_sanitize_drops_exactly_controls_surrogates_bidi_and_zero_width() -> None:
    """Over every code point: Cc (but newline and tab in the message) and Cs go, bidi
    controls go, zero-width characters go from single-line text only; nothing else."""
    bidi = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    zero_width = set("\u200b\u200c\u200d\u2060\ufeff\u180e\u200e\u200f\u061c")
    every = "".join(chr(cp) for cp in range(0x110000))
    control = {ch for ch in every if unicodedata.category(ch) in ("Cc", "Cs")}
    assert set(message_module._DROP_SINGLE.findall(every)) == control | bidi | zero_width
    assert set(message_module._DROP_MULTI.findall(every)) == (control - {"\n", "\t"}) | bidi
    for ch in ("\x00", "\x7f", "\x9f", "\ud800", "\u202e", "\u200b"):
        assert sanitize_text(f"a{ch}b", max_length=10, multiline=False) == "ab"


def test_header_text_breaks_encoded_words() -> None:
    cleaned = header_text(CVE_2024_6923 + " and = ?x?q?y?=", 200)
    assert "=?" not in cleaned
    assert "= ?" not in cleaned
    assert cleaned.startswith("=\uff1futf-8?q?hi=0D=0ABcc:_x@evil.test?=")


# --- injection corpus ----------------------------------------------------------------------

PAYLOADS = [
    "x\r\nBcc: victim@evil.test",
    "x\nBcc: victim@evil.test",
    "x\rBcc: victim@evil.test",
    "x\r\n\r\nbody takeover",
    CVE_2024_6923,
    "=?utf-8?b?aGkNCkJjYzogeEBldmlsLnRlc3Q=?=",  # base64 "hi\r\nBcc: x@evil.test"
    "=?utf-8?q?=0A?= Bcc: x@evil.test",
    "=?iso-8859-1?q?a=0D=0AX-Injected:_1?= tail",
    "nul\x00byte",
    "line\u2028sep\u2029para",
    "\u202egnp.exe\u202c bidi",
    "\u2066isolate\u2069",
    "Bcc: victim@evil.test",
    'Quote" <evil@evil.test>, "Other',
    "comma, separated, <angle@brackets.test>",
    "\x85next line\x0bvt\x0cff",
    "=?" * 50,
    "a" * 5000,
]
FIELDS = ["name", "subject", "message", "metadata_value", "metadata_key"]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("field", FIELDS)
def test_injection_corpus(cfg: Settings, field: str, payload: str) -> None:
    if field == "metadata_value":
        sub = submission(metadata={"page_url": payload})
    elif field == "metadata_key":
        sub = submission(metadata={payload: "value"})
    else:
        sub = submission(**{field: payload})
    built = build_message(sub, cfg, now=NOW)
    assert_wire_clean(built.raw)
    msg = parse(built.raw)
    assert not msg.defects
    assert [a.addr_spec for a in msg["To"].addresses] == ["help@support.test"]
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["jane@visitor.test"]
    assert [a.addr_spec for a in msg["From"].addresses] == [cfg.from_address]
    for header in HEADER_SET:
        assert all(ch not in str(msg[header]) for ch in "\r\n\x00\u2028\u202e")
    if field == "subject":
        assert len(str(msg["Subject"])) <= SUBJECT_MAX


def test_stdlib_alone_would_inject_and_the_parse_back_check_catches_it() -> None:
    """CVE-2024-6923 on this Python: why we sanitise and why we parse back."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = Address(display_name=CVE_2024_6923, addr_spec="form@relay.test")
    msg["To"] = "help@support.test"
    raw = msg.as_bytes()
    injected = "Bcc" in parse(raw)
    with pytest.raises(HeaderInjectionError) as caught:
        verify_message(
            raw,
            {"From": (CVE_2024_6923, "form@relay.test")},
            subject="",
            message_id="<a@relay.test>",
            date=NOW,
            body="",
        )
    if injected:  # Python < 3.11.10 / 3.12.5
        assert "Bcc" in caught.value.found
    assert caught.value.expected == list(HEADER_SET)


def _verify_as_built(raw: bytes, cfg: Settings, message_id: str, **changes: str) -> None:
    """verify_message with what build_message meant for submission(), as it calls it."""
    meant = {
        "subject": "Where is my order?",
        "body": body_of(build_message(submission(), cfg, now=NOW).raw).removesuffix("\n"),
        **changes,
    }
    verify_message(
        raw,
        {
            "From": ("Jane Doe via Example Shop", cfg.from_address),
            "To": ("", "help@support.test"),
            "Reply-To": ("", "jane@visitor.test"),
        },
        subject=meant["subject"],
        message_id=message_id,
        date=NOW,
        body=meant["body"],
    )


def _swap(raw: bytes, old: str, new: str) -> bytes:
    assert old.encode() in raw
    return raw.replace(old.encode(), new.encode(), 1)


def test_parse_back_compares_every_header_and_the_body(cfg: Settings) -> None:
    """The parse-back check reads only the header block and decodes a header only when its
    wire text differs from what was meant: each kind of change is still caught."""
    built = build_message(submission(), cfg, now=NOW)
    mid = built.message_id
    _verify_as_built(built.raw, cfg, mid)
    # The same text as an encoded word decodes to what was meant: accepted, as before.
    _verify_as_built(
        _swap(
            built.raw, "Subject: Where is my order?", "Subject: =?utf-8?q?Where_is_my_order=3F?="
        ),
        cfg,
        mid,
    )
    changed = [
        ("Subject: Where is my order?", "Subject: =?utf-8?q?Where_is_my_order=21?="),
        ("Subject: Where is my order?", "Subject: Where is my order!"),
        ("Reply-To: jane@visitor.test", "Reply-To: =?utf-8?q?x?= <jane@visitor.test>"),
        ("Reply-To: jane@visitor.test", "Reply-To: jane@visitor.test, x@evil.test"),
        ("To: help@support.test", "To: help@support.test (comment"),
        ("Jane Doe via Example Shop", "=?utf-8?q?Jane_Doe_via_Example_Shop=0D=0ABcc:_x@e.test?="),
        ("MIME-Version: 1.0", "MIME-Version: 1.1"),
        ("Message-ID: <", "Message-ID: <x"),
        ("Date: Sat, 28 Nov 2026 12:30:05 +0000", "Date: Sat, 28 Nov 2026 12:30:06 +0000"),
        ('charset="utf-8"', 'charset="us-ascii"'),
        ("text/plain", "text/html"),
        ("Content-Transfer-Encoding: quoted-printable", "Content-Transfer-Encoding: 7bit"),
        ("Hello,", "Hallo,"),
    ]
    for old, new in changed:
        with pytest.raises(MessageError):
            _verify_as_built(_swap(built.raw, old, new), cfg, mid)
    with pytest.raises(HeaderInjectionError):
        _verify_as_built(
            _swap(built.raw, "MIME-Version", "Bcc: x@evil.test\r\nMIME-Version"), cfg, mid
        )
    with pytest.raises(HeaderInjectionError):
        _verify_as_built(_swap(built.raw, "\r\n\r\n", "\r\nBcc: x@evil.test\r\n\r\n"), cfg, mid)


@pytest.mark.parametrize(
    "address",
    [
        "help@support.test",
        "a.b+c@x-y.example.test",
        "o'brien@visitor.test",
        "{w}!#$%&*=^`|~@d.test",
    ],
)
def test_a_bare_address_decodes_to_itself(address: str) -> None:
    """What lets the parse-back skip decoding To and Reply-To when the wire text is the
    address: the email package reads such an address back unchanged and without defects."""
    (decoded,) = parse(f"To: {address}\r\n\r\n".encode())["To"].addresses
    assert (decoded.display_name, decoded.addr_spec) == ("", address)
    assert not parse(f"To: {address}\r\n\r\n".encode())["To"].defects


def test_an_address_that_is_an_encoded_word_is_decoded_and_refused() -> None:
    """An atom that looks like an encoded word is decoded by the parser, so it is never
    taken as its own wire text."""
    address = "=?utf-8?q?a?=@support.test"
    raw = (
        "From: Shop <form@relay.test>\r\n"
        f"To: {address}\r\n"
        "Reply-To: jane@visitor.test\r\n"
        "Subject: s\r\n"
        "Date: Sat, 28 Nov 2026 12:30:05 +0000\r\n"
        "Message-ID: <a@relay.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\nb\r\n"
    ).encode()

    def check(wire: bytes, to: str) -> None:
        verify_message(
            wire,
            {
                "From": ("Shop", "form@relay.test"),
                "To": ("", to),
                "Reply-To": ("", "jane@visitor.test"),
            },
            subject="s",
            message_id="<a@relay.test>",
            date=NOW,
            body="b",
        )

    check(raw.replace(address.encode(), b"help@support.test"), "help@support.test")
    with pytest.raises(HeaderInjectionError):
        check(raw, address)


def test_check_lines_rejects_bad_wire_forms() -> None:
    for raw in [b"A: b\nc\r\n", b"A: b\r\n\xc3\xa9\r\n", b"A: " + b"x" * 999 + b"\r\n", b"A: b"]:
        with pytest.raises(MessageError):
            check_lines(raw)


# --- properties ----------------------------------------------------------------------------

any_text = st.text(max_size=400)
hostile_text = st.lists(
    st.sampled_from(
        [
            *'=?"\\,()<>@:;. \t\r\nFrom.Bcc_qQbB\u3042\u00e9\u2028\x00\x85\u202e\u200b',
            *["=?utf-8?q?", "?=", "=0D=0A", "=?utf-8?b?DQo=?=", "\r\n.\r\n", "Bcc: x@evil.test"],
        ]
    ),
    max_size=150,
).map("".join)
field_text = st.one_of(any_text, hostile_text)


# `cfg` is function-scoped but immutable, so sharing it between examples is safe.
@hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    name=field_text,
    subject=field_text,
    message=st.one_of(st.text(max_size=3000), hostile_text),
    metadata=st.dictionaries(field_text, field_text, max_size=4),
    email_address=st.one_of(st.emails(), st.text(max_size=40)),
)
def test_any_input_gives_a_clean_message_or_message_error(
    cfg: Settings,
    name: str,
    subject: str,
    message: str,
    metadata: dict[str, str],
    email_address: str,
) -> None:
    sub = Submission(name, email_address, subject, message, metadata)
    try:
        built = build_message(sub, cfg, now=NOW)
    except MessageError:
        return
    assert_wire_clean(built.raw)
    msg = parse(built.raw)
    (reply_to,) = msg["Reply-To"].addresses
    assert reply_to.display_name == ""
    assert reply_to.username == email_address.rpartition("@")[0]
    assert [a.addr_spec for a in msg["To"].addresses] == [cfg.support_address]
    expected_body = sanitize_text(message, max_length=MESSAGE_MAX, multiline=True)
    assert body_of(built.raw).startswith(expected_body + "\n\n")


# --- the wire writer is the email package's generator, minus the message object -------------


def _generator_bytes(headers: list[tuple[str, object]], payload: str) -> bytes:
    """What the builder wrote before it skipped EmailMessage: the reference for _wire."""
    msg = EmailMessage(policy=message_module._POLICY)
    for name, value in headers:
        msg[name] = value
    msg.set_payload(payload)
    return msg.as_bytes(policy=message_module._POLICY)


@hsettings(max_examples=200, deadline=None)
@given(
    name=st.text(max_size=200),
    subject=st.text(max_size=300),
    local=st.from_regex(r"[a-z0-9.+_-]{1,40}", fullmatch=True),
    body=st.text(max_size=500),
)
def test_wire_writer_is_byte_identical_to_the_generator(
    name: str, subject: str, local: str, body: str
) -> None:
    try:  # values that Address itself refuses reach neither writer
        sender = Address(display_name=name, addr_spec="noreply@relay.test")
        visitor = Address(addr_spec=f"{local}@visitor.test")
    except (ValueError, TypeError, IndexError):
        return
    headers: list[tuple[str, object]] = [
        ("From", sender),
        ("To", Address(addr_spec="support@support.test")),
        ("Reply-To", visitor),
        ("Subject", subject),
        ("Date", "Sat, 28 Nov 2026 12:30:05 +0000"),
        ("Message-ID", "<abc.123@relay.test>"),
        ("MIME-Version", "1.0"),
        ("Content-Type", 'text/plain; charset="utf-8"'),
        ("Content-Transfer-Encoding", "quoted-printable"),
    ]
    payload = qp.encode(body)
    try:
        expected = _generator_bytes(headers, payload)
    except (ValueError, TypeError, IndexError) as exc:
        with pytest.raises(type(exc)):
            message_module._folded([message_module._header(n, v) for n, v in headers])
        return
    head = message_module._folded([message_module._header(n, v) for n, v in headers])
    assert message_module._wire(head, payload) == expected
    _assert_plain_head_matches(name, f"{local}@visitor.test", subject, head)


def _plain_head_for(name: str, reply_to: str, subject: str) -> bytes | None:
    return message_module._plain_head(
        name,
        "noreply@relay.test",
        "support@support.test",
        reply_to,
        subject,
        "Sat, 28 Nov 2026 12:30:05 +0000",
        "<abc.123@relay.test>",
    )


def _assert_plain_head_matches(name: str, reply_to: str, subject: str, folded: bytes) -> None:
    """Where the direct writer applies, it writes exactly the email package's bytes."""
    plain = _plain_head_for(name, reply_to, subject)
    if plain is not None:
        assert folded.startswith(plain), (plain, folded)
        assert folded[len(plain) :].startswith(b"MIME-Version: 1.0\r\n")


# Printable ASCII words with one space between (what the direct writer takes), or any
# printable ASCII (leading, trailing and double spaces: what it declines).
_ASCII_WORDS = st.one_of(
    st.lists(st.from_regex(r"[!-~]{1,12}", fullmatch=True), max_size=6).map(" ".join),
    st.from_regex(r"[ -~]{0,70}", fullmatch=True),
)
_LOCAL = st.from_regex(r"[a-z0-9]{1,30}", fullmatch=True)


@hsettings(max_examples=300, deadline=None)
@given(name=_ASCII_WORDS, subject=_ASCII_WORDS, local=_LOCAL)
def test_the_direct_header_writer_is_byte_identical_to_the_email_package(
    name: str, subject: str, local: str
) -> None:
    """Printable ASCII (names with specials, quotes, backslashes, several spaces; subjects up
    to the folding length): the cases the direct writer takes or declines."""
    try:
        headers = [
            message_module._header(
                "From", Address(display_name=name, addr_spec="noreply@relay.test")
            ),
            message_module._header("To", Address(addr_spec="support@support.test")),
            message_module._header("Reply-To", Address(addr_spec=f"{local}@visitor.test")),
            message_module._header("Subject", subject),
            message_module._header("Date", "Sat, 28 Nov 2026 12:30:05 +0000"),
            message_module._header("Message-ID", "<abc.123@relay.test>"),
        ]
    except (ValueError, TypeError, IndexError):
        return
    head = message_module._folded(headers) + message_module._MIME_WIRE
    _assert_plain_head_matches(name, f"{local}@visitor.test", subject, head)


def test_the_direct_header_writer_takes_the_common_case() -> None:
    plain = _plain_head_for(
        "Hanako Yamada via Example Inc.", "hanako@visitor.test", "Order 1234 has not arrived"
    )
    assert plain is not None
    assert plain.startswith(b'From: "Hanako Yamada via Example Inc." <noreply@relay.test>\r\n')
    for declined in ("Grüße", "=?utf-8?q?x?=", "x" * 80, "two  spaces"):
        assert _plain_head_for("Hanako", "hanako@visitor.test", declined) is None


def test_a_notice_to_the_operator_is_ours_through_and_through(cfg: Settings) -> None:
    """An alert mail: From and Reply-To our address, To the operator's, the header set
    checked like a submission's, hostile text in the subject made harmless."""
    notice = build_notice(
        cfg,
        to="ops@support.test",
        subject="[formrelay] 2 failed\r\nBcc: x@evil.test =?utf-8?q?x?=",
        text="Line one\nLine two",
    )
    parsed = email.message_from_bytes(notice.raw, policy=email.policy.default)
    assert list(parsed.keys()) == list(HEADER_SET)
    assert parsed["To"] == "ops@support.test"
    assert parsed["Reply-To"] == cfg.from_address
    assert cfg.from_address in parsed["From"]
    assert "Bcc" not in parsed
    assert "\n" not in str(parsed["Subject"])
    assert parsed.get_content().replace("\r\n", "\n") == "Line one\nLine two\n"
    assert (notice.recipient, notice.reply_to) == ("ops@support.test", "")
    check_lines(notice.raw)


def test_a_name_the_header_parser_trips_on_is_a_message_error(settings: Settings) -> None:
    """Python 3.11's email parser raised AttributeError reading back this display name (a
    500 for the visitor); now it is refused like any other unprovable header."""
    with pytest.raises(MessageError):
        build_message(
            Submission(name="." + "0" * 58, email="0@A.ao", subject="", message=""), settings
        )
