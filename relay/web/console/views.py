"""The console's pages and actions. Every action is a POST with the CSRF token, and is
logged as a `console.*` event naming who did it."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from flask import (
    Blueprint,
    Response,
    flash,
    g,
    make_response,
    redirect,
    request,
    session,
    stream_with_context,
)
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from relay.errors import MessageNotFound, StoreError
from relay.formdefs import DEFAULT_ID
from relay.logs import event
from relay.store.browse import Cursor, LogFilter, walk
from relay.store.schema import STATUSES
from relay.store.views import csv_lines, message_headers, next_try, parse_duration
from relay.web.console.auth import (
    check_csrf,
    check_password,
    console,
    current_user,
    header_user,
    login_allowed,
    sign_in,
)
from relay.web.console.render import age, body_text, curl, page, verdicts, when
from relay.web.pages import _
from relay.web.state import state

log = logging.getLogger("relay.console")

bp = Blueprint("console", __name__)

PAGE_SIZE = 50
AGES = ("1h", "1d", "7d", "30d")
OPEN = ("console.login", "console.static")


@bp.before_request
def guard() -> Response | None:
    """CSRF on every POST, then a signed-in user on every page but the sign-in page."""
    if request.method == "POST":
        check_csrf()
    if request.endpoint in OPEN:
        return None
    signed_in = current_user()
    if signed_in is None:
        if console().settings.admin_hashes:
            return go(curl("login", next=request.full_path if request.method == "GET" else None))
        return page(
            "console_message.html",
            401,
            title=_("Sign-in needed"),
            text=_("Sign in through your single sign-on, then open this page again."),
        )
    g.console_user = signed_in
    return None


@bp.errorhandler(CSRFError)
def csrf_refused(exc: CSRFError) -> Response:
    event(log, "console.csrf_refused", logging.WARNING, path=request.path, ip=request.remote_addr)
    return page(
        "console_message.html",
        400,
        title=_("Please try again"),
        text=_("This form had expired. Open the page again and repeat what you did."),
    )


@bp.errorhandler(MessageNotFound)
def not_found(exc: MessageNotFound) -> Response:
    return page(
        "console_message.html",
        404,
        title=_("Not found"),
        text=_("There is no message with the id %(id)s.", id=exc.message_id),
    )


@bp.errorhandler(StoreError)
def store_down(exc: StoreError) -> Response:
    event(log, "console.store_unavailable", logging.ERROR, error=str(exc))
    return page(
        "console_message.html",
        503,
        title=_("The store is unavailable"),
        text=_("The outbox database did not answer. Try again in a minute."),
    )


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Response:
    return page(
        "console_message.html", exc.code or 500, title=str(exc.name), text=str(exc.description)
    )


def go(url: str) -> Response:
    """303 See Other: after a POST the browser GETs the page (no resubmission)."""
    return make_response(redirect(url, 303))


def user() -> str:
    return str(g.console_user)


def acted(action: str, **fields: Any) -> None:
    event(log, f"console.{action}", user=user(), ip=request.remote_addr, **fields)


# --- signing in and out -----------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response:
    target = request.values.get("next", "")
    if not target.startswith("/admin") or target.startswith("//"):
        target = curl("log")
    if not console().settings.admin_hashes:
        return go(target)
    if request.method == "GET":
        if current_user():
            return go(target)
        return page("console_login.html", next=target)
    name = request.form.get("user", "").strip()[:128]
    if not login_allowed():
        event(log, "console.login_limited", logging.WARNING, ip=request.remote_addr)
        error = _("Too many sign-in attempts. Wait a few minutes, then try again.")
        return page("console_login.html", 429, error=error, next=target, user=name)
    if not check_password(name, request.form.get("password", "")):
        event(log, "console.login_failed", logging.WARNING, user=name, ip=request.remote_addr)
        error = _("The user name or the password is not right.")
        return page("console_login.html", 401, error=error, next=target, user=name)
    sign_in(name)
    event(log, "console.login", user=name, ip=request.remote_addr)
    return go(target)


@bp.post("/logout")
def logout() -> Response:
    acted("logout")
    session.clear()
    if header_user():
        return page(
            "console_message.html",
            200,
            title=_("Signed out"),
            text=_("Sign out of your single sign-on too."),
        )
    return go(curl("login"))


# --- the log ----------------------------------------------------------------------------------


def log_filter() -> LogFilter:
    status = request.args.get("status") or None
    since = None
    if request.args.get("age"):
        try:
            since = parse_duration(request.args["age"])
        except ValueError:
            since = None
    form = request.args.get("form") or None
    return LogFilter(
        status=status if status in STATUSES else None,
        since=since,
        text=request.args.get("q", ""),
        form=form if form in form_ids() else None,
    )


def form_ids() -> list[str]:
    """The forms the log can be filtered by: the default one and RELAY_FORMS_FILE's."""
    return [DEFAULT_ID, *state().settings.forms]


def filter_args(found: LogFilter) -> dict[str, str]:
    return {
        k: v
        for k, v in (
            ("status", found.status or ""),
            ("form", found.form or ""),
            ("age", request.args.get("age", "") if found.since else ""),
            ("q", found.query_text),
        )
        if v
    }


WORKERS_SHOWN = timedelta(days=1)  # the queue panel lists the workers that beat this long ago


