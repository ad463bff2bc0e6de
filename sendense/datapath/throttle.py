"""A token bucket shared by the copy threads of one job: the bandwidth the job is granted. It counts
the bytes it lets through (`moved`) and the time it held its callers back (`waited`), which a link's
lease reports (activities.leases): a copy that never waits does not use its grant."""

from __future__ import annotations

import threading
import time


class Throttle:
    def __init__(self, rate: int | None, burst: int | None = None, burst_seconds: float = 1.0) -> None:
        self.rate = rate
        self.burst_seconds = burst_seconds  # the bucket's depth in seconds at the rate (set_rate keeps it)
        self.burst = burst or int((rate or 0) * burst_seconds)
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.moved = 0  # bytes let through, in all
        self.waited = 0.0  # seconds the callers waited for the bucket, in all (0: it never held them back)

    def set_rate(self, rate: int | None) -> None:
        with self._lock:
            self.rate = rate
            self.burst = int((rate or 0) * self.burst_seconds)
            self._tokens = min(self._tokens, self.burst)  # a lower rate applies at once

    def consume(self, n: int) -> None:
        """Block until `n` bytes may pass. A request larger than the burst passes at the average rate."""
        with self._lock:  # (the rate is read under the lock: set_rate may change it at any time)
            self.moved += n
            rate = self.rate
            if not rate:
                return
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
            self.waited += wait
        if wait > 0:
            time.sleep(wait)
