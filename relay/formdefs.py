"""Form definitions: the default form (RELAY_ variables) and those of RELAY_FORMS_FILE (TOML).

Each form has its own support address, fields, subject, origins, thank-you page, language,
rate limit and attachment limits; the visitor's email field is the Reply-To of every form.
The file is read and checked once, at start, by relay.config: every problem is reported at
once, each by form and key (`RELAY_FORMS_FILE: forms.sales.fields[2].type: ...`, fields
counted from 0), so an operator fixes a file in one pass. Pure data and checks: no I/O but
reading the file, nothing of the web.

    [forms.sales]
    support_address = "sales@example.com"
    from_name = "Example sales"
    subject = "[Sales] {subject}"            # {field} is that field's value
    allowed_origins = ["https://www.example.com"]   # absent: RELAY_ALLOWED_ORIGINS
    thanks_url = "https://www.example.com/thanks"   # on an allowed origin or ours
    language = "en"                          # the labels in the message
    rate_limit = "3/minute"                  # per client, on top of RELAY_RATE_LIMIT
    title = { en = "Talk to sales", ja = "営業へのお問い合わせ" }
    attachments = { max_files = 3, max_file_bytes = 5_000_000, max_total_bytes = 10_000_000 }

    [[forms.sales.fields]]
    name = "email"                           # one field of type email: the Reply-To
    type = "email"
    required = true
    label = { en = "Your email", ja = "メールアドレス" }
"""

from __future__ import annotations

import functools
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from email_validator import EmailNotValidError, validate_email

DEFAULT_ID = "default"
LANGUAGES = ("en", "ja")
FIELD_TYPES = (
    "text",
    "email",
    "textarea",
    "select",
    "radio",
    "checkbox",
    "tel",
    "url",
    "number",
    "date",
    "file",
)
# The longest value of each type, in characters (relay.mail.message's limits for the default
# form's fields: NAME_MAX and SUBJECT_MAX 200, EMAIL_MAX 254, MESSAGE_MAX 20 000).
TYPE_MAX = {
    "text": 200,
    "email": 254,
    "textarea": 20000,
    "select": 200,
    "radio": 200,
    "checkbox": 2000,
    "tel": 40,
    "url": 2000,
    "number": 40,
    "date": 10,
    "file": 0,
}
MAX_FIELDS = 40
MAX_CHOICES = 100
# Names the request carries for itself (honeypot, CAPTCHA, page arguments, whole-form errors).
RESERVED_NAMES = frozenset({"website", "h-captcha-response", "form", "lang", "embed"})

# Kinds of attachment: each a set of MIME types decided from the bytes (relay.web.uploads).
KINDS: dict[str, frozenset[str]] = {
    "image": frozenset(
        {
            "image/jpeg",
            "image/png",
            "image/gif",
            "image/webp",
            "image/heic",
            "image/avif",
            "image/bmp",
            "image/tiff",
        }
    ),
    "pdf": frozenset({"application/pdf"}),
    "text": frozenset({"text/plain"}),
    "office": frozenset(
        {
            "application/msword",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "application/vnd.ms-excel",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            "application/vnd.ms-powerpoint",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            "application/vnd.oasis.opendocument.text",
            "application/vnd.oasis.opendocument.spreadsheet",
            "application/vnd.oasis.opendocument.presentation",
            "application/rtf",
        }
    ),
}
DEFAULT_KINDS = ("image", "pdf", "text", "office")
ALLOWABLE = frozenset().union(*KINDS.values())
# Helpdesks refuse mail over 20-25 MB; base64 adds a third.
MAX_TOTAL_CAP = 15_000_000

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_ORIGIN = re.compile(r"^https?://[^/\s]+$")
_FORM_KEYS = {
    "support_address",
    "from_name",
    "subject",
    "allowed_origins",
    "thanks_url",
    "language",
    "fields",
    "rate_limit",
    "attachments",
    "title",
}
_FIELD_KEYS = {"name", "type", "required", "label", "help", "max_length", "choices", "pattern"}
_ATTACHMENT_KEYS = {"max_files", "max_file_bytes", "max_total_bytes", "allowed"}


