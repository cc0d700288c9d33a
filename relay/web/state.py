"""What the views need, built once per app by create_app (app.extensions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from flask_limiter import Limiter

from relay.config import Settings
from relay.metrics import Metrics
from relay.web.captcha import Verifier

# The deliverability verdict the console shows on a message (SPF, DKIM, DMARC, alignment as
# `relay doctor` gives it now): injected, since the web layer may not import ops. Each item
# has .name, .status ("PASS", "WARN", "FAIL"), .summary and .fix.
Checks = Callable[[Settings], Sequence[Any]]


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


def state() -> WebState:
    web_state: WebState = current_app.extensions["formrelay"]
    return web_state