@bp.get("/", endpoint="log")
def log_page() -> Response:
    store = state().outbox
    found = log_filter()
    result = store.browse(found, Cursor.decode(request.args.get("after")), PAGE_SIZE)
    stats = store.queue_stats()
    now = stats.at
    return page(
        "console_log.html",
        rows=result.rows,
        next_cursor=result.next.encode() if result.next else None,
        filter=found,
        filter_args=filter_args(found),
        statuses=STATUSES,
        forms=form_ids() if state().settings.forms else [],
        ages=AGES,
        stats=stats,
        now=now,
        age=age,
        next_try=next_try,
        deferred=stats.counts.get("deferred", 0),
        workers=store.workers.list_workers(since=WORKERS_SHOWN),
        dead_after=state().settings.worker_dead_after,
        first_page=not request.args.get("after"),
    )


@bp.get("/export.csv")
def export() -> Response:
    found = log_filter()
    acted("export", **filter_args(found))
    rows = walk(state().outbox.browse, found)
    response = Response(stream_with_context(csv_lines(rows)), mimetype="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="formrelay-log.csv"'
    return response


# --- one message ------------------------------------------------------------------------------


@bp.get("/messages/<outbox_id>")
def message(outbox_id: str) -> Response:
    store = state().outbox
    detail = store.show(outbox_id)
    checks, checks_error = verdicts()
    now = store.clock()
    return page(
        "console_message_detail.html",
        m=detail.message,
        detail=detail,
        forms=form_ids(),  # the form's id links to its log while the form is configured
        headers=message_headers(detail.body),
        text=body_text(detail.body),
        checks=checks,
        checks_error=checks_error,
        now=now,
        age=age,
        when=when,
        next_try=next_try,
    )


def _done(outbox_id: str, ok: bool, yes: str, no: str) -> Response:
    flash(yes if ok else no, "ok" if ok else "error")
    return go(curl("message", outbox_id=outbox_id))


@bp.post("/messages/<outbox_id>/retry")
def retry(outbox_id: str) -> Response:
    ok = state().outbox.retry(outbox_id)
    acted("retry", id=outbox_id, done=ok)
    return _done(
        outbox_id,
        ok,
        _("Due now: the worker sends it at its next round."),
        _("Only a failed or deferred message with its body can be sent again."),
    )


@bp.post("/messages/<outbox_id>/purge")
def purge_one(outbox_id: str) -> Response:
    ok = state().outbox.purge_message(outbox_id)
    acted("purge", id=outbox_id, done=ok)
    return _done(
        outbox_id,
        ok,
        _("The body was purged; the log entry stays."),
        _("Only a delivered or failed message's body can be purged."),
    )


@bp.post("/messages/<outbox_id>/release")
def release(outbox_id: str) -> Response:
    ok = state().outbox.release_held(outbox_id)
    acted("release", id=outbox_id, done=ok)
    return _done(outbox_id, ok, _("Released: queued for delivery."), _("This message is not held."))


@bp.post("/messages/<outbox_id>/discard")
def discard(outbox_id: str) -> Response:
    ok = state().outbox.discard_held(outbox_id)
    acted("discard", id=outbox_id, done=ok)
    if not ok:
        return _done(outbox_id, ok, "", _("This message is not held."))
    flash(_("The held message was discarded."), "ok")
    return go(curl("log", status="held"))


# --- actions on many, with a count and a confirmation -----------------------------------------


def _confirmed(count: int) -> bool:
    """The operator confirmed exactly the count they were shown (it may have changed)."""
    return request.form.get("count", "") == str(count) and request.form.get("confirm") == "yes"


@bp.route("/retry-failed", methods=["GET", "POST"])
def retry_failed() -> Response:
    store = state().outbox
    count = store.retryable_failed()
    if request.method == "POST" and _confirmed(count):
        done = store.retry_failed()
        acted("retry_failed", count=done)
        flash(_("%(n)s failed message(s) are due now.", n=done), "ok")
        return go(curl("log", status="deferred"))
    changed = request.method == "POST"
    return page(
        "console_confirm.html",
        409 if changed else 200,
        action="retry_failed",
        count=count,
        changed=changed,
        days=None,
    )


@bp.route("/purge", methods=["GET", "POST"])
def purge() -> Response:
    store = state().outbox
    try:
        days = max(0.0, float(request.values.get("days", "30")))
    except ValueError:
        days = 30.0
    count = store.purgeable(timedelta(days=days))
    if request.method == "POST" and _confirmed(count):
        done = store.purge(timedelta(days=days))
        acted("purge_older", days=f"{days:g}", count=done)
        flash(_("Purged the bodies of %(n)s message(s).", n=done), "ok")
        return go(curl("log"))
    changed = request.method == "POST"
    return page(
        "console_confirm.html",
        409 if changed else 200,
        action="purge",
        count=count,
        changed=changed,
        days=f"{days:g}",
    )


# --- alerts -----------------------------------------------------------------------------------


@bp.get("/alerts")
def alerts() -> Response:
    store = state().outbox
    return page(
        "console_alerts.html",
        alerts=store.alerts.recent(50),
        channels=state().settings.alert_channels,
        now=store.clock(),
        age=age,
        when=when,
    )