@dataclass(frozen=True)
class FieldDef:
    name: str
    type: str
    required: bool = False
    label: Mapping[str, str] = field(default_factory=dict)  # language -> text; {}: built in
    help: Mapping[str, str] = field(default_factory=dict)
    max_length: int = 200
    choices: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None

    def label_in(self, lang: str) -> str:
        return self.label.get(lang) or next(iter(self.label.values()), self.name)

    def help_in(self, lang: str) -> str:
        return self.help.get(lang) or next(iter(self.help.values()), "")

    @property
    def multiline(self) -> bool:
        return self.type == "textarea"


@dataclass(frozen=True)
class Attachments:
    max_files: int = 3
    max_file_bytes: int = 10_000_000
    max_total_bytes: int = 10_000_000
    allowed: frozenset[str] = frozenset().union(*(KINDS[k] for k in DEFAULT_KINDS))


@dataclass(frozen=True)
class FormDef:
    id: str
    support_address: str
    fields: tuple[FieldDef, ...]
    from_name: str = ""  # "": the site name (RELAY_FROM_NAME or the From domain)
    subject: str = "{subject}"
    allowed_origins: tuple[str, ...] | None = None  # None: RELAY_ALLOWED_ORIGINS
    thanks_url: str | None = None
    language: str = "en"
    rate_limit: str | None = None
    attachments: Attachments = field(default_factory=Attachments)
    title: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_default(self) -> bool:
        return self.id == DEFAULT_ID

    @property
    def email_field(self) -> str:
        return next(f.name for f in self.fields if f.type == "email")

    @property
    def file_fields(self) -> tuple[FieldDef, ...]:
        return tuple(f for f in self.fields if f.type == "file")

    def field(self, name: str) -> FieldDef | None:
        return next((f for f in self.fields if f.name == name), None)

    def origins(self, default: Sequence[str]) -> frozenset[str]:
        return frozenset(default if self.allowed_origins is None else self.allowed_origins)


@functools.lru_cache(maxsize=32)
def default_form(support_address: str, thanks_url: str | None, from_name: str = "") -> FormDef:
    """The form the RELAY_ variables configure, at /form: four required fields, labelled by
    the web layer's own translations. Made once per settings (frozen, so shared)."""
    return FormDef(
        id=DEFAULT_ID,
        support_address=support_address,
        from_name=from_name,
        thanks_url=thanks_url,
        fields=(
            FieldDef("name", "text", required=True, max_length=TYPE_MAX["text"]),
            FieldDef("email", "email", required=True, max_length=TYPE_MAX["email"]),
            FieldDef("subject", "text", required=True, max_length=TYPE_MAX["text"]),
            FieldDef("message", "textarea", required=True, max_length=TYPE_MAX["textarea"]),
        ),
    )


def subject_fields(template: str) -> list[str]:
    """The field names a subject template uses; ValueError for anything but {name}."""
    names = []
    for _text, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not _NAME.match(name) or spec or conversion:
            raise ValueError(f"{{{name}}} is not a field placeholder like {{subject}}")
        names.append(name)
    return names


def render_subject(template: str, values: Mapping[str, str]) -> str:
    """The subject with each {field} replaced by its value (made safe by the builder)."""
    out = []
    for text, name, _spec, _conversion in string.Formatter().parse(template):
        out.append(text)
        if name is not None:
            out.append(values.get(name, ""))
    return "".join(out)


# --- reading the file -------------------------------------------------------------------------


@dataclass
class _Context:
    """What a form's checks need from the rest of the configuration, and where problems go."""

    var: str
    test_domains: bool
    from_address: str
    own_origin: str | None
    default_origins: tuple[str, ...]
    problems: list[str] = field(default_factory=list)

    def problem(self, where: str, text: str) -> None:
        self.problems.append(f"{self.var}: {where}: {text}")


