"""The page's translations, looked up once per request.

Flask-Babel finds its domain, its locale and the catalogue through `g` at every string (three
context lookups and a cache key each); a form page asks for about twenty-five strings, which
made the refusal page of a spam burst spend a fifth of its time there. Here the catalogue is
found once per request, through Flask-Babel, and kept on `g`. The strings, the catalogues,
the locale selector and the extraction keywords (`_`, `_l`) are Flask-Babel's as before.
"""

from __future__ import annotations

from typing import Any

import flask_babel
from babel.support import NullTranslations
from flask import Flask, g, has_app_context
from flask_babel.speaklater import LazyString
from jinja2 import pass_eval_context
from jinja2.nodes import EvalContext
from markupsafe import Markup


def translations() -> NullTranslations:
    """This request's catalogue (outside any app context, Flask-Babel's null catalogue)."""
    if not has_app_context():
        found: NullTranslations = flask_babel.get_translations()
        return found
    found = g.get("relay_translations")
    if found is None:
        found = g.relay_translations = flask_babel.get_translations()
    return found


def gettext(text: str, **variables: Any) -> str:
    """As flask_babel.gettext: the translation, %-formatted only when given variables."""
    translated = translations().ugettext(text)
    return translated % variables if variables else translated


def lazy_gettext(text: str, **variables: Any) -> LazyString:
    """As flask_babel.lazy_gettext (translated when made a string), through `gettext`."""
    return LazyString(gettext, text, **variables)


@pass_eval_context
def _template_gettext(eval_ctx: EvalContext, string: str, **variables: Any) -> str:
    """Jinja's "newstyle" gettext in one call instead of three: in an autoescaped template
    the translation is markup and the variables are escaped into it; always %-formatted."""
    translated: str = translations().ugettext(string)
    if eval_ctx.autoescape:
        translated = Markup(translated)  # noqa: S704 - our own catalogue, as Jinja's newstyle
    return translated % variables


def install(app: Flask) -> None:
    """Point the templates' `_`/`gettext` at this request's catalogue (after Babel(app),
    whose i18n extension stays for ngettext and extraction)."""
    app.jinja_env.install_gettext_callables(  # type: ignore[attr-defined]
        gettext=lambda s: translations().ugettext(s),
        ngettext=lambda s, p, n: translations().ungettext(s, p, n),
        pgettext=lambda c, s: translations().upgettext(c, s),
        npgettext=lambda c, s, p, n: translations().unpgettext(c, s, p, n),
        newstyle=True,
    )
    app.jinja_env.globals.update(gettext=_template_gettext, _=_template_gettext)
