"""The retry schedule: what becomes of a message after an attempt. Pure functions.

The next attempt time is persisted with the message, so a restarted worker keeps the
schedule; the decision reads the attempt's outcome, the message's age and the attempt
number, never the reply's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from relay.settings import Settings
from relay.store.schema import Status


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter from `initial` up to `maximum`; fail past `give_up` age."""

    initial: float = 300
    maximum: float = 3600
    give_up: float = 432000

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_initial, settings.retry_max, settings.retry_give_up)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based), from tenacity's
        wait_exponential_jitter called as a pure function of the attempt number."""
        wait = wait_exponential_jitter(
            multiplier=self.initial, max=self.maximum, jitter=self.initial * 0.2
        )
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = max(1, attempt)
        return float(wait(state))


@dataclass(frozen=True)
class Decision:
    status: Status
    next_attempt_at: datetime | None = None
    reason: str | None = None
    applied: bool = True  # False: another worker had taken the message over meanwhile


def decide(
    outcome: str,
    *,
    attempt: int,
    created_at: datetime,
    now: datetime,
    policy: RetryPolicy,
    summary: str = "",
) -> Decision:
    """What becomes of a message after attempt number `attempt` ended with `outcome`."""
    if outcome == "delivered":
        return Decision("delivered")
    if outcome == "permanent":
        return Decision("failed", reason=f"permanent failure: {summary}".rstrip(": "))
    deadline = created_at + timedelta(seconds=policy.give_up)
    if now >= deadline:
        return Decision(
            "failed",
            reason=f"gave up after {attempt} attempts over {human_age(now - created_at)}: "
            f"{summary}".rstrip(": "),
        )
    # The last try happens at the deadline rather than never.
    next_at = min(now + timedelta(seconds=policy.delay(attempt)), deadline)
    return Decision("deferred", next_attempt_at=next_at)


def human_age(delta: timedelta) -> str:
    """ "45s", "3m", "2h", "4d": the one largest unit, for a readable log."""
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{sign}{seconds // size}{unit}"
    return f"{sign}{seconds}s"
