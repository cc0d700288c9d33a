"""Rendering: the language, embed mode, JSON or HTML, the CSP nonce and the pages.

Every form renders through one template from its definition: the default form's fields
take the relay's own translated labels and hints, another form's come from
RELAY_FORMS_FILE in the page's language."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import (
    Response,
    g,
    jsonify,
    make_response,
    render_template,
    request,
    url_for,
)
from markupsafe import Markup, escape

from relay.formdefs import FieldDef, FormDef
from relay.web import forms
from relay.web.i18n import gettext
from relay.web.i18n import lazy_gettext as _l
from relay.web.state import DEFAULT_ENDPOINTS, FORM_ENDPOINTS, current_form, state
from relay.web.uploads import EXTENSIONS, human_size

STATIC = Path(__file__).parent / "static"
TRANSLATIONS = Path(__file__).parent / "translations"
# Inside the package so an installed (non-editable) relay can render its pages.
TEMPLATES = Path(__file__).parent / "templates"
LANGUAGES = ("en", "ja")


HCAPTCHA_SCRIPT = "https://js.hcaptcha.com/1/api.js"

# The default form's own words.
DEFAULT_LABELS = {
    "name": _l("Your name"),
    "email": _l("Your email address"),
    "subject": _l("Subject"),
    "message": _l("Message"),
}
AUTOCOMPLETE = {"name": "name", "email": "email", "tel": "tel", "url": "url"}
INPUT_TYPES = {"text": "text", "email": "email", "tel": "tel", "url": "url", "number": "text"}
REQUIRED = Markup(' required aria-required="true"')


def _(text: str, **variables: Any) -> str:
    """gettext, typed; pybabel extracts the calls by this name."""
    return str(gettext(text, **variables))


def select_locale() -> str:
    """?lang= wins, then Accept-Language, then English (found once per request)."""
    found: str | None = g.get("relay_locale")
    if found is None:
        lang = request.args.get("lang", "")[:8].lower()
        if lang not in LANGUAGES:
            lang = request.accept_languages.best_match(LANGUAGES) or "en"
        found = g.relay_locale = lang
    return found


def is_embed() -> bool:
    return request.args.get("embed") == "1"


def wants_json() -> bool:
    if request.is_json:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def csp_nonce() -> str:
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(18)
    nonce: str = g.csp_nonce
    return nonce


def page_args() -> dict[str, Any]:
    """Query arguments that follow the visitor from page to page (language, embed mode)."""
    args = {"lang": select_locale()}
    if is_embed():
        args["embed"] = "1"
    return args


def form_url(form: FormDef, **args: Any) -> str:
    if form.is_default:
        return url_for("web.form", **args)
    return url_for("web.custom_form", form_id=form.id, **args)


def field_views(form: FormDef, data: Any, errors: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """What the template shows of each field, in the page's language; the attributes every
    field repeats are made here once (a Jinja macro call per field and attribute cost more
    than the rest of the page)."""
    lang = select_locale()
    all_required = all(f.required for f in form.fields)
    optional = Markup(' <span class="optional">{}</span>').format(_("(optional)"))
    views = []
    for spec in form.fields:
        values = [v for v in data.getlist(spec.name) if isinstance(v, str)]
        label = label_of(form, spec, lang)
        failed = bool(errors.get(spec.name))
        views.append(
            {
                "name": spec.name,
                "type": spec.type,
                "input_type": INPUT_TYPES.get(spec.type, spec.type),
                "label": label,
                "label_text": (
                    escape(label) if spec.required or all_required else escape(label) + optional
                ),
                "aria": aria_attributes(spec.name, failed),
                "required_attrs": REQUIRED if spec.required else Markup(""),
                "hint": hint_of(form, spec, lang),
                "required": spec.required,
                "maxlength": spec.max_length,
                "value": values[0] if values else "",
                "picked": values,
                "choices": spec.choices,
                "autocomplete": AUTOCOMPLETE.get(spec.name if form.is_default else spec.type),
                "errors": errors.get(spec.name, []),
            }
        )
    return views


@functools.lru_cache(maxsize=512)
def aria_attributes(name: str, failed: bool) -> Markup:
    """The field's hint, and its error when it has one, as its description."""
    if failed:
        return Markup(' aria-invalid="true" aria-describedby="{0}-hint {0}-error"').format(name)
    return Markup(' aria-describedby="{}-hint"').format(name)


