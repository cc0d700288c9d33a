"""Every form's input: reading untrusted bodies and validating each field by its definition
(relay.formdefs: the default form at /form and those of RELAY_FORMS_FILE alike).

Reading never fails with a 500: a body that is not a JSON object and values of the wrong type
become field errors. Text that is not UTF-8 (a JSON body, a form-encoded or a multipart one)
is an error on the field that carried it, never a silent replacement character.
Validation is strict where the message builder is lenient: a control character is an error
shown to the visitor, not something silently stripped from their message.

The e-mail domain is checked in DNS (`domain_problem`, last, after the CAPTCHA: a refused post
costs no query): False (NXDOMAIN, null MX, no MX and no address) is a field error; None
(timeout, SERVFAIL) is not, so a DNS hiccup never loses a visitor's message; the worker deals
with it at delivery.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import parse_qsl

import dns.resolver
from email_validator import EmailNotValidError, validate_email
from werkzeug.datastructures import MultiDict

from relay.errors import MessageError
from relay.formdefs import FieldDef, FormDef
from relay.logs import event
from relay.mail import message as message_module
from relay.mail import mx
from relay.mail.attachments import Attachment
from relay.settings import Settings
from relay.web.captcha import MAX_TOKEN_LENGTH
from relay.web.i18n import lazy_gettext as _l
from relay.web.uploads import Upload, check_files

log = logging.getLogger("relay.forms")

FIELDS = ("name", "email", "subject", "message")  # the default form's
HONEYPOT = "website"
CAPTCHA = "h-captcha-response"
# Line breaks are allowed in the message only; tab is allowed there too.
_MULTILINE_OK = frozenset("\n\r\t")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_CONTROL_MULTILINE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# What a body that is not UTF-8 decodes to with "surrogateescape": one per byte.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_TEL = re.compile(r"^\+?[0-9 ().-]{3,40}$")
_URL = re.compile(r"^https?://[^\s/?#]+\.[^\s/?#]+(?:[/?#]\S*)?$", re.IGNORECASE)
_NUMBER = re.compile(r"^-?[0-9]{1,30}(?:\.[0-9]{1,8})?$")
UNREADABLE = _l("This contains characters we could not read.")


def accepted_keys(form: FormDef) -> tuple[str, ...]:
    """Keys read from the request; anything else (to, cc, bcc, recipient...) is ignored."""
    return (*(f.name for f in form.fields if f.type != "file"), HONEYPOT, CAPTCHA)


def limits(form: FormDef) -> dict[str, int]:
    """Maximum length in characters of each field."""
    return {f.name: f.max_length for f in form.fields if f.type != "file"}


def max_body_bytes(form: FormDef) -> int:
    """The form's body cap (relay.web.body.limit_for): every field at its limit in the worst
    encoding (12 bytes a char as percent-encoded UTF-8 or a JSON surrogate pair), room for
    the CAPTCHA token, and the files' total with room for their part headers."""
    text = 12 * sum(limits(form).values()) + 96 * 1024
    if not form.file_fields:
        return text
    return text + form.attachments.max_total_bytes + 2048 * (form.attachments.max_files + 8)


@dataclass
class Parsed:
    """What the request carried: the form data (strings only; several values for a
    checkbox group), files by field, and errors found while reading."""

    data: MultiDict[str, str]
    errors: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, list[Upload]] = field(default_factory=dict)


def read_json(raw: bytes, form: FormDef) -> Parsed:
    """A JSON body: must be an object; each accepted value a string (or, for a checkbox
    group, a list of strings). Bytes that are not UTF-8 are an error on their field."""
    try:
        payload = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict):
        return Parsed(MultiDict(), {"form": [str(_l("The request must be a JSON object."))]})
    data: MultiDict[str, str] = MultiDict()
    errors: dict[str, list[str]] = {}
    for key in accepted_keys(form):
        value = payload.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) and _is_group(form, key) else [value]
        if not all(isinstance(item, str) for item in items):
            errors[key] = [str(_l("This must be text."))]
            continue
        _keep(data, errors, key, items)
    return Parsed(data, errors)


def read_urlencoded(raw: bytes, form: FormDef) -> Parsed:
    """A form-encoded body, decoded strictly (werkzeug keeps `%FF` as the text "%FF")."""
    text = raw.decode("utf-8", "surrogateescape")
    pairs = parse_qsl(text, keep_blank_values=True, errors="surrogateescape")
    return _from_pairs(pairs, form)


def read_multipart(fields: MultiDict[str, str], files: Any, form: FormDef) -> Parsed:
    """A multipart body as werkzeug parsed it: text it could not decode as UTF-8 arrives as
    U+FFFD, an error on its field; the files of each file field, read whole (the body was
    capped before, relay.web.body)."""
    parsed = _from_pairs(fields.items(multi=True), form)
    for spec in form.file_fields:
        uploads = [
            Upload(item.filename or "", item.mimetype or "", item.stream.read())
            for item in files.getlist(spec.name)
            if item.filename
        ]
        if uploads:
            parsed.files[spec.name] = uploads
    return parsed


