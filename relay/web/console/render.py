"""What the console's pages share: links that keep the language, times, the message text as
the helpdesk shows it, the doctor's verdict (cached) and the page frame."""

from __future__ import annotations

import email.policy
import logging
from datetime import datetime
from email.parser import BytesParser
from typing import Any

from flask import Response, make_response, render_template, request, url_for

from relay.logs import event
from relay.store.retry import human_age
from relay.web.console.auth import console, csrf_token
from relay.web.i18n import lazy_gettext as _l
from relay.web.pages import csp_nonce, select_locale
from relay.web.state import state

log = logging.getLogger("relay.console")

# Words the templates translate by value (`_(row.status)`), listed here for pybabel.
WORDS = (
    _l("queued"),
    _l("sending"),
    _l("deferred"),
    _l("delivered"),
    _l("failed"),
    _l("held"),
    _l("temporary"),
    _l("permanent"),
    _l("interrupted"),
    _l("pending"),
    _l("sent"),
)
VERDICT_TTL = 300.0  # seconds the doctor's verdict is kept: DNS answers do not change faster


def curl(endpoint: str, **values: Any) -> str:
    """url_for within the console, keeping the language the operator chose."""
    lang = request.args.get("lang") or request.form.get("lang")
    if lang in ("en", "ja") and "lang" not in values:
        values["lang"] = lang
    return url_for(
        f"console.{endpoint}", **{k: v for k, v in values.items() if v not in (None, "")}
    )


def age(moment: datetime | None, now: datetime) -> str:
    return human_age(now - moment) if moment else "-"


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def body_text(body: bytes | None) -> str | None:
    """The text/plain content as the helpdesk will display it (decoded; the template
    escapes it): None when the body was purged."""
    if body is None:
        return None
    message = BytesParser(policy=email.policy.default).parsebytes(body)
    part = message.get_body(preferencelist=("plain",))
    if part is None:
        return ""
    content = part.get_content()
    return str(content).replace("\r\n", "\n")


def verdicts() -> tuple[list[Any], str]:
    """(checks, error): SPF, DKIM, DMARC and alignment as `relay doctor` gives them now, at
    most VERDICT_TTL old; empty with a reason when the app was given no doctor."""
    web, cs = state(), console()
    if web.checks is None:
        return [], "not available: this app was built without the doctor's checks"
    now = cs.clock()
    if cs.verdicts is not None and now - cs.verdicts[0] < VERDICT_TTL:
        return cs.verdicts[1], cs.verdicts[2]
    try:
        checks, error = list(web.checks(web.settings)), ""
    except Exception as exc:  # DNS broken, a bug: the page still shows the message
        event(log, "console.checks_failed", logging.WARNING, error=repr(exc))
        checks, error = [], f"the checks could not run: {type(exc).__name__}: {exc}"
    cs.verdicts = (now, checks, error)
    return checks, error


def page(template: str, status: int = 200, **context: Any) -> Response:
    lang = select_locale()
    other = "ja" if lang == "en" else "en"
    args = (
        {**request.view_args, **request.args.to_dict()} if request.view_args else dict(request.args)
    )
    args["lang"] = other
    switch = url_for(request.endpoint or "console.log", **args) if request.method == "GET" else None
    html = render_template(
        template,
        lang=lang,
        other_lang=other,
        switch_url=switch,
        nonce=csp_nonce(),
        csrf_token=csrf_token(),
        site_name=state().settings.site_name,
        curl=curl,
        lang_arg=request.args.get("lang") or request.form.get("lang") or "",
        **context,
    )
    return make_response(html, status)
