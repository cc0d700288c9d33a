"""Sign, then deliver: one attempt of one stored message, for the worker and `relay send --now`.

The message is signed at every attempt, so a key rotation applies to mail already queued;
what it is signed and delivered with are seams (the worker's tests script the delivery).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from relay.mail.attempt import AttemptResult
from relay.settings import Settings

if TYPE_CHECKING:
    from relay.mail.conversation import BeforeDot


class DeliverFn(Protocol):
    """The signature of relay.mail.smtp.deliver (keyword arguments it may take besides)."""

    async def __call__(
        self,
        signed: bytes,
        *,
        recipient: str,
        envelope_from: str,
        settings: Settings,
        resolver: Any,
    ) -> AttemptResult: ...


class GatedDeliverFn(Protocol):
    """relay.mail.smtp.deliver with the hook it awaits before each final dot."""

    async def __call__(
        self,
        signed: bytes,
        *,
        recipient: str,
        envelope_from: str,
        settings: Settings,
        resolver: Any,
        before_dot: BeforeDot,
    ) -> AttemptResult: ...


async def sign_and_deliver(
    raw: bytes,
    *,
    recipient: str,
    envelope_from: str,
    sign: Callable[[bytes], bytes],
    deliver: DeliverFn,
    settings: Settings,
    resolver: Any,
) -> AttemptResult:
    """One attempt; never raises but CancelledError. Whatever stops it before a server was
    asked (the key cannot sign, a bug) is `AttemptResult.local_failure`: temporary, so the
    message waits for the operator's fix instead of being lost."""
    try:
        signed = await asyncio.to_thread(sign, raw)
        return await deliver(
            signed,
            recipient=recipient,
            envelope_from=envelope_from,
            settings=settings,
            resolver=resolver,
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return AttemptResult.local_failure(exc)
