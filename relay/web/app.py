"""The public web surface: the form, its submission, the thank-you page, embed.js, /healthz.

Cross-site request forgery is refused by origin, not by a session token: the form is
anonymous and state-less, it is meant to run in a third-party iframe where session cookies
are often blocked, and every submission also needs a fresh CAPTCHA. A POST whose Origin (or
Referer when Origin is absent) is neither ours nor in RELAY_ALLOWED_ORIGINS gets a 403.
See docs/security.md.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_babel import Babel, gettext
from flask_limiter import ApplicationLimit, Limiter
from flask_limiter.util import get_remote_address
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from relay import logs
from relay.config import HCAPTCHA_TEST_SECRET, HCAPTCHA_TEST_SITEKEY, Settings, load_settings
from relay.errors import CaptchaError, ConfigError, MessageError, StoreUnavailable
from relay.logs import event
from relay.mail.message import Submission, build_message
from relay.mail.mx import make_resolver
from relay.store.outbox import Outbox, new_id
from relay.web import forms
from relay.web.captcha import MISSING, HCaptchaVerifier, Verifier, site_keys

log = logging.getLogger("relay.web")

bp = Blueprint("web", __name__)

LANGUAGES = ("en", "ja")
STORE_RETRY_AFTER = 30
HCAPTCHA_SCRIPT = "https://js.hcaptcha.com/1/api.js"
HCAPTCHA_HOSTS = "https://hcaptcha.com https://*.hcaptcha.com"
STATIC = Path(__file__).parent / "static"
TRANSLATIONS = Path(__file__).parent / "translations"
# Inside the package so an installed (non-editable) relay can render its pages.
TEMPLATES = Path(__file__).parent / "templates"


def _(text: str, **variables: Any) -> str:
    """gettext, typed; pybabel extracts the calls by this name."""
    return str(gettext(text, **variables))


@dataclass(frozen=True)
class WebState:
    """What the views need, built once by create_app and kept in app.extensions."""

    settings: Settings
    outbox: Any
    resolver: Any
    verifier: Verifier
    sitekey: str
    allowed_origins: frozenset[str]
    public_origin: str | None
    limiter: Limiter


def state() -> WebState:
    web_state: WebState = current_app.extensions["formrelay"]
    return web_state


# --- origins ----------------------------------------------------------------------------------


def origin_of(url: str) -> str | None:
    """scheme://host[:port] of a URL, lower-case, default ports dropped; None if unusable."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or (parts.scheme, port) in (("http", 80), ("https", 443)):
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def own_origins() -> set[str]:
    """Our own origin as the browser sees it (request host) and RELAY_PUBLIC_URL's."""
    found = {origin_of(request.host_url), state().public_origin}
    return {o for o in found if o}


def request_origin() -> str | None:
    """The Origin header, or the origin of the Referer when Origin is absent."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin_of(origin) or "null"
    referer = request.headers.get("Referer")
    if referer:
        return origin_of(referer) or "null"
    return None


def origin_allowed() -> bool:
    """Browsers send Origin on every POST; no Origin and no Referer means a non-browser
    client, which cannot be made to forge a request, unless Sec-Fetch-Site says otherwise."""
    origin = request_origin()
    if origin is None:
        return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")
    return origin in state().allowed_origins or origin in own_origins()


def captcha_hostnames() -> set[str]:
    """Hosts a solved CAPTCHA may come from: the allowed origins and our public host, which
    is RELAY_PUBLIC_URL's when set (the Host header is the client's to choose) and the
    request's host otherwise."""
    own = state().public_origin or request.host_url
    hosts = {urlsplit(o).hostname for o in [*state().allowed_origins, own]}
    return {h.lower() for h in hosts if h}


# --- language and rendering --------------------------------------------------------------------


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


# --- views ------------------------------------------------------------------------------------


