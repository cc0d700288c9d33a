"""Group commit for enqueue: concurrent enqueues of one process share one transaction.

One fsync on SQLite, one round trip to COMMIT on PostgreSQL, for every row that arrived
while the previous group was committing. A caller is answered only after the COMMIT that
holds its row; a call alone does not wait. One leader thread at a time commits, so on SQLite
a process's accepting threads queue here instead of in the busy handler's sleeps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from relay.errors import StoreUnavailable
from relay.logs import event
from relay.store.engine import Database, replayed

log = logging.getLogger("relay.outbox")

GROUP_MAX = 64  # rows in one transaction (a process has a few threads)

Insert = Callable[[Connection, Sequence[dict[str, Any]]], None]


@dataclass(eq=False)
class _Waiting:
    """A caller waiting for the group transaction that holds its row."""

    row: dict[str, Any]
    woken: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # commits the next group
    committed: bool = False
    alone: bool = False  # its group failed before COMMIT: store it in a transaction of its own
    error: BaseException | None = None


class _GroupFailure(Exception):
    """The group transaction failed at `stage`; before "commit" nothing was written."""

    def __init__(self, stage: Literal["begin", "insert", "commit"], error: BaseException) -> None:
        self.stage = stage
        self.error = error
        invalidated = isinstance(error, DBAPIError) and error.connection_invalidated
        self.stale = stage != "commit" and invalidated
        super().__init__(f"{stage}: {error}")


class GroupCommit:
    """Writes rows with `insert`, sharing transactions between concurrent callers."""

    def __init__(self, db: Database, insert: Insert, *, group_max: int = GROUP_MAX) -> None:
        self.db = db
        self.insert = insert
        self.group_max = group_max
        self._mutex = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._leading = False  # a leader thread is committing

    @property
    def leading(self) -> bool:
        """A leader thread is committing a group."""
        with self._mutex:
            return self._leading

    @property
    def waiting(self) -> int:
        """Callers whose rows wait for the next group."""
        with self._mutex:
            return len(self._waiting)

    def write(self, row: dict[str, Any]) -> None:
        """Return once `row` is committed; raise StoreUnavailable (or the row's own error)
        when it is not."""
        waiting = _Waiting(row)
        with self._mutex:
            self._waiting.append(waiting)
            waiting.lead = not self._leading
            self._leading = True
        if not waiting.lead:
            waiting.woken.wait()  # committed, failed, or handed the lead
        if waiting.lead:
            self._lead(waiting)
        if waiting.error is not None:
            raise waiting.error
        if waiting.alone:
            self._write_alone(waiting.row)
        elif not waiting.committed:
            raise StoreUnavailable("outbox store unavailable: the group commit did not finish")

    @replayed
    def _write_alone(self, row: dict[str, Any]) -> None:
        """One row in a transaction of its own, after its group failed before COMMIT (so that
        one bad row does not refuse the others)."""
        with self.db.tx() as conn:
            self.insert(conn, [row])

    def _lead(self, own: _Waiting) -> None:
        """Commit the waiting rows in one transaction, tell each waiter, hand the lead on.

        A connection found dead before COMMIT is replaced and the group committed once more
        (as `replayed` does); a lost COMMIT is never replayed. If the transaction fails,
        nobody in the group is told success: a failed statement sends each row of a larger
        group to a transaction of its own, any other failure is StoreUnavailable for each."""
        group: list[_Waiting] = []
        try:
            for replay in (False, True):
                try:
                    self._commit(group)
                except _GroupFailure as failure:
                    if failure.stale and not replay:
                        event(
                            log,
                            "store.reconnect",
                            method="enqueue",
                            rows=len(group),
                            error=str(failure.error),
                        )
                        continue
                    self._fail(group, failure)
                else:
                    for waiting in group:
                        waiting.committed = True
                break
        finally:
            with self._mutex:
                if own in self._waiting:  # interrupted before taking its group: not committed
                    self._waiting.remove(own)
                following = self._waiting[0] if self._waiting else None
                if following is not None:
                    following.lead = True
                self._leading = following is not None
            if following is not None:
                following.woken.set()
            for waiting in group:
                waiting.woken.set()

    def _take(self, group: list[_Waiting]) -> None:
        if not group:
            with self._mutex:
                group.extend(self._waiting[: self.group_max])
                del self._waiting[: len(group)]

    def _commit(self, group: list[_Waiting]) -> None:
        """One transaction for the waiting rows, taken once BEGIN has returned: on SQLite the
        rows that arrive while the leader waits for the write lock join it."""
        stage: Literal["begin", "insert", "commit"] = "begin"
        try:
            self.db.ready()
            with self.db.engine.connect() as conn:
                transaction = conn.begin()
                self._take(group)
                stage = "insert"
                self.insert(conn, [waiting.row for waiting in group])
                stage = "commit"
                transaction.commit()
        except Exception as exc:
            self._take(group)
            raise _GroupFailure(stage, exc) from exc

    def _fail(self, group: list[_Waiting], failure: _GroupFailure) -> None:
        error = failure.error
        if failure.stage == "insert" and len(group) > 1 and not failure.stale:
            event(log, "store.group_failed", logging.WARNING, rows=len(group), error=str(error))
            for waiting in group:
                waiting.alone = True
            return
        if len(group) == 1 and not isinstance(error, (DBAPIError, OSError)):
            group[0].error = error  # StoreUnavailable from ready(), or the row's own error
            return
        text = (
            str(error)
            if isinstance(error, StoreUnavailable)
            else f"outbox store unavailable: {error}"
        )
        for waiting in group:
            waiting.error = StoreUnavailable(text)
            waiting.error.__cause__ = error
