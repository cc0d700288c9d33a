"""Turn a form submission into one safe RFC 5322 message (pure: no I/O, no clock unless asked).

The message is ours, not the visitor's: From is our own DKIM-aligned address with the
visitor's name as display name, To is the configured support address, and the visitor's
address only goes in Reply-To (and, because some hops strip Reply-To, in the body).

Header injection is made impossible twice over. First, every user-supplied text is sanitised
(control characters, line and paragraph separators, bidi overrides and zero-width characters
removed; ``=?`` broken up so that no text of ours can be read back as an RFC 2047 encoded word,
which Python 3.11.7 would decode into a raw CR/LF: CVE-2024-6923). Second, the finished bytes
are parsed back and must yield exactly HEADER_SET with exactly the values we meant, or the
build fails with HeaderInjectionError.
"""

from __future__ import annotations

import email.policy
import functools
import quopri
import re
import unicodedata
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from types import MappingProxyType

from email_validator import EmailNotValidError, validate_email

from relay.errors import HeaderInjectionError, MessageError
from relay.mail.attachments import Attachment, boundary, multipart_body, verify_parts
from relay.mail.qp import encode as qp_encode
from relay.settings import Settings

# Limits shared with forms.py: a value longer than this is cut, never refused by the builder.
NAME_MAX = 200
SUBJECT_MAX = 200
EMAIL_MAX = 254
MESSAGE_MAX = 20000
METADATA_KEY_MAX = 64
METADATA_VALUE_MAX = 2000
METADATA_MAX_ITEMS = 50

# RFC 5322 §2.1.1: a line MUST be no more than 998 characters, excluding the CRLF.
MAX_LINE = 998

HEADER_SET: tuple[str, ...] = (
    "From",
    "To",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)

NO_SUBJECT = "(no subject)"