@bp.get("/healthz")
def healthz() -> Response:
    try:
        state().outbox.ping()
    except StoreUnavailable as exc:
        event(log, "health.store_unavailable", logging.WARNING, error=str(exc))
        response = jsonify({"status": "unavailable", "store": "unavailable"})
        response.status_code = 503
        response.headers["Retry-After"] = str(STORE_RETRY_AFTER)
        return response
    return jsonify({"status": "ok", "store": "ok"})


@bp.get("/thanks")
def thanks() -> Response:
    html = render_template("thanks.html", back=url_for("web.form", **page_args()), **page_context())
    return make_response(html, 200)


@bp.get("/embed.js")
def embed_js() -> Response:
    response = make_response((STATIC / "embed.js").read_bytes())
    response.headers["Content-Type"] = "text/javascript; charset=utf-8"
    response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


def preflight() -> Response:
    """CORS preflight for the JSON API: allowed origins only, no credentials."""
    origin = origin_of(request.headers.get("Origin", "")) or "-"
    if origin not in state().allowed_origins:
        event(log, "form.origin_refused", origin=origin, method="OPTIONS")
        return make_response("", 403)
    response = make_response("", 204)
    response.headers["Access-Control-Allow-Methods"] = "POST"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Accept, Accept-Language"
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def form() -> Response:
    if request.method == "OPTIONS":
        return preflight()
    if request.method == "POST":
        return submit()
    return render_form(forms.ContactForm(formdata=None))


bp.add_url_rule(
    "/form", view_func=form, methods=["GET", "POST", "OPTIONS"], provide_automatic_options=False
)


def refused() -> Response:
    event(
        log,
        "form.origin_refused",
        logging.WARNING,
        origin=request_origin() or "-",
        ip=request.remote_addr,
    )
    text = _("This form cannot be sent from this page.")
    if wants_json():
        return json_errors({"form": [text]}, 403)
    return render_message_page(_("Not allowed"), text, 403)


def submit() -> Response:
    if not origin_allowed():
        return refused()
    as_json = wants_json()
    parsed = read_request()
    form = forms.ContactForm(formdata=parsed.data)
    if "form" in parsed.errors:
        return invalid(form, parsed.errors, as_json)

    if parsed.data.get(forms.HONEYPOT, "").strip():
        event(log, "form.honeypot", ip=request.remote_addr, origin=request_origin() or "-")
        return success(new_id(), as_json)

    web = state()
    clean, errors = forms.validate(form, web.settings, web.resolver, errors=parsed.errors)
    if clean is None:
        event(log, "form.invalid", fields=",".join(sorted(errors)), ip=request.remote_addr)
        return invalid(form, errors, as_json)

    try:
        web.verifier.verify(
            parsed.data.get(forms.CAPTCHA, ""),
            remoteip=request.remote_addr,
            hostnames=captcha_hostnames(),
        )
    except CaptchaError as exc:
        event(
            log,
            "form.captcha_failed",
            codes=",".join(exc.codes),
            retryable=exc.retryable,
            ip=request.remote_addr,
        )
        return invalid(form, {forms.CAPTCHA: [captcha_message(exc)]}, as_json)

    metadata = submission_metadata()
    try:
        built = build_message(
            Submission(
                name=clean.name,
                email=clean.email,
                subject=clean.subject,
                message=clean.message,
                metadata=metadata,
            ),
            web.settings,
        )
    except MessageError as exc:
        event(log, "form.unbuildable", logging.WARNING, error=type(exc).__name__)
        return invalid(
            form, {"form": [_("We could not accept this message. Please check it.")]}, as_json
        )

    try:
        outbox_id = web.outbox.enqueue(built, metadata=metadata)
    except StoreUnavailable as exc:
        event(log, "form.store_unavailable", logging.ERROR, error=str(exc))
        text = _("We could not accept your message just now. Please try again in a minute.")
        headers = {"Retry-After": str(STORE_RETRY_AFTER)}
        if as_json:
            response = json_errors({"form": [text]}, 503)
            response.headers.update(headers)
            return response
        return render_form(form, status=503, banner=text, headers=headers)
    event(
        log,
        "form.accepted",
        id=outbox_id,
        message_id=built.message_id,
        ip=request.remote_addr,
        lang=select_locale(),
        embed=is_embed(),
    )
    return success(str(outbox_id), as_json)


