"""What the views need, built once per app by create_app (app.extensions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app
from flask_limiter import Limiter

from relay.config import Settings
from relay.web.captcha import Verifier


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
