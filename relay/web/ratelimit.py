"""memory:// rate limits without a new thread every 10 ms.

limits' MemoryStorage reclaims expired counters from a `threading.Timer` of 10 ms that each
hit re-arms once the last one has run. Under steady traffic that starts a thread about every
10 ms: the request that starts it waits until the new thread has run (behind up to fifteen
others for the GIL), and every run walks every key, so a burst from many addresses (thousands
of keys) pays that walk a hundred times a second. In the bench the thread starts were 2-3 %
of an accepted submission's CPU in the request itself.

`SweptMemoryStorage` (scheme `formrelay-memory://`, what RELAY_RATE_LIMIT_STORAGE=memory://
is given to) re-arms that sweep at most once per SWEEP_SECONDS. The counts do not change:
MemoryStorage judges every hit by its entries' timestamps and expiry times, never by whether
the sweep has run; the sweep only frees memory, here up to a second later. The hook it
overrides is MemoryStorage's private `__schedule_expiry`; tests/web/test_limits.py checks that
the override is still the one MemoryStorage calls, so an upgrade of limits that renames it
fails a test instead of silently bringing the 10 ms timer back.
"""

from __future__ import annotations

import time
from typing import Any

from limits.storage import MemoryStorage

SCHEME = "formrelay-memory"
SWEEP_SECONDS = 1.0


def storage_uri(uri: str) -> str:
    """The storage URI to hand to limits: memory:// becomes ours, any other stays."""
    if uri.startswith("memory://"):
        return SCHEME + uri.removeprefix("memory")
    return uri


class SweptMemoryStorage(MemoryStorage):
    """MemoryStorage whose expiry sweep is re-armed at most once per SWEEP_SECONDS."""

    STORAGE_SCHEME = [SCHEME]  # noqa: RUF012 - limits' own class attribute

    def __init__(
        self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any
    ) -> None:
        self.sweeps_armed = 0
        self._next_sweep = 0.0
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_SECONDS
        if not self.timer.is_alive():
            self.sweeps_armed += 1
        super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]
