"""The group commit of ended attempts: every attempt that ended within a few milliseconds of
the first one, plus those that end while that commit runs, is recorded in one transaction
(`Outbox.record_attempts`), one fsync for all.

An attempt's task waits for its outcome's commit and keeps its slot and its lease until then,
so a crash before the commit loses nothing: the message is claimed again as a possible
duplicate. A failed group is retried attempt by attempt (`record`); a stop commits what is
waiting, within WRITER_CLOSE_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from relay.errors import StoreUnavailable
from relay.logs import event
from relay.store.outbox import Outbox
from relay.store.records import Finished
from relay.store.retry import Decision, RetryPolicy

log = logging.getLogger("relay.worker")

WRITER_CLOSE_TIMEOUT = 10.0  # seconds a stop waits for the last outcomes to be committed
RECORD_TRIES = 3  # the group commit, then twice on its own


@dataclass
class _Outcome:
    """An ended attempt waiting for the writer; `done` gets its Decision once committed."""

    finished: Finished
    done: asyncio.Future[Decision]


class OutcomeWriter:
    """Records the attempts of one worker (`owner`); `run()` is its task."""

    def __init__(
        self,
        outbox: Outbox,
        owner: str,
        policy: RetryPolicy,
        *,
        window: float,
        in_flight: Callable[[], int],
    ) -> None:
        self.outbox = outbox
        self.owner = owner
        self.policy = policy
        self.window = window
        self.in_flight = in_flight  # attempts still running: worth waiting `window` for
        self.commits = 0  # transactions that recorded outcomes (tests: batching)
        self._waiting: list[_Outcome] = []
        self._ready = asyncio.Event()
        self._closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            if self.window > 0 and self.in_flight() > len(self._waiting):
                # They may end within the window; a stop cuts it short.
                await asyncio.wait([self._closing], timeout=self.window)
            self._ready.clear()
            batch, self._waiting = self._waiting, []
            if batch:
                await self._commit(batch)
            if self._closing.done() and not self._waiting:
                return  # the stop's wake-up may have been spent on the batch just committed

    async def _commit(self, batch: list[_Outcome]) -> None:
        try:
            decisions = await asyncio.to_thread(
                self.outbox.record_attempts,
                [outcome.finished for outcome in batch],
                owner=self.owner,
                policy=self.policy,
            )
        except Exception as exc:  # StoreUnavailable: each attempt retries on its own
            for outcome in batch:
                if not outcome.done.done():
                    outcome.done.set_exception(exc)
            return
        self.commits += 1
        for outcome, decision in zip(batch, decisions, strict=True):
            if not outcome.done.done():
                outcome.done.set_result(decision)

    async def record(
        self, finished: Finished, *, late: Callable[[Decision], None]
    ) -> Decision | None:
        """Store the attempt through the group commit; if that fails, try twice more on its
        own, then give up (None): the message stays leased to this worker, which no longer
        holds it, and the heartbeat hands it back after DEAD_AFTER (leases, strays).
        `late(decision)`: for an attempt cut off while it waited, once the writer has
        committed it after all."""
        for tries in range(RECORD_TRIES):
            try:
                if tries == 0:
                    return await self._group(finished, late)
                return await asyncio.to_thread(
                    self.outbox.record_attempt,
                    finished.claimed,
                    finished.result,
                    owner=self.owner,
                    policy=self.policy,
                    started_at=finished.started_at,
                    finished_at=finished.finished_at,
                )
            except StoreUnavailable as exc:
                event(
                    log,
                    "delivery.record_failed",
                    logging.ERROR,
                    id=finished.claimed.id,
                    outcome=finished.result.outcome,
                    error=str(exc),
                    tries=tries + 1,
                )
                await asyncio.sleep(1.0 + tries)
        return None

    async def _group(self, finished: Finished, late: Callable[[Decision], None]) -> Decision:
        done: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Outcome(finished, done))
        self._ready.set()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.cancelled():  # cut off while waiting: the writer still commits it
                done.add_done_callback(lambda fut: _call_late(fut, late))
            raise

    async def close(self, task: asyncio.Task[None]) -> None:
        """Commit the outcomes still waiting (also those of attempts cut off while they
        waited for the commit), then stop the writer's `task`."""
        self._closing.set_result(None)
        self._ready.set()
        try:  # within the 15 s that TimeoutStopSec allows beyond the stop timeout
            await asyncio.wait_for(asyncio.shield(task), timeout=WRITER_CLOSE_TIMEOUT)
        except TimeoutError:  # the store hangs: what is left is reclaimed by another worker
            event(log, "worker.record_timeout", logging.ERROR, pending=len(self._waiting))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for outcome in self._waiting:
            outcome.done.cancel()
        self._waiting = []


def _call_late(fut: asyncio.Future[Decision], late: Callable[[Decision], None]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        late(fut.result())