class _Registry(HeaderRegistry):
    """HeaderRegistry that builds each header class once: the stock one calls type() for every
    header it makes (about 60 µs each, a third of build_message). Same classes, same parsing."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


_REGISTRY = _Registry()
# The default policy with CRLF line endings, folding at 78.
_POLICY = email.policy.SMTP.clone(header_factory=_REGISTRY)
# The header block is split by compat32: its raw items are what email.policy.default's
# would be (the same feedparser and header_source_parse), without a header object made for
# Content-Type at every parse (a third of verify_message); each header we compare is then
# decoded by the default policy's classes (_decoded).
_SPLIT_POLICY = email.policy.compat32
_CONTENT_TYPE = 'text/plain; charset="utf-8"'
_MIME_HEADERS = tuple(
    _POLICY.header_store_parse(name, value)[1]
    for name, value in (
        ("MIME-Version", "1.0"),
        ("Content-Type", _CONTENT_TYPE),
        ("Content-Transfer-Encoding", "quoted-printable"),
    )
)
_MIME_WIRE = b"".join(_POLICY.fold_binary(header.name, header) for header in _MIME_HEADERS)
# The email package folds a header line longer than this (RFC 5322 §2.1.1's SHOULD).
_FOLD_AT = 78
# email.policy splits on these (not str.splitlines) when it unfolds a header for parsing.
_LINE_SEPARATORS = re.compile(r"\r|\n")

# Everything str.splitlines() treats as a line break.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e\u200e\u200f\u061c")
_LINE_BREAK_RE = re.compile("\r\n|[" + _LINE_BREAKS + "]")
_SPACES_RE = re.compile(r"\s+")
_ENCODED_WORD_START = re.compile(r"=(\s*)\?")

_MESSAGE_ID_RE = re.compile(
    r"^<[A-Za-z0-9][A-Za-z0-9._+-]{0,127}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})>$"
)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_RE = re.compile(rf"^{_ATEXT}(?:\.{_ATEXT})*$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# Words of atoms, or of any printable ASCII, with one space between (see _plain_phrase).
_BARE_PHRASE = re.compile(rf"{_ATEXT}(?: {_ATEXT})*")
_PLAIN_WORDS = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")


@dataclass(frozen=True)
class Submission:
    """What the visitor sent, plus metadata our own code collected (page URL, IP...)."""

    name: str
    email: str
    subject: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    submitted_at: datetime | None = None  # aware; None = now
    # A form of RELAY_FORMS_FILE: its address and name, and its fields as (label, value,
    # multiline) in the form's order, listed in the body in place of `message`.
    recipient: str | None = None  # None: settings.support_address
    site_name: str | None = None  # None: settings.site_name
    form_id: str | None = None  # None: the default form
    fields: Sequence[tuple[str, str, bool]] = ()
    attachments: Sequence[Attachment] = ()


@dataclass(frozen=True)
class BuiltMessage:
    message_id: str  # "<...@from-domain>", angle brackets included
    raw: bytes  # unsigned, CRLF line endings, 7-bit
    recipient: str  # settings.support_address, never from the request
    envelope_from: str  # settings.envelope_sender
    subject: str  # the subject as sent, for the log
    reply_to: str = ""  # the visitor's address, for the operator's search; "" for a notice


# What sanitize_text removes, as one character class each (replacing a per-character
# unicodedata.category() loop): every Cc control (C0, DEL, C1) but newline and tab in multiline
# text, lone surrogates (they cannot be encoded), bidi embeddings, overrides and isolates, and
# in single-line text zero-width characters. Unassigned ("Cn") code points stay: this Python's
# Unicode tables predate the newest emoji, and visitors' text must not silently shrink.
_DROP_SINGLE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\ud800-\udfff" + "".join(sorted(_BIDI | _ZERO_WIDTH)) + "]"
)
_DROP_MULTI = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff" + "".join(sorted(_BIDI)) + "]"
)


def sanitize_text(value: str, *, max_length: int, multiline: bool) -> str:
    """Make visitor text safe to display and to put in a message, then cut it to max_length.

    Single-line: every line break becomes a space, whitespace runs collapse to one space, and
    control, bidi-override and zero-width characters are removed. Multiline: line breaks of
    every kind become "\\n", tabs stay, other control and bidi-override characters go.
    """
    text = unicodedata.normalize("NFC", value)
    text = _LINE_BREAK_RE.sub("\n" if multiline else " ", text)
    if not multiline:
        text = text.replace("\t", " ")
    text = (_DROP_MULTI if multiline else _DROP_SINGLE).sub("", text)
    if multiline:
        lines = [line.rstrip() for line in text.split("\n")]
        text = "\n".join(lines).strip("\n")
    else:
        text = _SPACES_RE.sub(" ", text).strip()
    if len(text) > max_length:
        text = text[:max_length].rstrip()
    return text


def header_text(value: str, max_length: int) -> str:
    """sanitize_text for a header value, in which no RFC 2047 encoded word can start.

    "=?" (also "= ?", which a careless unfolder could join) gets a fullwidth question mark:
    still readable, and our text can no longer be decoded into something else.
    """
    text = sanitize_text(value, max_length=max_length, multiline=False)
    return _ENCODED_WORD_START.sub("=\\1\uff1f", text)


def make_message_id(settings: Settings) -> str:
    """A new, globally unique Message-ID in our From domain: fix it once per submission."""
    return f"<{uuid.uuid4().hex}@{settings.from_domain}>"


def _plain_address(address: str) -> bool:
    """local@domain with a dot-atom local part and LDH labels: nothing to quote or decode."""
    local, _, domain = address.rpartition("@")
    labels = domain.split(".")
    return bool(
        _LOCAL_RE.match(local)
        and len(local) <= 64
        and len(address) <= EMAIL_MAX
        and len(labels) >= 2
        and all(_LABEL_RE.match(label) for label in labels)
    )


def _visitor_address(value: str) -> str:
    """The one plain addr-spec in `value`, in ASCII (IDNA domain), or MessageError.

    Quoted local parts, display names, comments, address literals and non-ASCII local
    parts are refused, which also rules out parser confusion such as
    '"a@evil.test"@good.test' (CVE-2023-27043).
    """
    if not value or len(value) > EMAIL_MAX or value != value.strip() or "=?" in value:
        raise MessageError(f"visitor address is not usable: {value!r}")
    try:
        # Syntax only: deliverability is checked by the caller (forms, mx), so .test is fine.
        checked = validate_email(
            value, check_deliverability=False, allow_smtputf8=False, test_environment=True
        )
    except EmailNotValidError as exc:
        raise MessageError(f"visitor address is not valid: {value!r} ({exc})") from exc
    address = checked.ascii_email or ""
    if not _plain_address(address):
        raise MessageError(f"visitor address is not a plain addr-spec: {value!r}")
    return address


def _fields_text(fields: Sequence[tuple[str, str, bool]]) -> str:
    """A form's fields in its order, "Label: value"; a multi-line value on the lines below
    its label, indented, so no line of it can pass for another field."""
    lines: list[str] = []
    for label, value, multiline in fields:
        name = sanitize_text(label, max_length=METADATA_KEY_MAX * 4, multiline=False)
        text = sanitize_text(value, max_length=MESSAGE_MAX, multiline=multiline)
        if not text:
            continue
        if multiline:
            lines.append(f"{name}:")
            lines.extend(f"    {line}" if line else "" for line in text.split("\n"))
        else:
            lines.append(f"{name}: {text}")
    return "\n".join(lines)


def _size(count: int) -> str:
    return f"{count} bytes" if count < 1024 else f"{count / 1024:.0f} KB"


def _body(sub: Submission, name: str, email_address: str, site_name: str) -> str:
    if sub.form_id is None:
        message = sanitize_text(sub.message, max_length=MESSAGE_MAX, multiline=True)
        sent = f"Sent with the contact form of {site_name}."
    else:
        message = _fields_text(sub.fields)
        sent = f'Sent with the form "{sub.form_id}" of {site_name}.'
    details = [sent, f"Name: {name}", f"Email: {email_address}"] if name else [sent]
    if not name:
        details.append(f"Email: {email_address}")
    for item in sub.attachments:
        details.append(f"Attached: {item.filename} ({item.content_type}, {_size(len(item.data))})")
    for key, value in list(sub.metadata.items())[:METADATA_MAX_ITEMS]:
        label = sanitize_text(str(key), max_length=METADATA_KEY_MAX, multiline=False)
        text = sanitize_text(str(value), max_length=METADATA_VALUE_MAX, multiline=False)
        if label:
            details.append(f"{label}: {text}")
    return message + "\n\n" + "-" * 40 + "\n" + "\n".join(details)


def _header(name: str, value: object) -> BaseHeader:
    """The header object EmailMessage would store for msg[name] = value (ValueError on a
    value with a line break)."""
    return _POLICY.header_store_parse(name, value)[1]  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=16)
def _to_header(support_address: str) -> BaseHeader:
    """To is the same for every message: made once (header objects are not changed by
    folding)."""
    return _header("To", Address(addr_spec=support_address))


def _folded(headers: Sequence[BaseHeader]) -> bytes:
    """The bytes EmailMessage.as_bytes(policy=_POLICY) writes for these headers, without the
    message object and generator around them: each header folded by its own class."""
    return b"".join(_POLICY.fold_binary(header.name, header) for header in headers)


def _wire(head: bytes, payload: str | bytes) -> bytes:
    """The header block, a blank line, the 7-bit payload with CRLF line ends (a multipart
    body comes as bytes, with its own)."""
    if isinstance(payload, bytes):
        return head + b"\r\n" + payload
    return head + b"\r\n" + payload.replace("\n", "\r\n").encode("ascii")


def _plain_phrase(display_name: str) -> str | None:
    """The display name as the email package writes it when it is printable ASCII words
    with single spaces between: bare when every word is an atom, else one quoted string
    (backslash before " and \\); None for anything else (encoded words, folding)."""
    if _BARE_PHRASE.fullmatch(display_name):
        return display_name
    if _PLAIN_WORDS.fullmatch(display_name):
        return '"' + display_name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return None


def _plain_head(  # noqa: PLR0917 - the seven values of the header block
    display_name: str,
    from_address: str,
    recipient: str,
    reply_to: str,
    subject: str,
    date_text: str,
    message_id: str,
) -> bytes | None:
    """The address and text headers written directly, when every value is plain: ASCII that
    needs no encoded word, no quoting beyond a quoted string and no folding (the common
    case), at a tenth of the email package's CPU; None: the email package writes them.
    Byte for byte what the email package writes (tests/mail/test_message.py compares the
    two), and verify_message parses the result back either way."""
    phrase = _plain_phrase(display_name)
    if (
        phrase is None
        or "=?" in display_name
        or "=?" in subject
        or not _PLAIN_WORDS.fullmatch(subject)
        or not (_plain_address(from_address) and _plain_address(recipient))
        or not _plain_address(reply_to)
    ):
        return None
    lines = (
        f"From: {phrase} <{from_address}>",
        f"To: {recipient}",
        f"Reply-To: {reply_to}",
        f"Subject: {subject}",
        f"Date: {date_text}",
        f"Message-ID: {message_id}",
    )
    if any(len(line) > _FOLD_AT for line in lines):
        return None
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _mime(
    files: Sequence[Attachment], body: str
) -> tuple[tuple[BaseHeader, ...], str | bytes, str]:
    """The MIME headers and the payload: one quoted-printable text, or multipart/mixed with
    the files (and its boundary, "" for text)."""
    if not files:
        return _MIME_HEADERS, qp_encode(body), ""
    mark = boundary()
    headers = (
        _MIME_HEADERS[0],
        _header("Content-Type", f'multipart/mixed; boundary="{mark}"'),
        _header("Content-Transfer-Encoding", "7bit"),
    )
    return headers, multipart_body(qp_encode(body), files, mark), mark


def _when(sub: Submission, now: datetime | None) -> datetime:
    moment = sub.submitted_at or now or datetime.now(UTC)
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise MessageError("submitted_at/now must be timezone-aware")
    return moment.astimezone(UTC).replace(microsecond=0)


def build_message(
    sub: Submission,
    settings: Settings,
    *,
    message_id: str | None = None,
    now: datetime | None = None,
) -> BuiltMessage:
    """Build the unsigned message; raises MessageError (HeaderInjectionError on a mismatch)."""
    reply_to = _visitor_address(sub.email)
    recipient = sub.recipient or settings.support_address
    name = header_text(sub.name, NAME_MAX)
    subject = header_text(sub.subject, SUBJECT_MAX) or NO_SUBJECT
    site = sub.site_name or settings.site_name
    site_name = header_text(site, NAME_MAX) or settings.from_domain
    display_name = f"{name} via {site_name}" if name else site_name
    message_id = message_id or make_message_id(settings)
    if not _MESSAGE_ID_RE.match(message_id):
        raise MessageError(f"not a usable Message-ID: {message_id!r}")
    moment = _when(sub, now)
    body = _body(
        sub,
        sanitize_text(sub.name, max_length=NAME_MAX, multiline=False),
        reply_to,
        sanitize_text(site, max_length=NAME_MAX, multiline=False),
    )

    try:
        mime, payload, mark = _mime(sub.attachments, body)
        date_text = format_datetime(moment)
        head = _plain_head(
            display_name, settings.from_address, recipient, reply_to, subject, date_text, message_id
        )
        if head is None:
            head = _folded(
                [
                    _header(
                        "From", Address(display_name=display_name, addr_spec=settings.from_address)
                    ),
                    _to_header(recipient),
                    _header("Reply-To", Address(addr_spec=reply_to)),
                    _header("Subject", subject),
                    _header("Date", date_text),
                    _header("Message-ID", message_id),
                ]
            )
        raw = _wire(head + (_MIME_WIRE if mime is _MIME_HEADERS else _folded(mime)), payload)
    except (ValueError, TypeError, IndexError) as exc:  # the email package refused a value
        raise MessageError(f"cannot build the message: {exc}") from exc

    expected = {
        "From": (display_name, settings.from_address),
        "To": ("", recipient),
        "Reply-To": ("", reply_to),
    }
    verify_message(
        raw,
        expected,
        subject=subject,
        message_id=message_id,
        date=moment,
        body=body,
        attachments=sub.attachments,
        boundary=mark,
    )
    return BuiltMessage(
        message_id=message_id,
        raw=raw,
        recipient=recipient,
        envelope_from=settings.envelope_sender,
        subject=subject,
        reply_to=reply_to,
    )


def build_notice(
    settings: Settings,
    *,
    to: str,
    subject: str,
    text: str,
    now: datetime | None = None,
) -> BuiltMessage:
    """A notice of ours to an operator (an alert to RELAY_ALERT_EMAIL): From and Reply-To our
    own address, To the configured one, built and checked like every other message."""
    subject = header_text(subject, SUBJECT_MAX) or NO_SUBJECT
    site_name = header_text(settings.site_name, NAME_MAX) or settings.from_domain
    message_id = make_message_id(settings)
    moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    body = sanitize_text(text, max_length=MESSAGE_MAX, multiline=True)
    try:
        raw = _wire(
            _folded(
                [
                    _header(
                        "From", Address(display_name=site_name, addr_spec=settings.from_address)
                    ),
                    _header("To", Address(addr_spec=to)),
                    _header("Reply-To", Address(addr_spec=settings.from_address)),
                    _header("Subject", subject),
                    _header("Date", format_datetime(moment)),
                    _header("Message-ID", message_id),
                ]
            )
            + _MIME_WIRE,
            qp_encode(body),
        )
    except (ValueError, TypeError, IndexError) as exc:
        raise MessageError(f"cannot build the notice: {exc}") from exc
    expected = {
        "From": (site_name, settings.from_address),
        "To": ("", to),
        "Reply-To": ("", settings.from_address),
    }
    verify_message(raw, expected, subject=subject, message_id=message_id, date=moment, body=body)
    return BuiltMessage(message_id, raw, to, settings.envelope_sender, subject)


def _squash(text: str) -> str:
    return "".join(text.split())


def check_lines(raw: bytes) -> None:
    """7-bit, CRLF only, every line <= 998 characters: or MessageError."""
    if not raw.isascii():
        raise MessageError("message is not 7-bit")
    if not raw.endswith(b"\r\n"):
        raise MessageError("message does not end with CRLF")
    lines = raw[:-2].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise MessageError("message has a bare CR or LF")
    longest = max(len(line) for line in lines)
    if longest > MAX_LINE:
        raise MessageError(f"message has a line of {longest} characters (limit {MAX_LINE})")


def _unfolded(value: str) -> str:
    """A raw header value as the email package hands it to a header class: CR and LF removed."""
    return _LINE_SEPARATORS.sub("", value)


def _decoded(name: str, value: str) -> BaseHeader:
    """The header object email.policy.default would make for this raw value."""
    return _REGISTRY(name, _unfolded(value))


def verify_message(
    raw: bytes,
    addresses: Mapping[str, tuple[str, str]],
    *,
    subject: str,
    message_id: str,
    date: datetime,
    body: str,
    attachments: Sequence[Attachment] = (),
    boundary: str = "",
) -> None:
    """Parse `raw` back and insist on exactly the headers and values we meant to write.

    Only the header block goes through the parser, and only the headers compared here are
    decoded, each once: the address headers in full (that is where encoded words can hide a
    CR/LF), the others only when their wire text is not already exactly what we meant. With
    attachments, the whole message is parsed too: every part, its headers and its bytes
    (relay.mail.attachments.verify_parts).
    """
    check_lines(raw)
    parsed = BytesHeaderParser(policy=_SPLIT_POLICY).parsebytes(raw)
    fields = list(parsed.raw_items())
    found = [name for name, _ in fields]
    if found != list(HEADER_SET):
        raise HeaderInjectionError(list(HEADER_SET), found)
    wire = dict(fields)

    def mismatch(header: str, meant: object, got: object) -> HeaderInjectionError:
        return HeaderInjectionError([f"{header}: {meant!r}"], [f"{header}: {got!r}"])

    for header, (display, addr_spec) in addresses.items():
        # A bare dot-atom addr-spec without "=?" (an atom may be an encoded word) decodes
        # to itself, with no display name and no defect.
        text = _unfolded(wire[header])
        if not display and text == addr_spec and "=?" not in text and _plain_address(text):
            continue
        # Atoms (or one quoted string with nothing escaped) and a plain angle-addr: exactly
        # one mailbox with this display name, by RFC 5322's grammar, no decoding needed.
        if display and "=?" not in text and _plain_address(addr_spec):
            phrase = _plain_phrase(display)
            if phrase is not None and "\\" not in phrase and text == f"{phrase} <{addr_spec}>":
                continue
        try:
            value = _decoded(header, wire[header])
        # e.g. a decoded CR/LF; AttributeError: Python 3.11's parser on a folded display
        # name of "." and 58 digits (found by tests/mail/test_message.py's hypothesis test)
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise mismatch(header, [(display, addr_spec)], wire[header]) from exc
        got = [(a.display_name, a.addr_spec) for a in getattr(value, "addresses", ())]
        # Python 3.11 keeps the folding space between two encoded words of a display name
        # (RFC 2047 §6.2 says to drop it), so display names are compared without spaces.
        if [(_squash(d), a) for d, a in got] != [(_squash(display), addr_spec)] or value.defects:
            raise mismatch(header, [(display, addr_spec)], got or str(value))
    simple = {
        "Subject": subject,
        "Message-ID": message_id,
        "MIME-Version": "1.0",
        "Content-Transfer-Encoding": "7bit" if attachments else "quoted-printable",
    }
    for header, meant in simple.items():
        text = _unfolded(wire[header])
        # Text without "=?" holds no encoded word, so it decodes to itself.
        if text == meant and "=?" not in text:
            continue
        decoded = str(_decoded(header, wire[header]))
        if decoded != meant:
            raise mismatch(header, meant, decoded)
    # The exact RFC 5322 text of `date` is that date; any other text is decoded and compared.
    if _unfolded(wire["Date"]) != format_datetime(date):
        parsed_date = getattr(_decoded("Date", wire["Date"]), "datetime", None)
        if parsed_date != date:
            raise mismatch("Date", date, parsed_date)
    if attachments:
        verify_parts(raw, boundary, body, attachments)
        return
    if _unfolded(wire["Content-Type"]) != _CONTENT_TYPE and (
        parsed.get_content_type() != "text/plain" or parsed.get_content_charset() != "utf-8"
    ):
        raise mismatch("Content-Type", "text/plain; charset=utf-8", str(parsed["Content-Type"]))
    payload = parsed.get_payload()
    if not isinstance(payload, str):
        raise MessageError("the body does not decode back to what was written")
    # What EmailMessage.get_content() does for quoted-printable text in utf-8.
    content = quopri.decodestring(payload.encode("ascii")).decode("utf-8", "replace")
    if content.replace("\r\n", "\n") != body + "\n":
        raise MessageError("the body does not decode back to what was written")