def read_request() -> forms.Parsed:
    """The submitted fields, from a JSON or a form body."""
    if request.is_json:
        return forms.read_json(json_body())
    return forms.read_form(request.form)


def json_body() -> Any:
    """The parsed JSON body, or None when it is not JSON we can read (malformed, invalid
    UTF-8, or nested so deeply that the parser gives up with RecursionError)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def invalid(form: forms.ContactForm, errors: Mapping[str, list[str]], as_json: bool) -> Response:
    if as_json:
        return json_errors(errors, 400)
    return render_form(form, errors=errors, status=422)


def success(outbox_id: str, as_json: bool) -> Response:
    if as_json:
        accepted = jsonify({"id": outbox_id, "status": "queued"})
        accepted.status_code = 202
        return accepted
    # RELAY_THANKS_URL is a page of the operator's site; inside an embedding iframe our own
    # thank-you page stays, since it keeps reporting its height to embed.js.
    thanks_url = state().settings.thanks_url
    target = thanks_url if thanks_url and not is_embed() else url_for("web.thanks", **page_args())
    return make_response(redirect(target, 303))


def captcha_message(exc: CaptchaError) -> str:
    if exc.retryable:
        return _("We could not check the CAPTCHA just now. Please try again.")
    if MISSING in exc.codes:
        return _("Please complete the CAPTCHA.")
    return _("The CAPTCHA check failed or expired. Please complete it again.")


def submission_metadata() -> dict[str, str]:
    """Context for the support team; values are clipped and stripped of control characters."""
    raw = {
        "client_ip": request.remote_addr or "",
        "user_agent": request.headers.get("User-Agent", ""),
        "language": select_locale(),
        "referer": request.headers.get("Referer", ""),
        "origin": request.headers.get("Origin", ""),
        "form": "embed" if is_embed() else "page",
    }
    return {key: clip(value) for key, value in raw.items() if value}


def clip(value: str, limit: int = 300) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in value)
    return text[:limit]


# --- app-wide handlers (registered by create_app) ----------------------------------------------


def error_text(code: int) -> tuple[str, str]:
    texts = {
        400: (_("Bad request"), _("We could not read this request. Please try again.")),
        403: (_("Not allowed"), _("This form cannot be sent from this page.")),
        404: (_("Not found"), _("There is no page at this address.")),
        405: (_("Not allowed"), _("This address does not accept that kind of request.")),
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
    headers: dict[str, str] = {}
    if code == 429:
        headers["Retry-After"] = str(retry_after_seconds(exc))
        event(log, "form.rate_limited", ip=request.remote_addr, limit=exc.description)
    if wants_json():
        response = json_errors({"form": [text]}, code)
    elif code == 429 and request.method == "POST" and request.path == "/form":
        response = render_form(kept_form(), status=429, banner=text)
    else:
        response = render_message_page(title, text, code)
    response.headers.update(headers)
    return response


def handle_unexpected(exc: Exception) -> Response:
    """Last resort: log the failure, answer a friendly 500 (no stack trace to the visitor)."""
    log.exception("web.error path=%s", request.path)
    return handle_http_error(HTTPException(description=str(type(exc).__name__)))


def kept_form() -> forms.ContactForm:
    """The visitor's input, for re-rendering after a refusal that happened before the view."""
    try:
        parsed = read_request()
    except HTTPException:
        parsed = forms.Parsed(MultiDict())
    return forms.ContactForm(formdata=parsed.data)


def retry_after_seconds(exc: HTTPException) -> int:
    """Seconds until the breached limit lets this client in again."""
    current = state().limiter.current_limit
    if current is not None:
        return max(1, int(current.reset_at - time.time()))
    limit = getattr(exc, "limit", None)
    expiry = getattr(getattr(limit, "limit", None), "get_expiry", None)
    return max(1, int(expiry())) if callable(expiry) else 60