def load(
    path: Path,
    *,
    var: str = "RELAY_FORMS_FILE",
    test_domains: bool = False,
    from_address: str = "",
    own_origin: str | None = None,
    default_origins: Sequence[str] = (),
) -> tuple[dict[str, FormDef] | None, list[str]]:
    """The forms in `path` by id, or None and every problem found."""
    ctx = _Context(var, test_domains, from_address.lower(), own_origin, tuple(default_origins))
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return None, [f"{var}: {path}: cannot read it: {exc.strerror or exc}"]
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return None, [f"{var}: {path}: not valid TOML ({exc})"]
    for key in sorted(set(document) - {"forms"}):
        ctx.problem(key, "unknown key (forms are [forms.<id>] tables)")
    table = document.get("forms")
    if not isinstance(table, dict) or not table:
        ctx.problem("forms", "no form: add a [forms.<id>] table")
        return None, ctx.problems
    forms: dict[str, FormDef] = {}
    for form_id, body in table.items():
        where = f"forms.{form_id}"
        if form_id == DEFAULT_ID:
            ctx.problem(where, "the id 'default' is the RELAY_ variables' form at /form")
        elif not _ID.match(form_id):
            ctx.problem(where, "an id is 1-40 of a-z, 0-9, - and _, starting with a letter/digit")
        elif not isinstance(body, dict):
            ctx.problem(where, "must be a table")
        else:
            form = _form(form_id, body, ctx)
            if form is not None:
                forms[form_id] = form
    return (None, ctx.problems) if ctx.problems else (forms, [])


def _form(form_id: str, body: Mapping[str, Any], ctx: _Context) -> FormDef | None:
    where = f"forms.{form_id}"
    before = len(ctx.problems)
    for key in sorted(set(body) - _FORM_KEYS):
        ctx.problem(f"{where}.{key}", "unknown key")
    support = _address(body.get("support_address"), f"{where}.support_address", ctx)
    origins = _origins(body, where, ctx)
    language = body.get("language", "en")
    if language not in LANGUAGES:
        ctx.problem(f"{where}.language", f"{language!r}: use one of {', '.join(LANGUAGES)}")
        language = "en"
    fields = _fields(body.get("fields"), where, ctx)
    subject = _subject(body.get("subject"), fields, where, ctx) or f"Form {form_id}"
    thanks = _thanks(body.get("thanks_url"), origins, where, ctx)
    form = FormDef(
        id=form_id,
        support_address=support,
        from_name=_text(body.get("from_name", ""), f"{where}.from_name", ctx, limit=200),
        subject=subject,
        allowed_origins=origins,
        thanks_url=thanks,
        language=language,
        fields=tuple(fields),
        rate_limit=_rate_limit(body.get("rate_limit"), f"{where}.rate_limit", ctx),
        attachments=_attachments(body.get("attachments", {}), f"{where}.attachments", ctx),
        title=_languages(body.get("title"), f"{where}.title", ctx, required=False),
    )
    return form if len(ctx.problems) == before else None