def _from_pairs(pairs: Any, form: FormDef) -> Parsed:
    wanted = set(accepted_keys(form))
    data: MultiDict[str, str] = MultiDict()
    errors: dict[str, list[str]] = {}
    seen: dict[str, list[str]] = {}
    for key, value in pairs:
        if key in wanted:
            seen.setdefault(key, []).append(value)
    for key, values in seen.items():
        _keep(data, errors, key, values if _is_group(form, key) else values[:1])
    return Parsed(data, errors)


def _keep(data: MultiDict[str, str], errors: dict[str, list[str]], key: str, items: Any) -> None:
    if any(_UNDECODABLE.search(item) or "\ufffd" in item for item in items):
        errors[key] = [str(UNREADABLE)]
        return
    for item in items:
        data.add(key, item)


def _is_group(form: FormDef, key: str) -> bool:
    spec = form.field(key)
    return spec is not None and spec.type == "checkbox" and bool(spec.choices)


def control_characters(value: str, *, multiline: bool) -> bool:
    """True if the value holds a character we refuse rather than silently change: C0/C1
    controls and DEL (newline, CR and tab are fine in the message), bidi embeddings,
    overrides and isolates (they make text read differently from what it is), lone
    surrogates, unassigned code points, and line/paragraph separators outside the message.
    Joiners, soft hyphens and the like are left to relay.message.sanitize_text."""
    if value.isascii():  # the usual case: only C0 controls and DEL can be wrong here
        return (_ASCII_CONTROL_MULTILINE if multiline else _ASCII_CONTROL).search(value) is not None
    for ch in value:
        category = unicodedata.category(ch)
        allowed_here = (category == "Cc" and ch in _MULTILINE_OK) or category in ("Zl", "Zp")
        if multiline and allowed_here:
            continue
        if category in ("Cc", "Cs", "Cn", "Zl", "Zp") or ch in _BIDI_CONTROLS:
            return True
    return False


@dataclass(frozen=True)
class Clean:
    """Validated, normalised values ready for relay.mail.message.Submission: every field's
    text by name (a checkbox group's choices joined by ", "), the address, the files."""

    values: Mapping[str, str]
    email: str
    files: tuple[Attachment, ...] = ()

    @property
    def name(self) -> str:
        return self.values.get("name", "")

    @property
    def subject(self) -> str:
        return self.values.get("subject", "")

    @property
    def message(self) -> str:
        return self.values.get("message", "")


# The default form's own words for a missing field.
_REQUIRED = {
    "name": _l("Please enter your name."),
    "email": _l("Please enter your email address."),
    "subject": _l("Please enter a subject."),
    "message": _l("Please enter a message."),
}
CAPTCHA_MISSING = _l("Please complete the CAPTCHA.")
CAPTCHA_FAILED = _l("The CAPTCHA check failed or expired. Please complete it again.")


def validate(
    data: MultiDict[str, str] | Mapping[str, str],
    settings: Settings,
    *,
    form: FormDef | None = None,
    errors: Mapping[str, list[str]] | None = None,
    files: Mapping[str, list[Upload]] | None = None,
    captcha: bool = False,
) -> tuple[Clean | None, dict[str, list[str]]]:
    """Check every field of `form` (default: the one at /form) in `data`; return clean
    values, or None and {field: [messages]}. `errors` are problems already found while
    reading the request (kept, not re-checked).

    `captcha`: the token is a field too (the web form; `relay send` has none). A missing or
    unreadable token is reported beside the other fields, so the visitor learns everything
    in one round, and siteverify is only ever asked about a token of an otherwise valid form.
    Nothing here touches the network: the address's domain is `domain_problem`'s, asked
    after the CAPTCHA."""
    form = form or settings.default_form
    errors = {k: list(v) for k, v in (errors or {}).items()}
    values: dict[str, str] = {}
    for spec in form.fields:
        if spec.name in errors or spec.type == "file":
            continue
        value, problem = check_field(spec, _values_of(data, spec), default=form.is_default)
        if problem is None:
            values[spec.name] = value
        else:
            errors[spec.name] = [problem]
    attachments, file_errors = check_files(form, files or {})
    errors.update({k: v for k, v in file_errors.items() if k not in errors})
    if captcha and CAPTCHA not in errors:
        problem = check_token(data.get(CAPTCHA) or "")
        if problem is not None:
            errors[CAPTCHA] = [problem]
    email_name = form.email_field
    if email_name in values:
        email = _check_address(values[email_name], settings)
        if isinstance(email, list):
            errors[email_name] = email
        else:
            values[email_name] = email
    if errors:
        return None, errors
    try:
        clean = {
            spec.name: message_module.sanitize_text(
                values[spec.name], max_length=spec.max_length, multiline=spec.multiline
            )
            for spec in form.fields
            if spec.name in values and spec.type != "email"
        }
    except (ValueError, MessageError):
        return None, {"form": [str(_l("We could not accept this message. Please check it."))]}
    return Clean({**clean, email_name: values[email_name]}, values[email_name], attachments), {}


def _values_of(data: MultiDict[str, str] | Mapping[str, str], spec: FieldDef) -> list[str]:
    if isinstance(data, MultiDict):
        return [v for v in data.getlist(spec.name) if v is not None]
    value = data.get(spec.name)
    return [value] if isinstance(value, str) else []


