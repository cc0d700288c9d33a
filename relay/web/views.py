"""The public routes: every form and its submission (the default one at /form, those of
RELAY_FORMS_FILE at /f/<id>), the thank-you pages, embed.js, /healthz, /metrics."""

from __future__ import annotations

import logging
from collections.abc import Mapping

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
from werkzeug.datastructures import MultiDict

from relay.errors import CaptchaError, StoreUnavailable
from relay.formdefs import FormDef
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
    form_url,
    is_embed,
    json_errors,
    page_args,
    page_context,
    render_form,
    render_message_page,
    select_locale,
    wants_json,
)
from relay.web.state import allowed_origins, current_form, form_limit_allows, state

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


def thanks(form_id: str | None = None) -> Response:
    form = current_form()
    if form is None:
        abort(404)
    html = render_template("thanks.html", back=form_url(form, **page_args()), **page_context())
    return make_response(html, 200)


bp.add_url_rule("/thanks", "thanks", thanks, methods=["GET"])
bp.add_url_rule("/f/<form_id>/thanks", "form_thanks", thanks, methods=["GET"])


@bp.get("/embed.js")
def embed_js() -> Response:
    response = make_response((STATIC / "embed.js").read_bytes())
    response.headers["Content-Type"] = "text/javascript; charset=utf-8"
    response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


def preflight(form: FormDef) -> Response:
    """CORS preflight for the JSON API: the form's allowed origins only, no credentials."""
    origin = origin_of(request.headers.get("Origin", "")) or "-"
    if origin not in allowed_origins(form):
        event(log, "form.origin_refused", origin=origin, method="OPTIONS", form=form.id)
        return make_response("", 403)
    response = make_response("", 204)
    response.headers["Access-Control-Allow-Methods"] = "POST"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Accept, Accept-Language"
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def form(form_id: str | None = None) -> Response:
    """GET, POST and OPTIONS of a form: /form (the default) or /f/<id>; an unknown id is
    the 404 page."""
    found = current_form()
    if found is None:
        abort(404)
    if request.method == "OPTIONS":
        return preflight(found)
    if request.method == "POST":
        return submit(found)
    return render_form(found, forms.Parsed(MultiDict()))


for rule, endpoint in (("/form", "form"), ("/f/<form_id>", "custom_form")):
    bp.add_url_rule(
        rule,
        endpoint,
        view_func=form,
        methods=["GET", "POST", "OPTIONS"],
        provide_automatic_options=False,
    )


def refused(form: FormDef) -> Response:
    state().metrics.submission("refused", "origin", form.id)
    event(
        log,
        "form.origin_refused",
        logging.WARNING,
        origin=request_origin() or "-",
        ip=request.remote_addr,
        form=form.id,
    )
    text = _("This form cannot be sent from this page.")
    if wants_json():
        return json_errors({"form": [text]}, 403)
    return render_message_page(_("Not allowed"), text, 403)


def submit(form: FormDef) -> Response:
    if not origin_allowed(form):
        return refused(form)
    form_limit_allows(form)  # 429 past the form's own rate_limit
    as_json = wants_json()
    parsed = read_request(form)
    web = state()
    if "form" in parsed.errors:
        web.metrics.submission("refused", "invalid", form.id)
        return invalid(form, parsed, parsed.errors, as_json)

    if parsed.data.get(forms.HONEYPOT, "").strip():
        web.metrics.submission("refused", "honeypot", form.id)
        event(
            log,
            "form.honeypot",
            ip=request.remote_addr,
            origin=request_origin() or "-",
            form=form.id,
        )
        return success(form, new_id(), as_json)

    def captcha() -> None:
        web.verifier.verify(
            parsed.data.get(forms.CAPTCHA, ""),
            remoteip=request.remote_addr,
            hostnames=captcha_hostnames(form),
        )

    try:
        accepted = accept(
            parsed.data,
            settings=web.settings,
            resolver=web.resolver,
            outbox=web.outbox,
            metadata=submission_metadata(),
            form=form,
            errors=parsed.errors,
            files=parsed.files,
            captcha=captcha,
        )
    except Refused as exc:
        web.metrics.submission("refused", exc.step, form.id)
        log_refusal(exc, form)
        return invalid(form, parsed, exc.errors, as_json)
    except StoreUnavailable as exc:
        web.metrics.submission("refused", "store_unavailable", form.id)
        event(log, "form.store_unavailable", logging.ERROR, error=str(exc), form=form.id)
        text = _("We could not accept your message just now. Please try again in a minute.")
        headers = {"Retry-After": str(STORE_RETRY_AFTER)}
        if as_json:
            response = json_errors({"form": [text]}, 503)
            response.headers.update(headers)
            return response
        return render_form(form, parsed, status=503, banner=text, headers=headers)
    if accepted.held_by:
        web.metrics.submission("held", accepted.held_by.partition(":")[0], form.id)
    else:
        web.metrics.submission("accepted", "ok", form.id)
    event(
        log,
        "form.held" if accepted.held_by else "form.accepted",
        id=accepted.id,
        message_id=accepted.message_id,
        rule=accepted.held_by,
        ip=request.remote_addr,
        lang=select_locale(),
        embed=is_embed(),
        form=form.id,
        files=sum(len(v) for v in parsed.files.values()) or None,
    )
    return success(form, accepted.id, as_json)


def log_refusal(exc: Refused, form: FormDef) -> None:
    cause = exc.cause
    if isinstance(cause, CaptchaError):
        event(
            log,
            "form.captcha_failed",
            codes=",".join(cause.codes),
            retryable=cause.retryable,
            ip=request.remote_addr,
            form=form.id,
        )
    elif exc.step == "unbuildable":
        event(log, "form.unbuildable", logging.WARNING, error=type(cause).__name__, form=form.id)
    else:
        event(
            log,
            "form.invalid",
            fields=",".join(sorted(exc.errors)),
            ip=request.remote_addr,
            form=form.id,
        )


def read_request(form: FormDef) -> forms.Parsed:
    """The submitted fields (and files), from a JSON, a form-encoded or a multipart body."""
    if request.is_json:
        return forms.read_json(request.get_data(cache=True), form)
    if request.mimetype == "multipart/form-data":
        return forms.read_multipart(request.form, request.files, form)
    if request.mimetype == "application/x-www-form-urlencoded":
        return forms.read_urlencoded(request.get_data(cache=True), form)
    return forms.Parsed(MultiDict())


def invalid(
    form: FormDef, parsed: forms.Parsed, errors: Mapping[str, list[str]], as_json: bool
) -> Response:
    if as_json:
        return json_errors(errors, 400)
    return render_form(form, parsed, errors=errors, status=422)


def success(form: FormDef, outbox_id: str, as_json: bool) -> Response:
    if as_json:
        accepted = jsonify({"id": outbox_id, "status": "queued"})
        accepted.status_code = 202
        return accepted
    # The form's thank-you URL is a page of the operator's site; inside an embedding iframe
    # our own thank-you page stays, since it keeps reporting its height to embed.js.
    if form.thanks_url and not is_embed():
        return make_response(redirect(form.thanks_url, 303))
    if form.is_default:
        target = url_for("web.thanks", **page_args())
    else:
        target = url_for("web.form_thanks", form_id=form.id, **page_args())
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
