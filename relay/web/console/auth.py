"""Who is signed in to the console, and the guards of every request.

Passwords are argon2 hashes (argon2-cffi, `relay admin hash-password`); an unknown user
costs the same verification as a known one. The session is Flask's signed cookie under its
own name and path (/admin), HttpOnly, Secure, SameSite=Strict; it carries the user, when
they signed in and when they were last seen (idle and absolute timeouts, checked on every
request) and a fingerprint of their hash, so a changed password signs every session out.
Every POST needs the CSRF token (Flask-WTF). Sign-in attempts are limited per client IP
with the `limits` library on the relay's rate-limit storage, under a key of their own: the
form's limits never count console requests, nor these the form's.

Behind an SSO proxy, RELAY_ADMIN_TRUSTED_HEADER names the user; it is believed only when
RELAY_TRUSTED_PROXIES says a proxy is in front and the request came from it (a loopback or
private address), never from a client on the internet.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import Flask, current_app, request, session
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from wtforms.validators import ValidationError

from relay.logs import event
from relay.settings import Settings
from relay.web import ratelimit

log = logging.getLogger("relay.console")

COOKIE = "formrelay_console"
# Where a proxy in front of the relay can be: RFC 1918 and unique-local networks (and, above,
# loopback and link-local).
PROXY_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
USER_MAX = 128


def configure_session(app: Flask, settings: Settings, path: str) -> None:
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE,
        SESSION_COOKIE_PATH=path,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_SAMESITE="Strict",
        # The session's own timeouts decide; the token lives as long as the session.
        WTF_CSRF_TIME_LIMIT=None,
    )


@dataclass
class ConsoleState:
    """Built once per app (app.extensions["formrelay_console"]). `clock` is a seam."""

    settings: Settings
    limits: list[RateLimitItem]
    limiter: MovingWindowRateLimiter
    hasher: PasswordHasher = field(default_factory=PasswordHasher)
    clock: Callable[[], float] = time.time
    verdicts: tuple[float, list[Any], str] | None = None  # (when, checks, error): a cache
    dummy_hash: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> ConsoleState:
        storage = storage_from_string(
            ratelimit.storage_uri(settings.rate_limit_storage), key_prefix="formrelay-console"
        )
        hasher = PasswordHasher()
        return cls(
            settings=settings,
            limits=list(parse_many(settings.admin_login_rate_limit)),
            limiter=MovingWindowRateLimiter(storage),
            hasher=hasher,
            dummy_hash=hasher.hash("not a password of anyone"),
        )


def console() -> ConsoleState:
    found: ConsoleState = current_app.extensions["formrelay_console"]
    return found


def _fingerprint(user: str, hashed: str) -> str:
    key = str(current_app.config["SECRET_KEY"]).encode()
    return hmac.new(key, f"{user}\0{hashed}".encode(), hashlib.sha256).hexdigest()[:32]


# --- who is it ----------------------------------------------------------------------------------


def peer_is_proxy() -> bool:
    """The direct peer (before ProxyFix rewrote it) is on this host or the private network."""
    original = request.environ.get("werkzeug.proxy_fix.orig", {}).get("REMOTE_ADDR")
    address = original or request.environ.get("REMOTE_ADDR", "")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_link_local or any(ip in net for net in PROXY_NETWORKS)


def header_user() -> str | None:
    """The SSO proxy's user, when that sign-in is configured and the request came from it."""
    settings = console().settings
    name = settings.admin_trusted_header
    if not name or settings.trusted_proxies < 1:
        return None
    value = request.headers.get(name, "").strip()
    if not value:
        return None
    if not peer_is_proxy():
        event(log, "console.header_refused", logging.WARNING, ip=request.remote_addr)
        return None
    return "".join(ch for ch in value if ch.isprintable())[:USER_MAX]


def session_user() -> str | None:
    """The signed-in user of this session, or None (never signed in, timed out, or their
    password changed); a live session is marked as seen now."""
    state = console()
    user = session.get("user")
    hashed = state.settings.admin_hashes.get(user) if isinstance(user, str) else None
    if user is None or hashed is None:
        return None
    now = state.clock()
    login_at, seen_at = float(session.get("login_at", 0)), float(session.get("seen_at", 0))
    why = None
    if not hmac.compare_digest(str(session.get("key", "")), _fingerprint(user, hashed)):
        why = "password changed"
    elif now - seen_at > state.settings.admin_idle_timeout:
        why = "idle"
    elif now - login_at > state.settings.admin_session_max:
        why = "session too old"
    if why is not None:
        event(log, "console.session_ended", user=user, reason=why)
        session.clear()
        return None
    session["seen_at"] = now
    return str(user)


def current_user() -> str | None:
    return header_user() or session_user()


# --- signing in -------------------------------------------------------------------------------


def login_allowed() -> bool:
    """One more sign-in attempt from this client IP, within RELAY_ADMIN_LOGIN_RATE_LIMIT;
    when the limit storage is down, attempts are let through (and logged), as the form's."""
    state = console()
    ip = request.remote_addr or "-"
    try:
        return all(state.limiter.hit(limit, "login", ip) for limit in state.limits)
    except Exception as exc:  # redis down: the password check still stands
        event(log, "console.limit_unavailable", logging.WARNING, error=repr(exc))
        return True


def check_password(user: str, password: str) -> bool:
    """argon2 verification; an unknown user is verified against a dummy hash (same cost)."""
    state = console()
    hashed = state.settings.admin_hashes.get(user)
    try:
        state.hasher.verify(hashed or state.dummy_hash, password)
    except (VerificationError, InvalidHashError):
        return False
    return hashed is not None


def sign_in(user: str) -> None:
    state = console()
    now = state.clock()
    session.clear()  # nothing of the anonymous session survives (fixation)
    session.update(
        user=user,
        login_at=now,
        seen_at=now,
        key=_fingerprint(user, state.settings.admin_hashes[user]),
    )


def check_csrf() -> None:
    """Every POST carries the session's token (a form field); raises CSRFError."""
    try:
        validate_csrf(request.form.get("csrf_token", ""))
    except ValidationError as exc:
        raise CSRFError(str(exc)) from exc


def csrf_token() -> str:
    return str(generate_csrf())
