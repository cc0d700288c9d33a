"""The operator's console at /admin: the log, a message with every attempt, retry, purge,
release and discard, the queue and the alerts. Off unless someone can sign in
(RELAY_ADMIN_USERS or RELAY_ADMIN_TRUSTED_HEADER): otherwise /admin is a 404.

`auth` signs operators in (argon2 passwords or an SSO proxy's header, the session cookie and
its timeouts, CSRF, the login rate limit); `views` are the pages and actions; `render` the
helpers they share. The console is the web layer's: it reads the store and is handed the
doctor's verdict (`WebState.checks`), never importing ops.
"""

from __future__ import annotations

from flask import Flask, Response, request

from relay.web.console.auth import ConsoleState, configure_session
from relay.web.console.views import bp
from relay.web.state import WebState

PREFIX = "/admin"


def register(app: Flask, web: WebState) -> None:
    """Mount the console on `app` when it is configured; its own session cookie and login
    limits, and none of the public form's limits."""
    if not web.settings.console_enabled:
        return
    configure_session(app, web.settings, PREFIX)
    app.extensions["formrelay_console"] = ConsoleState.from_settings(web.settings)
    web.limiter.exempt(bp)
    app.register_blueprint(bp, url_prefix=PREFIX)


def is_console_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def console_headers(response: Response) -> Response:
    """The console's own CSP: never framed, by any site (RELAY_ALLOWED_ORIGINS does not
    apply), no scripts, nothing from another origin; and never cached."""
    response.headers["Content-Security-Policy"] = "; ".join(
        [
            "default-src 'none'",
            "style-src 'self'",
            "img-src 'self' data:",
            "form-action 'self'",
            "base-uri 'none'",
            "object-src 'none'",
            "frame-ancestors 'none'",
        ]
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.is_secure:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    response.vary.add("Cookie")
    return response