def security_headers(response: Response) -> Response:
    """CSP with a per-request nonce, nosniff, Referrer-Policy, HSTS behind HTTPS only; CORS
    for allowed origins on the JSON API."""
    web = state()
    ancestors = " ".join(["'self'", *sorted(web.allowed_origins)])
    form_action = "'self'"
    if web.settings.thanks_url:
        thanks_origin = origin_of(web.settings.thanks_url)
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
    if request.path == "/form" and origin in web.allowed_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        response.vary.add("Origin")
    return response


# --- the application ---------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None,
    *,
    outbox: Any = None,
    resolver: Any = None,
    verifier: Verifier | None = None,
) -> Flask:
    """Build the app: every resource (store, resolver, verifier, limiter, Babel) per app."""
    if settings is None:
        # The process entry point (gunicorn "relay:create_app()"): settings and logging are
        # ours to set up. A caller passing settings (CLI, demo, tests) owns its logging.
        settings = load_settings()
        if not logging.getLogger("relay").handlers:
            logs.configure(settings.log_level)
        for warning in settings.warnings:
            event(log, "config.warning", logging.WARNING, warning=warning)
    refuse_test_keys(settings)
    sitekey, _secret = site_keys(settings)

    app = Flask("relay", template_folder=str(TEMPLATES), static_folder=str(STATIC))
    app.config.update(
        SECRET_KEY=(
            settings.secret_key.get_secret_value()
            if settings.secret_key
            else secrets.token_urlsafe(48)
        ),
        MAX_CONTENT_LENGTH=forms.max_body_bytes(),
        BABEL_TRANSLATION_DIRECTORIES=str(TRANSLATIONS),
        BABEL_DEFAULT_LOCALE="en",
        WTF_CSRF_ENABLED=False,
    )
    if settings.trusted_proxies:
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]

    limiter = Limiter(
        get_remote_address,
        app=app,
        default_limits=[settings.rate_limit],
        default_limits_exempt_when=not_post,
        application_limits=[
            ApplicationLimit(
                settings.rate_limit_global, key_function=everyone, exempt_when=not_post
            )
        ],
        storage_uri=settings.rate_limit_storage,
        headers_enabled=False,
        swallow_errors=True,
        in_memory_fallback_enabled=True,
        key_prefix="formrelay",
        strategy="moving-window",
    )

    app.extensions["formrelay"] = WebState(
        settings=settings,
        outbox=outbox if outbox is not None else Outbox.from_settings(settings),
        # The view blocks anyway: a blocking resolver spares an event loop per submission.
        resolver=forms.blocking_resolver(
            resolver if resolver is not None else make_resolver(settings)
        ),
        verifier=verifier if verifier is not None else HCaptchaVerifier.from_settings(settings),
        sitekey=sitekey,
        allowed_origins=frozenset(settings.allowed_origins),
        public_origin=origin_of(settings.public_url) if settings.public_url else None,
        limiter=limiter,
    )

    Babel(app, locale_selector=select_locale)
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected)
    app.after_request(security_headers)
    return app


def refuse_test_keys(settings: Settings) -> None:
    """hCaptcha's published test keys accept every visitor: never outside development, even
    with settings built by hand rather than by load_settings()."""
    if settings.is_development:
        return
    secret = settings.hcaptcha_secret.get_secret_value() if settings.hcaptcha_secret else None
    problems = []
    if not settings.hcaptcha_sitekey or settings.hcaptcha_sitekey == HCAPTCHA_TEST_SITEKEY:
        problems.append("RELAY_HCAPTCHA_SITEKEY: required; the published test key is refused")
    if not secret or secret == HCAPTCHA_TEST_SECRET:
        problems.append("RELAY_HCAPTCHA_SECRET: required; the published test secret is refused")
    if problems:
        raise ConfigError(problems)


def everyone() -> str:
    """The key of the global ceiling: one bucket for all clients."""
    return "all-clients"


def not_post() -> bool:
    """Only submissions count against the rate limits; pages and preflights do not."""
    return request.method != "POST"
