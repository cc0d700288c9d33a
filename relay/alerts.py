"""Alerts that reach a person: rules notice what went wrong, the store keeps it, channels
deliver it.

Events: a message failed for good (recorded by the outbox with the failure itself), a
message waited longer than RELAY_ALERT_QUEUE_AGE (`QueueAgeRule`), the DKIM key in DNS is
no longer ours (`DkimRule`, daily, with the doctor's check injected by ops), a service
failed (`relay alerts unit-failed`, systemd's OnFailure=). A rule is anything with a `name`,
an `interval` and an async call that returns events: `default_rules` is where one that reads
the store alone joins (`NoWorkerRule`: mail due and no worker's heartbeat).

`Dispatcher.tick()` evaluates the rules that are due, groups events into alerts
(RELAY_ALERT_GROUP_WINDOW) and sends due deliveries: `Webhook` (RELAY_ALERT_WEBHOOK_URL,
JSON with a Slack/Mattermost `text` field and the event fields) and `EmailChannel`
(RELAY_ALERT_EMAIL, a notice queued in the same outbox, which delivers and retries it like
any message). A failed send is retried with backoff for a day. The worker runs `run()` as a
task beside delivery; nothing here can hold a delivery up, and every error is logged, never
raised into the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

import httpx

from relay.errors import RelayError
from relay.logs import event
from relay.mail.message import build_notice
from relay.metrics import Metrics
from relay.settings import Settings
from relay.store.alerts import MESSAGE_FAILED, QUEUE_AGE, AlertRow, DeliveryClaim, NewEvent
from relay.store.outbox import Outbox
from relay.store.retry import RetryPolicy, human_age

log = logging.getLogger("relay.alerts")

DKIM_MISMATCH = "dkim_mismatch"
NO_WORKER = "no_worker"
UNIT_FAILED = "unit_failed"
TEST = "test"
# A send that fails is tried again after 30 s, doubling up to 30 min, for a day.
SEND_POLICY = RetryPolicy(initial=30, maximum=1800, give_up=86400)
SEND_LEASE = 60.0  # seconds a claimed delivery is ours (the webhook times out well before)
WEBHOOK_TIMEOUT = 10.0
# Kinds that never come in bursts (one event an hour at most): sent without waiting for
# RELAY_ALERT_GROUP_WINDOW, so "no worker is delivering" reaches a person within a minute.
AT_ONCE = (NO_WORKER,)
TITLES = {
    MESSAGE_FAILED: ("a message failed permanently", "{n} messages failed permanently"),
    QUEUE_AGE: ("a message has waited too long", "{n} messages have waited too long"),
    DKIM_MISMATCH: ("the DKIM key in DNS is not ours", "DKIM keys in DNS are not ours"),
    NO_WORKER: ("no worker is delivering mail", "no worker is delivering mail"),
    UNIT_FAILED: ("a formrelay service failed", "{n} formrelay service failures"),
    TEST: ("test alert: this channel works", "test alert"),
}


class ChannelError(RelayError):
    """A channel could not take the alert; the delivery is tried again later."""


class Rule(Protocol):
    name: str
    interval: float  # seconds between evaluations

    def __call__(self, store: Outbox) -> Awaitable[list[NewEvent]]: ...


class QueueAgeRule:
    """A message still undelivered after RELAY_ALERT_QUEUE_AGE (each message once)."""

    name = "queue_age"
    interval = 15.0

    def __init__(self, max_age: timedelta) -> None:
        self.max_age = max_age

    async def __call__(self, store: Outbox) -> list[NewEvent]:
        rows = await asyncio.to_thread(store.alerts.waiting_longer_than, self.max_age)
        now = store.clock()
        return [
            NewEvent(
                QUEUE_AGE,
                f"{row.id} has waited {human_age(now - row.created_at)} "
                f"(limit {human_age(self.max_age)}; {row.status}, {row.attempts} tries"
                + (f", last: {row.last_text}" if row.last_text else "")
                + ")",
                subject=row.id,
                fields={"subject": row.subject, "status": row.status},
            )
            for row in rows
        ]


class NoWorkerRule:
    """Mail has been due for RELAY_WORKER_DEAD_AFTER and no worker has sent a heartbeat
    within it (the most common way mail silently stops). One event an hour while it lasts;
    the `relay alerts check` timer is what still runs it when every worker is down."""

    name = "no_worker"
    interval = 15.0
    repeat = timedelta(hours=1)

    def __init__(self, dead_after: timedelta) -> None:
        self.dead_after = dead_after

    async def __call__(self, store: Outbox) -> list[NewEvent]:
        reason = await asyncio.to_thread(store.stalled, self.dead_after)
        if reason is None:
            return []
        if await asyncio.to_thread(store.alerts.has_event, NO_WORKER, "queue", self.repeat):
            return []
        return [NewEvent(NO_WORKER, reason, subject="queue")]


AuthCheck = Callable[[], Awaitable[Sequence[Any]]]


class DkimRule:
    """Daily: the doctor's DKIM checks (injected: `check()` returns its verdicts); a FAIL is
    an event, at most one a day per selector whichever worker finds it."""

    name = "dkim"
    interval = 86400.0

    def __init__(self, check: AuthCheck) -> None:
        self.check = check

    async def __call__(self, store: Outbox) -> list[NewEvent]:
        found = []
        for verdict in await self.check():
            if not verdict.name.startswith("dkim") or verdict.status != "FAIL":
                continue
            selector = verdict.name.partition(":")[2] or verdict.name
            if await asyncio.to_thread(
                store.alerts.has_event, DKIM_MISMATCH, selector, timedelta(hours=20)
            ):
                continue
            found.append(
                NewEvent(
                    DKIM_MISMATCH,
                    f"DKIM selector {selector}: {verdict.summary}",
                    subject=selector,
                    fields={"fix": verdict.fix},
                )
            )
        return found


def default_rules(settings: Settings) -> list[Rule]:
    """The rules that need only the store (run by every worker and `relay alerts check`)."""
    return [
        QueueAgeRule(timedelta(seconds=settings.alert_queue_age)),
        NoWorkerRule(timedelta(seconds=settings.worker_dead_after)),
    ]


# --- what an alert says -----------------------------------------------------------------------


def title(alert: AlertRow) -> str:
    one, many = TITLES.get(alert.kind, (alert.kind, f"{alert.kind} ({{n}})"))
    return (one if alert.count == 1 else many).format(n=alert.count)


def console_url(settings: Settings, alert: AlertRow) -> str | None:
    if not settings.public_url or not settings.console_enabled:
        return None
    base = settings.public_url.rstrip("/") + "/admin"
    subjects = alert.fields.get("subjects") or []
    if alert.kind in (MESSAGE_FAILED, QUEUE_AGE) and len(subjects) == 1:
        return f"{base}/messages/{subjects[0]}"
    if alert.kind == MESSAGE_FAILED:
        return f"{base}/?status=failed"
    return f"{base}/alerts"


def alert_text(settings: Settings, alert: AlertRow) -> str:
    """One paragraph: what happened, the latest detail, where to look."""
    lines = [f"formrelay ({settings.from_domain}): {title(alert)}", alert.text]
    url = console_url(settings, alert)
    if url:
        lines.append(url)
    return "\n".join(lines)


def webhook_payload(settings: Settings, alert: AlertRow) -> dict[str, Any]:
    return {
        "text": alert_text(settings, alert),
        "kind": alert.kind,
        "count": alert.count,
        "alert_id": alert.id,
        "site": settings.from_domain,
        "first_at": alert.first_at.isoformat(),
        "last_at": alert.last_at.isoformat(),
        "subjects": alert.fields.get("subjects", []),
        "events": alert.fields.get("events", []),
        "console": console_url(settings, alert),
    }


# --- channels ---------------------------------------------------------------------------------


class Webhook:
    name = "webhook"

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        assert settings.alert_webhook_url is not None
        self.settings = settings
        self.url = settings.alert_webhook_url
        self.client = client

    async def send(self, alert: AlertRow) -> str:
        payload = webhook_payload(self.settings, alert)
        try:
            if self.client is not None:
                response = await self.client.post(self.url, json=payload)
            else:
                async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT) as client:
                    response = await client.post(self.url, json=payload)
        except httpx.HTTPError as exc:
            raise ChannelError(f"{type(exc).__name__}: {exc}") from exc
        if not response.is_success:
            raise ChannelError(f"HTTP {response.status_code}: {response.text[:200]}")
        return f"HTTP {response.status_code}"


DeliverNow = Callable[[], Awaitable[bool]]


class EmailChannel:
    """A notice queued in the outbox. `deliver_now` (relay.worker.service.deliver_alert_mail, passed
    by the commands that run without a worker) delivers it at once when no worker runs."""

    name = "email"

    def __init__(
        self, settings: Settings, store: Outbox, deliver_now: DeliverNow | None = None
    ) -> None:
        assert settings.alert_email is not None
        self.settings = settings
        self.store = store
        self.address = settings.alert_email
        self.deliver_now = deliver_now

    async def send(self, alert: AlertRow) -> str:
        notice = build_notice(
            self.settings,
            to=self.address,
            subject=f"[formrelay] {title(alert)}",
            text=alert_text(self.settings, alert) + self._details(alert),
        )
        try:
            outbox_id = await asyncio.to_thread(
                self.store.enqueue,
                notice,
                metadata={"alert": str(alert.id)},
                purpose="alert",
                form_id=None,
            )
        except RelayError as exc:
            raise ChannelError(str(exc)) from exc
        if self.deliver_now is not None and await self.deliver_now():
            return f"queued {outbox_id} to {self.address}, delivered here (no worker running)"
        return f"queued {outbox_id} to {self.address}"

    @staticmethod
    def _details(alert: AlertRow) -> str:
        events = alert.fields.get("events") or []
        if len(events) <= 1:
            return "\n"
        listed = "\n".join(f"- {e.get('subject') or ''} {e.get('text', '')}" for e in events)
        return f"\n\nThe latest {len(events)}:\n{listed}\n"


Channel = Webhook | EmailChannel


def channels_for(
    settings: Settings, store: Outbox, deliver_now: DeliverNow | None = None
) -> list[Channel]:
    found: list[Channel] = []
    if settings.alert_webhook_url:
        found.append(Webhook(settings))
    if settings.alert_email:
        found.append(EmailChannel(settings, store, deliver_now))
    return found


# --- the dispatcher ---------------------------------------------------------------------------


class Dispatcher:
    """Rules → events → alerts → sends, for one store."""

    def __init__(
        self,
        store: Outbox,
        settings: Settings,
        *,
        rules: Sequence[Rule] = (),
        channels: Sequence[Channel] | None = None,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        every: float = 5.0,
        deliver_now: DeliverNow | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.rules = list(rules)
        if channels is None:
            channels = channels_for(settings, store, deliver_now)
        self.channels = {c.name: c for c in channels}
        self.metrics = metrics or Metrics()
        self.monotonic = monotonic
        self._last_run: dict[str, float] = {}
        self.window = timedelta(seconds=settings.alert_group_window)
        self.every = every  # seconds between rounds in `run`

    async def tick(self, *, all_rules: bool = False) -> None:
        """One round: due rules (all of them with `all_rules`), grouping, sending."""
        await self._evaluate(all_rules)
        made = await asyncio.to_thread(
            self.store.alerts.group, self.window, list(self.channels), at_once=AT_ONCE
        )
        for alert_id in made:
            event(log, "alert.raised", id=alert_id)
        await self.send_due()

    async def _evaluate(self, all_rules: bool) -> None:
        now = self.monotonic()
        for rule in self.rules:
            last = self._last_run.get(rule.name)
            if not all_rules and last is not None and now - last < rule.interval:
                continue
            self._last_run[rule.name] = now
            try:
                found = await rule(self.store)
                await asyncio.to_thread(self.store.alerts.record, found)
            except Exception as exc:  # a broken rule must not stop the others
                event(log, "alert.rule_failed", logging.WARNING, rule=rule.name, error=repr(exc))

    async def send_due(self, *, alert_id: int | None = None, retry: bool = True) -> list[str]:
        """Send every due delivery (of `alert_id` only, when given); one line per send."""
        claims = await asyncio.to_thread(self.store.alerts.claim, SEND_LEASE, alert_id=alert_id)
        return [await self._send(claim, retry=retry) for claim in claims]

    async def _send(self, claim: DeliveryClaim, *, retry: bool) -> str:
        channel = self.channels.get(claim.channel)
        if channel is None:
            error = f"the {claim.channel} channel is no longer configured"
            return await self._not_sent(claim, error, retry=False)
        try:
            result = await channel.send(claim.alert)
        except RelayError as exc:  # ChannelError, MessageError from the notice
            return await self._not_sent(claim, str(exc), retry=retry)
        await asyncio.to_thread(self.store.alerts.sent, claim.id)
        self.metrics.alert_sends.labels(claim.channel, "sent").inc()
        event(log, "alert.sent", id=claim.alert.id, kind=claim.alert.kind, channel=claim.channel)
        return f"{claim.channel}: sent ({result})"

    async def _not_sent(self, claim: DeliveryClaim, error: str, *, retry: bool) -> str:
        age = (self.store.clock() - claim.alert.created_at).total_seconds()
        retry_at = None
        if retry and age < SEND_POLICY.give_up:
            retry_at = self.store.clock() + timedelta(seconds=SEND_POLICY.delay(claim.attempt))
        await asyncio.to_thread(self.store.alerts.not_sent, claim.id, error, retry_at)
        result = "retry" if retry_at else "failed"
        self.metrics.alert_sends.labels(claim.channel, result).inc()
        event(
            log,
            "alert.send_failed",
            logging.WARNING if retry_at else logging.ERROR,
            id=claim.alert.id,
            channel=claim.channel,
            error=error,
            retry_at=retry_at.isoformat(timespec="seconds") if retry_at else None,
        )
        return f"{claim.channel}: NOT sent ({error})"

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop` is set; a failing round is logged and the next one comes."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as exc:  # StoreUnavailable and the like: try again next round
                event(log, "alert.tick_failed", logging.WARNING, error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.every)

    async def send_direct(self, channel: Channel, alert: AlertRow) -> list[str]:
        """Send outside the store (it is down): once, nothing kept."""
        try:
            return [f"{channel.name}: sent ({await channel.send(alert)}) without the store"]
        except ChannelError as exc:
            return [f"{channel.name}: NOT sent ({exc})"]

    async def test(self) -> list[str]:
        """`relay alerts test`: one alert sent at once on every channel, no retry."""
        alert_id = await asyncio.to_thread(
            self.store.alerts.create,
            NewEvent(TEST, "sent by `relay alerts test`: nothing is wrong"),
            list(self.channels),
        )
        return await self.send_due(alert_id=alert_id, retry=False)
