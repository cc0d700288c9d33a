"""The contact form: reading untrusted input and validating every field.

Reading never fails with a 500: a body that is not a JSON object and values of the wrong type
become field errors. Percent-encoded bytes that are not UTF-8 are kept by werkzeug as the literal
text (`%FF`), so they reach the message as visible, harmless characters.
Validation is strict where the message builder is lenient: a control character is an error
shown to the visitor, not something silently stripped from their message.

The e-mail domain is checked in DNS (`relay.mx.domain_accepts_mail`): False (NXDOMAIN, null MX,
no MX and no address) is a field error; None (timeout, SERVFAIL) is not, so a DNS hiccup
never loses a visitor's message; the worker deals with it at delivery.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dns.resolver
from email_validator import EmailNotValidError, validate_email
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from werkzeug.datastructures import MultiDict
from wtforms import EmailField, StringField, TextAreaField

from relay.config import Settings
from relay.errors import MessageError
from relay.logs import event
from relay.mail import message as message_module
from relay.mail import mx
from relay.web.captcha import MAX_TOKEN_LENGTH

log = logging.getLogger("relay.forms")

FIELDS = ("name", "email", "subject", "message")
HONEYPOT = "website"
CAPTCHA = "h-captcha-response"
# Keys read from the request; anything else (to, cc, bcc, recipient...) is ignored.
ACCEPTED = (*FIELDS, HONEYPOT, CAPTCHA)
# Line breaks are allowed in the message only; tab is allowed there too.
_MULTILINE_OK = frozenset("\n\r\t")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_CONTROL_MULTILINE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def limits() -> dict[str, int]:
    """Maximum length in characters of each field, from relay.mail.message."""
    return {
        "name": message_module.NAME_MAX,
        "email": message_module.EMAIL_MAX,
        "subject": message_module.SUBJECT_MAX,
        "message": message_module.MESSAGE_MAX,
    }


def max_body_bytes() -> int:
    """The form's body cap (relay.web.body.limit_for): every field at its limit in the worst
    encoding (12 bytes a char as percent-encoded UTF-8 or a JSON surrogate pair), plus room
    for the CAPTCHA token."""
    return 12 * sum(limits().values()) + 96 * 1024


class ContactForm(FlaskForm):  # type: ignore[misc]
    """Rendering and the per-field rules; CSRF is the Origin check in web.py (see
    docs/security.md), so the WTForms token is off."""

    class Meta:
        csrf = False

    name = StringField(_l("Your name"))
    email = EmailField(_l("Your email address"))
    subject = StringField(_l("Subject"))
    message = TextAreaField(_l("Message"))
    website = StringField(_l("Leave this field empty"))


@dataclass
class Parsed:
    """What the request carried: the form data (strings only) and errors found while reading."""

    data: MultiDict[str, str]
    errors: dict[str, list[str]] = field(default_factory=dict)


def read_json(payload: Any) -> Parsed:
    """A JSON body: must be an object; each accepted value must be a string."""
    if not isinstance(payload, dict):
        return Parsed(MultiDict(), {"form": [str(_l("The request must be a JSON object."))]})
    data: MultiDict[str, str] = MultiDict()
    errors: dict[str, list[str]] = {}
    for key in ACCEPTED:
        if key not in payload or payload[key] is None:
            continue
        value = payload[key]
        if isinstance(value, str):
            data[key] = value
        else:
            errors[key] = [str(_l("This must be text."))]
    return Parsed(data, errors)


def read_form(form: Mapping[str, Any]) -> Parsed:
    """A form-encoded body: the first value of each accepted key."""
    data: MultiDict[str, str] = MultiDict()
    for key in ACCEPTED:
        value = form.get(key)
        if isinstance(value, str):
            data[key] = value
    return Parsed(data)


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
    """Validated, normalised values ready for relay.message.Submission."""

    name: str
    email: str
    subject: str
    message: str


_REQUIRED = {
    "name": _l("Please enter your name."),
    "email": _l("Please enter your email address."),
    "subject": _l("Please enter a subject."),
    "message": _l("Please enter a message."),
}
CAPTCHA_MISSING = _l("Please complete the CAPTCHA.")
CAPTCHA_FAILED = _l("The CAPTCHA check failed or expired. Please complete it again.")


def validate(
    data: Mapping[str, str],
    settings: Settings,
    resolver: Any,
    *,
    errors: Mapping[str, list[str]] | None = None,
    captcha: bool = False,
) -> tuple[Clean | None, dict[str, list[str]]]:
    """Check every field of `data`; return clean values, or None and {field: [messages]}.
    `errors` are problems already found while reading the request (kept, not re-checked).

    `captcha`: the token is a field too (the web form; `relay send` has none). A missing or
    unreadable token is reported beside the other fields, so the visitor learns everything
    in one round, and siteverify is only ever asked about a token of an otherwise valid form."""
    errors = {k: list(v) for k, v in (errors or {}).items()}
    values: dict[str, str] = {}
    for name in FIELDS:
        if name in errors:
            continue
        value, problem = check_field(name, data.get(name) or "")
        if problem is None:
            values[name] = value
        else:
            errors[name] = [problem]
    if captcha and CAPTCHA not in errors:
        problem = check_token(data.get(CAPTCHA) or "")
        if problem is not None:
            errors[CAPTCHA] = [problem]
    if "email" in values:
        email = _check_email(values["email"], settings, resolver)
        if isinstance(email, list):
            errors["email"] = email
        else:
            values["email"] = email
    if errors:
        return None, errors
    max_len = limits()
    try:
        clean = Clean(
            name=message_module.sanitize_text(
                values["name"], max_length=max_len["name"], multiline=False
            ),
            email=values["email"],
            subject=message_module.sanitize_text(
                values["subject"], max_length=max_len["subject"], multiline=False
            ),
            message=message_module.sanitize_text(
                values["message"], max_length=max_len["message"], multiline=True
            ),
        )
    except (ValueError, MessageError):
        return None, {"form": [str(_l("We could not accept this message. Please check it."))]}
    return clean, {}


def check_field(name: str, raw: str) -> tuple[str, str | None]:
    """(the value as validated, None) or (_, the visitor's message) for one visitor field."""
    max_len = limits()[name]
    multiline = name == "message"
    raw = raw.replace("\r\n", "\n")
    value = raw if multiline else raw.strip()
    if not value.strip():
        return value, str(_REQUIRED[name])
    if len(value) > max_len:
        return value, str(_l("Please use at most %(max)d characters.", max=max_len))
    return value, text_problem(value, multiline=multiline)


def text_problem(value: str, *, multiline: bool) -> str | None:
    """The checks every text the request carries goes through before any use."""
    if "\ufffd" in value:
        return str(_l("This contains characters we could not read."))
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


def _check_email(value: str, settings: Settings, resolver: Any) -> str | list[str]:
    try:
        result = validate_email(
            value,
            check_deliverability=False,
            allow_smtputf8=False,
            test_environment=settings.allow_test_domains,
        )
    except EmailNotValidError:
        return [str(_l("Please enter a valid email address, like name@example.com."))]
    domain = result.ascii_domain
    accepts = domain_accepts_mail(domain, resolver)
    if accepts is False:
        event(log, "form.email_domain_rejected", domain=domain)
        return [str(_l("The domain of this email address does not accept mail."))]
    if accepts is None:
        event(log, "form.email_domain_unknown", logging.WARNING, domain=domain)
    return str(result.ascii_email or result.normalized)


def domain_accepts_mail(domain: str, resolver: Any) -> bool | None:
    """relay.mx's check from a sync Flask view, on a blocking resolver (see blocking_resolver)."""
    return mx.domain_accepts_mail_blocking(domain, blocking_resolver(resolver))


def blocking_resolver(resolver: dns.resolver.BaseResolver) -> dns.resolver.Resolver:
    """A blocking resolver with the same configuration (nameservers, ports, timeouts, no
    cache) as `resolver`, which may be relay.mx's async one; a blocking one is kept as is.
    create_app converts once; building one costs a few µs."""
    return mx.blocking_resolver(resolver)
