"""One accept pipeline, for `POST /form` and `relay send`: validate (no network) → CAPTCHA (the
web's only) → the address's domain in DNS → build → hold → enqueue.

Cheapest and local first: a post with a bad or missing CAPTCHA (a spam burst) is refused after
one siteverify call, with no DNS query and no store; and siteverify is asked only about a
form that is valid as far as can be told without the network, so a typo never spends the
visitor's token (a domain that does not accept mail does, after the CAPTCHA has passed).

Each step that refuses raises `Refused` with the visitor's errors by field, so the form and
the command report the same problems in the same words; a store that cannot commit raises
StoreUnavailable (the web answers 503, the command exits 1) and nothing was accepted. The
outbox id comes back only after the commit: nothing accepted is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from relay.errors import CaptchaError, MessageError
from relay.formdefs import FormDef, render_subject
from relay.holdrules import held_by
from relay.mail.message import BuiltMessage, Submission, build_message
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.web import forms
from relay.web.captcha import MISSING
from relay.web.i18n import lazy_gettext as _l
from relay.web.uploads import Upload

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


@dataclass(frozen=True)
class Prepared:
    built: BuiltMessage
    clean: forms.Clean


def prepare(
    data: Mapping[str, str],
    *,
    settings: Settings,
    resolver: Any,
    metadata: Mapping[str, str],
    form: FormDef | None = None,
    errors: Mapping[str, list[str]] | None = None,
    files: Mapping[str, list[Upload]] | None = None,
    captcha: Callable[[], None] | None = None,
) -> BuiltMessage:
    """Validate, check the CAPTCHA (when given: it raises CaptchaError) and build the message.

    `form` is the definition the data answers (default: the one at /form); `errors` are
    problems found while reading the request; `metadata` goes into the message for the
    support team. With `captcha`, the token is validated with the other fields (a missing
    one is a field error beside theirs) and `captcha` runs only when all are valid, so a
    typo never spends the visitor's token."""
    return _prepare(data, settings, resolver, metadata, form, errors, files, captcha).built


def _prepare(  # noqa: PLR0917 - the steps' inputs, passed through
    data: Mapping[str, str],
    settings: Settings,
    resolver: Any,
    metadata: Mapping[str, str],
    form: FormDef | None,
    errors: Mapping[str, list[str]] | None,
    files: Mapping[str, list[Upload]] | None,
    captcha: Callable[[], None] | None,
) -> Prepared:
    form = form or settings.default_form
    clean, found = forms.validate(
        data,
        settings,
        form=form,
        errors=errors,
        files=files,
        captcha=captcha is not None,
    )
    if clean is None:
        raise Refused("invalid", found)
    if captcha is not None:
        try:
            captcha()
        except CaptchaError as exc:
            raise Refused("captcha", {forms.CAPTCHA: [captcha_message(exc)]}, exc) from exc
    problem = forms.domain_problem(clean.email, resolver)
    if problem is not None:
        raise Refused("invalid", {form.email_field: problem})
    try:
        return Prepared(build_message(submission(form, clean, metadata), settings), clean)
    except MessageError as exc:
        text = str(_l("We could not accept this message. Please check it."))
        raise Refused("unbuildable", {"form": [text]}, exc) from exc


def submission(form: FormDef, clean: forms.Clean, metadata: Mapping[str, str]) -> Submission:
    """The message's content: the default form's four fields as they always were; another
    form's fields listed with their labels in its language, its subject from its template,
    its address, its name and its files."""
    if form.is_default:
        return Submission(
            name=clean.name,
            email=clean.email,
            subject=clean.subject,
            message=clean.message,
            metadata=metadata,
        )
    listed = [
        (spec.label_in(form.language), clean.values.get(spec.name, ""), spec.multiline)
        for spec in form.fields
        if spec.type not in ("email", "file") and not (spec.name == "name" and spec.type == "text")
    ]
    return Submission(
        name=clean.name,
        email=clean.email,
        subject=render_subject(form.subject, clean.values),
        message="",
        metadata=metadata,
        recipient=form.support_address,
        site_name=form.from_name or None,
        form_id=form.id,
        fields=listed,
        attachments=clean.files,
    )


def accept(
    data: Mapping[str, str],
    *,
    settings: Settings,
    resolver: Any,
    outbox: Outbox,
    metadata: Mapping[str, str],
    form: FormDef | None = None,
    log_metadata: Mapping[str, str] | None = None,
    errors: Mapping[str, list[str]] | None = None,
    files: Mapping[str, list[Upload]] | None = None,
    captcha: Callable[[], None] | None = None,
) -> Accepted:
    """`prepare`, then commit the message (its files inside it) to the outbox in one row:
    durable before the visitor hears yes, purged with it. `log_metadata` (default: the
    message's) is what the operator's log keeps beside it."""
    form = form or settings.default_form
    prepared = _prepare(data, settings, resolver, metadata, form, errors, files, captcha)
    held = hold(hold_view(form, prepared), settings)
    outbox_id = outbox.enqueue(
        prepared.built,
        metadata=log_metadata if log_metadata is not None else metadata,
        held_by=held,
        form_id=form.id,
    )
    return Accepted(str(outbox_id), prepared.built.message_id, held)


def hold_view(form: FormDef, prepared: Prepared) -> dict[str, str]:
    """What the hold rules read (name, email, subject, message) for any form: another
    form's fields but the address are its "message"."""
    clean = prepared.clean
    if form.is_default:
        return {
            "name": clean.name,
            "email": clean.email,
            "subject": clean.subject,
            "message": clean.message,
        }
    others = [
        clean.values.get(spec.name, "")
        for spec in form.fields
        if spec.type not in ("email", "file") and spec.name != "name"
    ]
    return {
        "name": clean.name,
        "email": clean.email,
        "subject": prepared.built.subject,
        "message": "\n".join(v for v in others if v),
    }


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
