"""App-wide handlers: friendly error pages (never a stack trace) and the security headers."""

from __future__ import annotations

import logging
import time

from flask import (
    Response,
    request,
)
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException

from relay.formdefs import FormDef
from relay.logs import event
from relay.web import forms
from relay.web.console import console_headers, is_console_path
from relay.web.origins import origin_of
from relay.web.pages import _, csp_nonce, json_errors, render_form, render_message_page, wants_json
from relay.web.state import allowed_origins, current_form, state
from relay.web.uploads import human_size
from relay.web.views import read_request

log = logging.getLogger("relay.web")

HCAPTCHA_HOSTS = "https://hcaptcha.com https://*.hcaptcha.com"


def error_text(code: int) -> tuple[str, str]:
    texts = {
        400: (_("Bad request"), _("We could not read this request. Please try again.")),
        403: (_("Not allowed"), _("This form cannot be sent from this page.")),
        404: (_("Not found"), _("There is no page at this address.")),
        405: (_("Not allowed"), _("This address does not accept that kind of request.")),
        408: (
            _("Too slow"),
            _("What you sent took too long to arrive. Please try again."),
        ),
        413: (
            _("Too large"),
            _("What you sent is too large. Please shorten your message and try again."),
        ),
        429: (
            _("Too many messages"),
            _("You have sent too many messages. Please wait a little and try again."),
        ),
    }
    return texts.get(
        code, (_("Something went wrong"), _("Something went wrong on our side. Please try again."))
    )


def handle_http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    title, text = error_text(code)
    form = current_form()
    posted = form if request.method == "POST" else None
    if code == 413 and posted is not None and posted.file_fields:
        text = _(
            "What you sent is too large: the files may be at most %(max)s together. Please "
            "send smaller files and try again.",
            max=human_size(posted.attachments.max_total_bytes),
        )
    headers: dict[str, str] = {}
    if code == 429:
        headers["Retry-After"] = str(retry_after_seconds(exc))
        event(log, "form.rate_limited", ip=request.remote_addr, limit=exc.description)
    if code in (413, 429) and posted is not None:
        reason = "rate_limited" if code == 429 else "too_large"
        state().metrics.submission("refused", reason, posted.id)
    if wants_json():
        response = json_errors({"form": [text]}, code)
    elif code == 429 and posted is not None:
        response = render_form(posted, kept_input(posted), status=429, banner=text)
    else:
        response = render_message_page(title, text, code)
    response.headers.update(headers)
    return response


def handle_unexpected(exc: Exception) -> Response:
    """Last resort: log the failure, answer a friendly 500 (no stack trace to the visitor)."""
    log.exception("web.error path=%s", request.path)
    return handle_http_error(HTTPException(description=str(type(exc).__name__)))


def kept_input(form: FormDef) -> forms.Parsed:
    """The visitor's input, for re-rendering after a refusal that happened before the view."""
    try:
        return read_request(form)
    except HTTPException:
        return forms.Parsed(MultiDict())


def retry_after_seconds(exc: HTTPException) -> int:
    """Seconds until the breached limit lets this client in again."""
    own = getattr(exc, "retry_after", None)  # a form's own rate_limit (relay.web.state)
    if isinstance(own, int):
        return own
    current = state().limiter.current_limit
    if current is not None:
        return max(1, int(current.reset_at - time.time()))
    limit = getattr(exc, "limit", None)
    expiry = getattr(getattr(limit, "limit", None), "get_expiry", None)
    return max(1, int(expiry())) if callable(expiry) else 60


def security_headers(response: Response) -> Response:
    """CSP with a per-request nonce, nosniff, Referrer-Policy, HSTS behind HTTPS only; CORS
    for allowed origins on the JSON API. The console has its own (console_headers)."""
    if is_console_path(request.path):
        return console_headers(response)
    web = state()
    form = current_form() or web.settings.default_form
    origins = allowed_origins(form)
    ancestors = " ".join(["'self'", *sorted(origins)])
    form_action = "'self'"
    if form.thanks_url:
        thanks_origin = origin_of(form.thanks_url)
        if thanks_origin:
            form_action += " " + thanks_origin
    nonce = csp_nonce()
    response.headers["Content-Security-Policy"] = "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' 'nonce-{nonce}' https://js.hcaptcha.com {HCAPTCHA_HOSTS}",
            f"style-src 'self' {HCAPTCHA_HOSTS}",
            f"frame-src {HCAPTCHA_HOSTS}",
            f"connect-src 'self' {HCAPTCHA_HOSTS}",
            "img-src 'self' data:",
            "font-src 'self'",
            f"form-action {form_action}",
            "base-uri 'none'",
            "object-src 'none'",
            f"frame-ancestors {ancestors}",
        ]
    )
    if "Cache-Control" not in response.headers:
        # Pages carry a per-response CSP nonce and depend on Accept-Language: never cache.
        response.headers["Cache-Control"] = "no-store"
        response.vary.add("Accept-Language")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "strict-origin-when-cross-origin"
    if request.is_secure:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    origin = request.headers.get("Origin", "").lower()
    if request.endpoint in ("web.form", "web.custom_form") and origin in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        response.vary.add("Origin")
    return response


def everyone() -> str:
    """The key of the global ceiling: one bucket for all clients."""
    return "all-clients"


def not_post() -> bool:
    """Only submissions count against the rate limits; pages and preflights do not."""
    return request.method != "POST"