def label_of(form: FormDef, spec: FieldDef, lang: str) -> str:
    if form.is_default:
        return str(DEFAULT_LABELS[spec.name])
    return spec.label_in(lang)


def hint_of(form: FormDef, spec: FieldDef, lang: str) -> str:
    if not form.is_default and spec.help:
        return spec.help_in(lang)
    if spec.type == "email":
        return _("We will reply to this address.")
    if spec.type == "file":
        limits = form.attachments
        return _(
            "Up to %(count)d files, each at most %(size)s, %(total)s in all.",
            count=limits.max_files,
            size=human_size(limits.max_file_bytes),
            total=human_size(limits.max_total_bytes),
        )
    if spec.type in ("text", "textarea"):
        return _("Up to %(max)d characters.", max=spec.max_length)
    if spec.type == "date":
        return _("For example 2026-12-31.")
    return ""


def title_of(form: FormDef) -> str:
    return form.title.get(select_locale()) or next(iter(form.title.values()), _("Contact us"))


def accept_attribute(form: FormDef) -> str:
    """The file picker's filter: the allowed types and their extensions (a hint to the
    browser; the server decides from the bytes)."""
    allowed = sorted(form.attachments.allowed)
    extensions = sorted({f".{e}" for mime in allowed for e in EXTENSIONS.get(mime, ())})
    return ",".join([*allowed, *extensions])


def render_form(
    form: FormDef,
    parsed: forms.Parsed,
    *,
    errors: Mapping[str, list[str]] | None = None,
    status: int = 200,
    banner: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    errors = dict(errors or {})
    fields = field_views(form, parsed.data, errors)
    labels = {f["name"]: f["label"] for f in fields}
    labels[forms.CAPTCHA] = _("CAPTCHA")
    labels["form"] = _("Form")
    order = [*(f["name"] for f in fields), forms.CAPTCHA, "form"]
    summary = [
        (name, labels.get(name, name), message)
        for name in order
        for message in errors.get(name, [])
    ]
    html = render_template(
        "form.html",
        form=form,
        fields=fields,
        first_field=fields[0]["name"],
        title=title_of(form),
        all_required=all(f.required for f in form.fields),
        has_files=bool(form.file_fields),
        accept=accept_attribute(form),
        errors=errors,
        summary=summary,
        banner=banner,
        sitekey=state().sitekey,
        hcaptcha_script=f"{HCAPTCHA_SCRIPT}?hl={select_locale()}",
        action=form_url(form, **page_args()),
        **page_context(),
    )
    response = make_response(html, status)
    response.headers.update(headers or {})
    return response


def page_context() -> dict[str, Any]:
    other = "ja" if select_locale() == "en" else "en"
    form = current_form() or state().settings.default_form
    endpoint = request.endpoint
    if endpoint in FORM_ENDPOINTS:
        switch = url_for(endpoint, form_id=form.id, **{**page_args(), "lang": other})
    else:
        endpoint = endpoint if endpoint in DEFAULT_ENDPOINTS else "web.form"
        switch = url_for(endpoint, **{**page_args(), "lang": other})
    return {
        "lang": select_locale(),
        "embed": is_embed(),
        "nonce": csp_nonce(),
        "site_name": form.from_name or state().settings.site_name,
        "other_lang": other,
        "switch_url": switch,
        "page_args": page_args(),
        "back_url": form_url(form, **page_args()),
    }


def render_message_page(title: str, text: str, status: int) -> Response:
    html = render_template("message.html", title=title, text=text, **page_context())
    return make_response(html, status)


def json_errors(errors: Mapping[str, list[str]], status: int) -> Response:
    response = jsonify({"errors": dict(errors)})
    response.status_code = status
    return response
