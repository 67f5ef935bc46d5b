"""A bounded window of recently accepted events, to drop GitLab's duplicate deliveries.

GitLab documents that an event can arrive more than once (Sidekiq re-runs, the at-least-once delivery
path). The window remembers the keys of accepted events, at most ``max_entries`` of them and none older
than ``window_s``. The window is per process: duplicates that land on different workers or hosts are not
caught here (each copy then travels with its own ``gitlab-event-uid``).

Use ``reserve`` before accepting an event and ``release`` if it could not be accepted after all, so a
failed attempt never hides the redelivery that follows it; two copies arriving at the same time are
caught too, since the first reservation already counts.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class DedupWindow:
    def __init__(
        self, max_entries: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries <= 0 or window_s <= 0:
            raise ValueError("max_entries and window_s must be positive")
        self._max = max_entries
        self._window = window_s
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # key -> time first accepted, oldest first
        # When the oldest entry leaves the window (no expiry work per call before that).
        self._next_expiry = math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        seen = self._seen
        limit = now - self._window
        while seen:
            stamp = next(iter(seen.values()))
            if stamp > limit:
                self._next_expiry = stamp + self._window
                return
            seen.popitem(last=False)
        self._next_expiry = math.inf

    def reserve(self, key: bytes) -> bool:
        """True (and remembered) if ``key`` is new in the window; False for a duplicate."""
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
        seen = self._seen
        if key in seen:
            return False
        if not seen:
            self._next_expiry = now + self._window
        seen[key] = now
        if len(seen) > self._max:
            # The oldest goes; the rest is within the window (expired above). The next expiry is no earlier
            # than the evicted entry's: a lower bound is enough (_expire then finds the exact one).
            self._next_expiry = seen.popitem(last=False)[1] + self._window
        return True

    def release(self, key: bytes) -> None:
        """Forget a reservation whose event was not accepted after all."""
        self._seen.pop(key, None)

    def __contains__(self, key: bytes) -> bool:
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
        return key in self._seen
