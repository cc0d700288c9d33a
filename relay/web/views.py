"""The public routes: the form and its submission, the thank-you page, embed.js, /healthz."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)

from relay.errors import CaptchaError, StoreUnavailable
from relay.logs import event
from relay.metrics import authorized, exposition
from relay.store.metrics import store_collectors
from relay.store.outbox import new_id
from relay.web import forms
from relay.web.accept import Refused, accept
from relay.web.origins import captcha_hostnames, origin_allowed, origin_of, request_origin
from relay.web.pages import (
    STATIC,
    _,
    is_embed,
    json_errors,
    page_args,
    page_context,
    render_form,
    render_message_page,
    select_locale,
    wants_json,
)
from relay.web.state import state

log = logging.getLogger("relay.web")

bp = Blueprint("web", __name__)


STORE_RETRY_AFTER = 30


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


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format to the bearer of RELAY_METRICS_TOKEN; without one, no page."""
    web = state()
    if web.settings.metrics_token is None:
        abort(404)
    token = web.settings.metrics_token.get_secret_value()
    if not authorized(request.headers.get("Authorization"), token):
        response = make_response("unauthorized\n", 401)
        response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        response.mimetype = "text/plain"
        return response
    body, content_type = exposition(
        web.metrics,
        store_collectors(web.outbox, web.outbox.workers, web.settings.worker_dead_after),
    )
    response = make_response(body, 200)
    response.headers["Content-Type"] = content_type
    return response


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
    state().metrics.submission("refused", "origin")
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
    web = state()
    if "form" in parsed.errors:
        web.metrics.submission("refused", "invalid")
        return invalid(form, parsed.errors, as_json)

    if parsed.data.get(forms.HONEYPOT, "").strip():
        web.metrics.submission("refused", "honeypot")
        event(log, "form.honeypot", ip=request.remote_addr, origin=request_origin() or "-")
        return success(new_id(), as_json)

    def captcha() -> None:
        web.verifier.verify(
            parsed.data.get(forms.CAPTCHA, ""),
            remoteip=request.remote_addr,
            hostnames=captcha_hostnames(),
        )

    try:
        accepted = accept(
            parsed.data,
            settings=web.settings,
            resolver=web.resolver,
            outbox=web.outbox,
            metadata=submission_metadata(),
            errors=parsed.errors,
            captcha=captcha,
        )
    except Refused as exc:
        web.metrics.submission("refused", exc.step)
        log_refusal(exc)
        return invalid(form, exc.errors, as_json)
    except StoreUnavailable as exc:
        web.metrics.submission("refused", "store_unavailable")
        event(log, "form.store_unavailable", logging.ERROR, error=str(exc))
        text = _("We could not accept your message just now. Please try again in a minute.")
        headers = {"Retry-After": str(STORE_RETRY_AFTER)}
        if as_json:
            response = json_errors({"form": [text]}, 503)
            response.headers.update(headers)
            return response
        return render_form(form, status=503, banner=text, headers=headers)
    if accepted.held_by:
        web.metrics.submission("held", accepted.held_by.partition(":")[0])
    else:
        web.metrics.submission("accepted", "ok")
    event(
        log,
        "form.held" if accepted.held_by else "form.accepted",
        id=accepted.id,
        message_id=accepted.message_id,
        rule=accepted.held_by,
        ip=request.remote_addr,
        lang=select_locale(),
        embed=is_embed(),
    )
    return success(accepted.id, as_json)


def log_refusal(exc: Refused) -> None:
    cause = exc.cause
    if isinstance(cause, CaptchaError):
        event(
            log,
            "form.captcha_failed",
            codes=",".join(cause.codes),
            retryable=cause.retryable,
            ip=request.remote_addr,
        )
    elif exc.step == "unbuildable":
        event(log, "form.unbuildable", logging.WARNING, error=type(cause).__name__)
    else:
        event(log, "form.invalid", fields=",".join(sorted(exc.errors)), ip=request.remote_addr)


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