def check_field(spec: FieldDef, raw_values: list[str], *, default: bool) -> tuple[str, str | None]:
    """(the value as validated, None) or (_, the visitor's message) for one field."""
    if spec.type == "checkbox":
        return _check_box(spec, raw_values)
    raw = (raw_values[0] if raw_values else "").replace("\r\n", "\n")
    value = raw if spec.multiline else raw.strip()
    if not value.strip():
        if not spec.required:
            return "", None
        if default and spec.name in _REQUIRED:
            return value, str(_REQUIRED[spec.name])
        if spec.type == "email":
            return value, str(_REQUIRED["email"])
        if spec.choices:
            return value, str(_l("Please choose one of the options."))
        return value, str(_l("Please fill in this field."))
    if len(value) > spec.max_length:
        return value, str(_l("Please use at most %(max)d characters.", max=spec.max_length))
    problem = text_problem(value, multiline=spec.multiline)
    return value, problem or _type_problem(spec, value)


def _check_box(spec: FieldDef, raw_values: list[str]) -> tuple[str, str | None]:
    """A single box: ticked or not ("yes" / ""); a group: the choices ticked."""
    ticked = [v.strip() for v in raw_values if v.strip()]
    if not spec.choices:
        if spec.required and not ticked:
            return "", str(_l("Please tick this box."))
        return ("yes" if ticked else ""), None
    if any(v not in spec.choices for v in ticked):
        return "", str(_l("Please choose one of the options."))
    if spec.required and not ticked:
        return "", str(_l("Please choose at least one option."))
    return ", ".join(c for c in spec.choices if c in ticked), None


def _type_problem(spec: FieldDef, value: str) -> str | None:
    kind = spec.type
    if spec.choices and kind in ("select", "radio") and value not in spec.choices:
        return str(_l("Please choose one of the options."))
    if kind == "tel" and (not _TEL.match(value) or sum(c.isdigit() for c in value) < 3):
        return str(_l("Please enter a phone number, like +81 3 1234 5678."))
    if kind == "url" and not _URL.match(value):
        return str(_l("Please enter a web address starting with https://."))
    if kind == "number" and not _NUMBER.match(value):
        return str(_l("Please enter a number, like 42 or 3.5."))
    if kind == "date":
        try:
            date.fromisoformat(value)
        except ValueError:
            return str(_l("Please enter a date, like 2026-12-31."))
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return str(_l("Please enter a date, like 2026-12-31."))
    if spec.pattern is not None and not spec.pattern.fullmatch(value):
        return str(_l("Please use the format shown."))
    return None


def text_problem(value: str, *, multiline: bool) -> str | None:
    """The checks every text the request carries goes through before any use."""
    if "\ufffd" in value:
        return str(UNREADABLE)
    if control_characters(value, multiline=multiline):
        return str(_l("Please remove control characters from this field."))
    return None


def check_token(token: str) -> str | None:
    """The CAPTCHA token: present, and text we can send on (hCaptcha's tokens are printable
    ASCII; a lone surrogate made httpx's form encoding raise, a 500)."""
    if not token.strip():
        return str(CAPTCHA_MISSING)
    if len(token) > MAX_TOKEN_LENGTH or text_problem(token, multiline=False) is not None:
        return str(CAPTCHA_FAILED)
    return None


def _check_address(value: str, settings: Settings) -> str | list[str]:
    """The address as written (syntax, no network): normalised, or the visitor's message."""
    try:
        result = validate_email(
            value,
            check_deliverability=False,
            allow_smtputf8=False,
            test_environment=settings.allow_test_domains,
        )
    except EmailNotValidError:
        return [str(_l("Please enter a valid email address, like name@example.com."))]
    return str(result.ascii_email or result.normalized)


def domain_problem(email: str, resolver: Any) -> list[str] | None:
    """The DNS half of the address check, asked only after every other check (the CAPTCHA
    included) has passed, so that a refused post costs no query: the visitor's message when
    the domain does not accept mail; None when it does or DNS cannot tell just now."""
    domain = email.rpartition("@")[2]
    accepts = domain_accepts_mail(domain, resolver)
    if accepts is False:
        event(log, "form.email_domain_rejected", domain=domain)
        return [str(_l("The domain of this email address does not accept mail."))]
    if accepts is None:
        event(log, "form.email_domain_unknown", logging.WARNING, domain=domain)
    return None


def domain_accepts_mail(domain: str, resolver: Any) -> bool | None:
    """relay.mx's check from a sync Flask view, on a blocking resolver (see blocking_resolver)."""
    return mx.domain_accepts_mail_blocking(domain, blocking_resolver(resolver))


def blocking_resolver(resolver: dns.resolver.BaseResolver) -> dns.resolver.Resolver:
    """A blocking resolver with the same configuration (nameservers, ports, timeouts, no
    cache) as `resolver`, which may be relay.mx's async one; a blocking one is kept as is.
    create_app converts once; building one costs a few µs."""
    return mx.blocking_resolver(resolver)
