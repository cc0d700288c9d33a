"""The application factory: every resource (store, resolver, verifier, limiter, Babel) is
built per app, nothing at import time. `gunicorn "relay:create_app()"` reads the settings from
the environment; the CLI, the demo and the tests pass their own."""

from __future__ import annotations

import functools
import logging
import secrets
from typing import Any

from flask import Flask
from flask_babel import Babel
from flask_limiter import ApplicationLimit, Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from relay import logs
from relay.config import hcaptcha_keys, load_settings
from relay.logs import event
from relay.mail.mx import make_resolver
from relay.metrics import Metrics
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.web import console, forms, i18n, ratelimit
from relay.web.body import BodyReader, close_body, limit_for, refuse_unread_body
from relay.web.captcha import HCaptchaVerifier, Verifier
from relay.web.handlers import (
    everyone,
    handle_http_error,
    handle_unexpected,
    not_post,
    security_headers,
)
from relay.web.origins import origin_of
from relay.web.pages import STATIC, TEMPLATES, TRANSLATIONS, select_locale
from relay.web.state import Checks, FormLimits, WebState
from relay.web.views import bp

log = logging.getLogger("relay.web")


def create_app(
    settings: Settings | None = None,
    *,
    outbox: Any = None,
    resolver: Any = None,
    verifier: Verifier | None = None,
    checks: Checks | None = None,
) -> Flask:
    """Build the app; `outbox`, `resolver` and `verifier` are seams (None: the real one);
    `checks` gives the console the doctor's verdict (None: the console says it has none)."""
    if settings is None:
        settings = _settings_from_environment()
    sitekey, _secret = hcaptcha_keys(settings)  # ConfigError for test keys outside development

    app = Flask("relay", template_folder=str(TEMPLATES), static_folder=str(STATIC))
    app.config.update(
        SECRET_KEY=(
            settings.secret_key.get_secret_value()
            if settings.secret_key
            else secrets.token_urlsafe(48)
        ),
        BABEL_TRANSLATION_DIRECTORIES=str(TRANSLATIONS),
        BABEL_DEFAULT_LOCALE="en",
        WTF_CSRF_ENABLED=False,
    )
    # Every body is read whole, capped (per form) and timed before Flask sees it
    # (relay/web/body.py).
    app.wsgi_app = BodyReader(  # type: ignore[method-assign]
        app.wsgi_app,
        timeout=settings.body_timeout,
        limit=functools.partial(limit_for, forms_by_id=settings.forms),
    )
    app.before_request(refuse_unread_body)  # first: before the rate limiter counts the post
    app.teardown_request(close_body)
    if settings.trusted_proxies:
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]

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
        limiter=_limiter(app, settings),
        metrics=Metrics(),
        checks=checks,
        form_limits=FormLimits.from_settings(settings),
    )

    Babel(app, locale_selector=select_locale)
    i18n.install(app)
    app.register_blueprint(bp)
    console.register(app, app.extensions["formrelay"])
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected)
    app.after_request(security_headers)
    return app


def _settings_from_environment() -> Settings:
    """The process entry point (gunicorn "relay:create_app()"): settings and logging are ours
    to set up. A caller passing settings (CLI, demo, tests) owns its logging."""
    settings = load_settings()
    if not logging.getLogger("relay").handlers:
        logs.configure(settings.log_level)
    for warning in settings.warnings:
        event(log, "config.warning", logging.WARNING, warning=warning)
    return settings


def _limiter(app: Flask, settings: Settings) -> Limiter:
    """Per-client and global limits on submissions only (pages and preflights are free)."""
    return Limiter(
        get_remote_address,
        app=app,
        default_limits=[settings.rate_limit],
        default_limits_exempt_when=not_post,
        application_limits=[
            ApplicationLimit(
                settings.rate_limit_global, key_function=everyone, exempt_when=not_post
            )
        ],
        storage_uri=ratelimit.storage_uri(settings.rate_limit_storage),
        headers_enabled=False,
        swallow_errors=True,
        in_memory_fallback_enabled=True,
        key_prefix="formrelay",
        strategy="moving-window",
    )
