"""One accept pipeline, for `POST /form` and `relay send`: validate → CAPTCHA (the web's
only) → build → hold → enqueue.

Each step that refuses raises `Refused` with the visitor's errors by field, so the form and
the command report the same problems in the same words; a store that cannot commit raises
StoreUnavailable (the web answers 503, the command exits 1) and nothing was accepted. The
outbox id comes back only after the commit: nothing accepted is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from flask_babel import lazy_gettext as _l

from relay.config import Settings
from relay.errors import CaptchaError, MessageError
from relay.holdrules import held_by
from relay.mail.message import BuiltMessage, Submission, build_message
from relay.store.outbox import Outbox
from relay.web import forms
from relay.web.captcha import MISSING

Step = Literal["invalid", "captcha", "unbuildable"]


class Refused(Exception):
    """The submission was not accepted at `step`: `errors` maps each field (or "form") to the
    messages for the visitor; `cause` is the CaptchaError or MessageError behind it."""

    def __init__(
        self, step: Step, errors: Mapping[str, list[str]], cause: Exception | None = None
    ) -> None:
        self.step = step
        self.errors = {name: list(messages) for name, messages in errors.items()}
        self.cause = cause
        super().__init__(f"{step}: " + ", ".join(sorted(self.errors)))

    def lines(self) -> list[str]:
        """ "field: message", one per problem (for the command line)."""
        return [f"{name}: {message}" for name, items in self.errors.items() for message in items]


@dataclass(frozen=True)
class Accepted:
    id: str
    message_id: str
    held_by: str | None = None  # the hold rule that matched: stored, not sent


def prepare(
    data: Mapping[str, str],
    *,
    settings: Settings,
    resolver: Any,
    metadata: Mapping[str, str],
    errors: Mapping[str, list[str]] | None = None,
    captcha: Callable[[], None] | None = None,
) -> BuiltMessage:
    """Validate, check the CAPTCHA (when given: it raises CaptchaError) and build the message.

    `errors` are problems found while reading the request; `metadata` goes into the message
    for the support team. With `captcha`, the token is validated with the other fields (a
    missing one is a field error beside theirs) and `captcha` runs only when all are valid,
    so a typo never spends the visitor's token."""
    clean, found = forms.validate(
        data, settings, resolver, errors=errors, captcha=captcha is not None
    )
    if clean is None:
        raise Refused("invalid", found)
    if captcha is not None:
        try:
            captcha()
        except CaptchaError as exc:
            raise Refused("captcha", {forms.CAPTCHA: [captcha_message(exc)]}, exc) from exc
    try:
        return build_message(
            Submission(
                name=clean.name,
                email=clean.email,
                subject=clean.subject,
                message=clean.message,
                metadata=metadata,
            ),
            settings,
        )
    except MessageError as exc:
        text = str(_l("We could not accept this message. Please check it."))
        raise Refused("unbuildable", {"form": [text]}, exc) from exc


def accept(
    data: Mapping[str, str],
    *,
    settings: Settings,
    resolver: Any,
    outbox: Outbox,
    metadata: Mapping[str, str],
    log_metadata: Mapping[str, str] | None = None,
    errors: Mapping[str, list[str]] | None = None,
    captcha: Callable[[], None] | None = None,
) -> Accepted:
    """`prepare`, then commit the message to the outbox; `log_metadata` (default: the
    message's) is what the operator's log keeps beside it."""
    built = prepare(
        data,
        settings=settings,
        resolver=resolver,
        metadata=metadata,
        errors=errors,
        captcha=captcha,
    )
    held = hold(data, settings)
    outbox_id = outbox.enqueue(
        built, metadata=log_metadata if log_metadata is not None else metadata, held_by=held
    )
    return Accepted(str(outbox_id), built.message_id, held)


def hold(data: Mapping[str, str], settings: Settings) -> str | None:
    """The operator's hold rules (RELAY_HOLD_RULES_FILE): the first one the submission
    matches, or None. A held submission is accepted like any other, so the visitor (or
    bot) sees the normal success."""
    return held_by(settings.hold_rules, data) if settings.hold_rules is not None else None


def captcha_message(exc: CaptchaError) -> str:
    if exc.retryable:
        return str(_l("We could not check the CAPTCHA just now. Please try again."))
    if MISSING in exc.codes:
        return str(forms.CAPTCHA_MISSING)
    return str(forms.CAPTCHA_FAILED)