def _text(value: Any, where: str, ctx: _Context, *, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit or any(c in value for c in "\r\n"):
        ctx.problem(where, f"must be one line of text, at most {limit} characters")
        return ""
    return value.strip()


def _address(value: Any, where: str, ctx: _Context) -> str:
    if not isinstance(value, str) or not value.strip():
        ctx.problem(where, "required: the address this form's messages go to")
        return ""
    try:
        validate_email(value, check_deliverability=False, test_environment=ctx.test_domains)
    except EmailNotValidError as exc:
        ctx.problem(where, f"{value!r} is not a valid address ({exc})")
        return ""
    if value.strip().lower() == ctx.from_address:
        ctx.problem(where, "must not be RELAY_FROM_ADDRESS")
    return value.strip()


def _origins(body: Mapping[str, Any], where: str, ctx: _Context) -> tuple[str, ...] | None:
    if "allowed_origins" not in body:
        return None
    value = body["allowed_origins"]
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        ctx.problem(f"{where}.allowed_origins", "must be a list of origins")
        return ()
    bad = [o for o in value if not _ORIGIN.match(o)]
    for origin in bad:
        ctx.problem(
            f"{where}.allowed_origins",
            f"{origin!r} is not an origin (scheme://host[:port], no path)",
        )
    return tuple(o.lower() for o in value if o not in bad)


def _origin_of(url: str) -> str | None:
    match = re.match(r"^(https?://[^/?#\s]+)(?:[/?#]\S*)?$", url)
    return match.group(1).lower() if match else None


def _thanks(value: Any, origins: tuple[str, ...] | None, where: str, ctx: _Context) -> str | None:
    if value is None:
        return None
    origin = _origin_of(value) if isinstance(value, str) else None
    if origin is None:
        ctx.problem(f"{where}.thanks_url", "must be an http:// or https:// URL")
        return None
    allowed = set(ctx.default_origins if origins is None else origins) | {ctx.own_origin}
    if origin not in allowed:
        ctx.problem(
            f"{where}.thanks_url",
            f"{origin} is neither an allowed origin of this form nor ours (RELAY_PUBLIC_URL)",
        )
        return None
    return str(value)


def _rate_limit(value: Any, where: str, ctx: _Context) -> str | None:
    from limits import parse_many  # noqa: PLC0415 - only with a forms file

    if value is None:
        return None
    try:
        ok = isinstance(value, str) and bool(parse_many(value))
    except ValueError:
        ok = False
    if not ok:
        ctx.problem(where, f"{value!r} is not a limit like 5/minute;30/hour")
        return None
    return str(value)


def _languages(value: Any, where: str, ctx: _Context, *, required: bool) -> dict[str, str]:
    """A text in en and ja: a table {en = ..., ja = ...}, or one string for both."""
    if value is None:
        if required:
            ctx.problem(where, "required: { en = ..., ja = ... }")
        return {}
    if isinstance(value, str):
        value = dict.fromkeys(LANGUAGES, value)
    if not isinstance(value, dict) or not value:
        ctx.problem(where, "must be a text or a table { en = ..., ja = ... }")
        return {}
    found: dict[str, str] = {}
    for lang, text in value.items():
        if lang not in LANGUAGES:
            ctx.problem(f"{where}.{lang}", f"unknown language (use {', '.join(LANGUAGES)})")
        elif not isinstance(text, str) or not text.strip() or len(text) > 500:
            ctx.problem(f"{where}.{lang}", "must be a non-empty text of at most 500 characters")
        else:
            found[lang] = text.strip()
    return found


def _fields(value: Any, where: str, ctx: _Context) -> list[FieldDef]:
    if not isinstance(value, list) or not value:
        ctx.problem(f"{where}.fields", "required: one [[forms.<id>.fields]] table per field")
        return []
    if len(value) > MAX_FIELDS:
        ctx.problem(f"{where}.fields", f"at most {MAX_FIELDS} fields")
    fields: list[FieldDef] = []
    names: set[str] = set()
    for index, item in enumerate(value):
        at = f"{where}.fields[{index}]"
        if not isinstance(item, dict):
            ctx.problem(at, "must be a table")
            continue
        found = _field(item, at, ctx)
        if found is None:
            continue
        if found.name in names:
            ctx.problem(f"{at}.name", f"{found.name!r} is used by another field of this form")
        names.add(found.name)
        fields.append(found)
    emails = [f for f in fields if f.type == "email"]
    if len(emails) != 1:
        ctx.problem(
            f"{where}.fields",
            f"needs exactly one field of type email, the Reply-To (found {len(emails)})",
        )
    elif not emails[0].required:
        ctx.problem(f"{where}.fields", f"the email field {emails[0].name!r} must be required")
    return fields


def _field(item: Mapping[str, Any], at: str, ctx: _Context) -> FieldDef | None:
    before = len(ctx.problems)
    for key in sorted(set(item) - _FIELD_KEYS):
        ctx.problem(f"{at}.{key}", "unknown key")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        ctx.problem(f"{at}.name", "required: 1-40 of a-z, 0-9, - and _, starting with a letter")
        name = ""
    elif name in RESERVED_NAMES:
        ctx.problem(f"{at}.name", f"{name!r} is reserved ({', '.join(sorted(RESERVED_NAMES))})")
    kind = item.get("type")
    if kind not in FIELD_TYPES:
        ctx.problem(f"{at}.type", f"{kind!r} is not a field type ({', '.join(FIELD_TYPES)})")
        kind = "text"
    required = item.get("required", False)
    if not isinstance(required, bool):
        ctx.problem(f"{at}.required", "must be true or false")
        required = False
    choices = _choices(item, kind, at, ctx)
    found = FieldDef(
        name=name,
        type=kind,
        required=required,
        label=_languages(item.get("label"), f"{at}.label", ctx, required=True),
        help=_languages(item.get("help"), f"{at}.help", ctx, required=False),
        max_length=_max_length(item.get("max_length"), kind, f"{at}.max_length", ctx),
        choices=choices,
        pattern=_pattern(item.get("pattern"), kind, f"{at}.pattern", ctx),
    )
    return found if len(ctx.problems) == before else None


def _choices(item: Mapping[str, Any], kind: str, at: str, ctx: _Context) -> tuple[str, ...]:
    value = item.get("choices")
    if value is None:
        if kind in ("select", "radio"):
            ctx.problem(f"{at}.choices", f"required for a {kind} field")
        return ()
    if kind not in ("select", "radio", "checkbox"):
        ctx.problem(f"{at}.choices", "only select, radio and checkbox fields have choices")
        return ()
    ok = isinstance(value, list) and 0 < len(value) <= MAX_CHOICES
    if not ok or not all(isinstance(c, str) and c.strip() and len(c) <= 200 for c in value):
        ctx.problem(f"{at}.choices", f"must be a list of 1-{MAX_CHOICES} non-empty texts")
        return ()
    if len(set(value)) != len(value):
        ctx.problem(f"{at}.choices", "a choice is listed twice")
    return tuple(c.strip() for c in value)


def _max_length(value: Any, kind: str, where: str, ctx: _Context) -> int:
    most = TYPE_MAX[kind]
    if value is None:
        return most
    if kind == "file" or kind in ("select", "radio", "checkbox", "date"):
        ctx.problem(where, f"a {kind} field has no max_length")
        return most
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        ctx.problem(where, f"must be a whole number from 1 to {most} for a {kind} field")
        return most
    return value


def _pattern(value: Any, kind: str, where: str, ctx: _Context) -> re.Pattern[str] | None:
    if value is None:
        return None
    if kind not in ("text", "textarea", "tel"):
        ctx.problem(where, "only text, textarea and tel fields have a pattern")
        return None
    if not isinstance(value, str):
        ctx.problem(where, "must be a regular expression (Python re) as a string")
        return None
    try:
        return re.compile(value)
    except re.error as exc:
        ctx.problem(where, f"{value!r} is not a regular expression ({exc})")
        return None


def _subject(value: Any, fields: Sequence[FieldDef], where: str, ctx: _Context) -> str:
    names = {f.name for f in fields if f.type != "file"}
    if value is None:
        return "{subject}" if "subject" in names else ""
    template = _text(value, f"{where}.subject", ctx, limit=200)
    try:
        used = subject_fields(template)
    except ValueError as exc:
        ctx.problem(f"{where}.subject", str(exc))
        return template
    for name in used:
        if fields and name not in names:
            ctx.problem(f"{where}.subject", f"{{{name}}} is no text field of this form")
    return template


def _attachments(value: Any, where: str, ctx: _Context) -> Attachments:
    if not isinstance(value, dict):
        ctx.problem(where, "must be a table { max_files = ..., max_file_bytes = ..., ... }")
        return Attachments()
    for key in sorted(set(value) - _ATTACHMENT_KEYS):
        ctx.problem(f"{where}.{key}", "unknown key")
    defaults = Attachments()
    numbers: dict[str, int] = {}
    for key, most in (
        ("max_files", 20),
        ("max_file_bytes", MAX_TOTAL_CAP),
        ("max_total_bytes", MAX_TOTAL_CAP),
    ):
        number = value.get(key, getattr(defaults, key))
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= most:
            ctx.problem(f"{where}.{key}", f"must be a whole number from 1 to {most:_}")
            number = getattr(defaults, key)
        numbers[key] = number
    if numbers["max_file_bytes"] > numbers["max_total_bytes"]:
        ctx.problem(f"{where}.max_file_bytes", "must not exceed max_total_bytes")
    return Attachments(**numbers, allowed=_allowed(value.get("allowed"), f"{where}.allowed", ctx))


def _allowed(value: Any, where: str, ctx: _Context) -> frozenset[str]:
    """Kinds (image, pdf, text, office) or MIME types of those kinds; nothing else can be
    allowed: executables, scripts, HTML and archives are refused whatever the file says."""
    if value is None:
        return Attachments().allowed
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        ctx.problem(where, f"must be a list of kinds ({', '.join(KINDS)}) or their MIME types")
        return Attachments().allowed
    found: set[str] = set()
    for item in value:
        if item in KINDS:
            found |= KINDS[item]
        elif item.lower() in ALLOWABLE:
            found.add(item.lower())
        else:
            ctx.problem(
                where,
                f"{item!r} cannot be allowed: use {', '.join(KINDS)} or one of their MIME "
                "types (executables, scripts, HTML and archives are always refused)",
            )
    return frozenset(found)
