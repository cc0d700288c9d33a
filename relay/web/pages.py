"""Rendering: the language, embed mode, JSON or HTML, the CSP nonce and the pages."""

from __future__ import annotations

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
from flask_babel import gettext

from relay.web import forms
from relay.web.state import state

STATIC = Path(__file__).parent / "static"
TRANSLATIONS = Path(__file__).parent / "translations"
# Inside the package so an installed (non-editable) relay can render its pages.
TEMPLATES = Path(__file__).parent / "templates"
LANGUAGES = ("en", "ja")


HCAPTCHA_SCRIPT = "https://js.hcaptcha.com/1/api.js"


def _(text: str, **variables: Any) -> str:
    """gettext, typed; pybabel extracts the calls by this name."""
    return str(gettext(text, **variables))


def select_locale() -> str:
    """?lang= wins, then Accept-Language, then English."""
    lang = request.args.get("lang", "")[:8].lower()
    if lang in LANGUAGES:
        return lang
    return request.accept_languages.best_match(LANGUAGES) or "en"


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


def render_form(
    form: forms.ContactForm,
    *,
    errors: Mapping[str, list[str]] | None = None,
    status: int = 200,
    banner: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    errors = dict(errors or {})
    labels = {name: str(form[name].label.text) for name in forms.FIELDS}
    labels[forms.CAPTCHA] = _("CAPTCHA")
    labels["form"] = _("Form")
    summary = [
        (name, labels.get(name, name), message)
        for name in (*forms.FIELDS, forms.CAPTCHA, "form")
        for message in errors.get(name, [])
    ]
    html = render_template(
        "form.html",
        form=form,
        errors=errors,
        summary=summary,
        banner=banner,
        limits=forms.limits(),
        sitekey=state().sitekey,
        hcaptcha_script=f"{HCAPTCHA_SCRIPT}?hl={select_locale()}",
        action=url_for("web.form", **page_args()),
        **page_context(),
    )
    response = make_response(html, status)
    response.headers.update(headers or {})
    return response


def page_context() -> dict[str, Any]:
    other = "ja" if select_locale() == "en" else "en"
    endpoint = request.endpoint if request.endpoint in ("web.form", "web.thanks") else "web.form"
    return {
        "lang": select_locale(),
        "embed": is_embed(),
        "nonce": csp_nonce(),
        "site_name": state().settings.site_name,
        "other_lang": other,
        "switch_url": url_for(endpoint, **{**page_args(), "lang": other}),
        "page_args": page_args(),
    }


def render_message_page(title: str, text: str, status: int) -> Response:
    html = render_template("message.html", title=title, text=text, **page_context())
    return make_response(html, status)


def json_errors(errors: Mapping[str, list[str]], status: int) -> Response:
    response = jsonify({"errors": dict(errors)})
    response.status_code = status
    return response
