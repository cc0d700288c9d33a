"""formrelay: a safe web-form-to-support email relay.

`create_app()` is the WSGI entry point (`gunicorn "relay:create_app()"`). Nothing happens at
import time: importing `relay` (which every `relay.*` import does) must stay cheap and free of
Flask, so the web application is imported only when an app is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from relay.settings import Settings
    from relay.web.captcha import Verifier


def create_app(
    settings: Settings | None = None,
    *,
    outbox: Any = None,
    resolver: Any = None,
    verifier: Verifier | None = None,
) -> Flask:
    """Build the web application (see relay.web.create_app).

    `outbox`, `resolver` and `verifier` are seams: None builds the real one from settings
    (Outbox.from_settings, mx.make_resolver, the hCaptcha client); demo mode passes its own
    offline verifier. Raises ConfigError for settings unfit to serve.

    This is the composition root: the console's SPF/DKIM/DMARC verdict is the doctor's
    (relay.ops), which the web layer may not import itself.
    """
    from relay.ops.doctor import auth_verdicts  # noqa: PLC0415 - keep `import relay` light
    from relay.web.app import create_app as build  # noqa: PLC0415

    return build(
        settings, outbox=outbox, resolver=resolver, verifier=verifier, checks=auth_verdicts
    )
