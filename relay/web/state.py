"""What the views need, built once per app by create_app (app.extensions), and the form a
request is about."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import current_app, request
from flask_limiter import Limiter
from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from werkzeug.exceptions import TooManyRequests

from relay.formdefs import FormDef
from relay.logs import event
from relay.metrics import Metrics
from relay.settings import Settings
from relay.web import ratelimit
from relay.web.captcha import Verifier

log = logging.getLogger("relay.web")

# The deliverability verdict the console shows on a message (SPF, DKIM, DMARC, alignment as
# `relay doctor` gives it now): injected, since the web layer may not import ops. Each item
# has .name, .status ("PASS", "WARN", "FAIL"), .summary and .fix.
Checks = Callable[[Settings], Sequence[Any]]

FORM_ENDPOINTS = ("web.custom_form", "web.form_thanks")
DEFAULT_ENDPOINTS = ("web.form", "web.thanks")


@dataclass(frozen=True)
class FormLimits:
    """Each form's own `rate_limit` (RELAY_FORMS_FILE), per client IP, on top of
    RELAY_RATE_LIMIT: the `limits` engine on the same storage, under a key of its own."""

    limiter: MovingWindowRateLimiter | None = None
    by_form: Mapping[str, list[RateLimitItem]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> FormLimits:
        by_form = {
            form.id: list(parse_many(form.rate_limit))
            for form in settings.forms.values()
            if form.rate_limit
        }
        if not by_form:
            return cls()
        storage = storage_from_string(
            ratelimit.storage_uri(settings.rate_limit_storage), key_prefix="formrelay-forms"
        )
        return cls(MovingWindowRateLimiter(storage), by_form)


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
    metrics: Metrics = field(default_factory=Metrics)
    checks: Checks | None = None
    form_limits: FormLimits = field(default_factory=FormLimits)


def state() -> WebState:
    web_state: WebState = current_app.extensions["formrelay"]
    return web_state


def current_form() -> FormDef | None:
    """The form this request is about: /form and /thanks are the default one's, /f/<id>
    and /f/<id>/thanks that form's; None for an unknown id or another route."""
    if request.endpoint in DEFAULT_ENDPOINTS:
        return state().settings.default_form
    if request.endpoint in FORM_ENDPOINTS:
        form_id = str((request.view_args or {}).get("form_id", ""))
        found: FormDef | None = state().settings.forms.get(form_id)
        return found
    return None


def allowed_origins(form: FormDef) -> frozenset[str]:
    """The origins that may frame and post `form`: its own, or RELAY_ALLOWED_ORIGINS."""
    if form.allowed_origins is None:
        return state().allowed_origins
    return frozenset(form.allowed_origins)


def form_limit_allows(form: FormDef) -> None:
    """Count this submission against the form's own rate limit; 429 past it. When the
    limit storage is down, submissions are let through (and logged), as Flask-Limiter does."""
    limits = state().form_limits
    items = limits.by_form.get(form.id)
    if not items or limits.limiter is None:
        return
    ip = request.remote_addr or "-"
    try:
        breached = next((i for i in items if not limits.limiter.hit(i, form.id, ip)), None)
        if breached is not None:
            reset, _remaining = limits.limiter.get_window_stats(breached, form.id, ip)
    except Exception as exc:  # redis down
        event(log, "form.limit_unavailable", logging.WARNING, error=repr(exc), form=form.id)
        return
    if breached is not None:
        wait = max(1, int(reset - time.time()))
        raise TooManyRequests(f"{breached} on form {form.id}", retry_after=wait)
