"""A token bucket shared by the copy threads of one job: the bandwidth the job is granted. It counts
the bytes it lets through (`moved`) and the time it held its callers back (`waited`), which a link's
lease reports (activities.leases): a copy that never waits does not use its grant.

A caller takes its bytes at once (the bucket may go into debt) and waits until the bucket has earned
back its own share of the debt, not the debt of callers after it. The waits are on a condition: a new
rate (`set_rate`: a link's budget or a job's priority changed) applies to callers already waiting,
so a copy throttled to a trickle speeds up as soon as its grant rises, not after its current sleep.
"""

from __future__ import annotations

import threading
import time


class Throttle:
    def __init__(self, rate: int | None, burst: int | None = None, burst_seconds: float = 1.0) -> None:
        self.rate = rate
        self.burst_seconds = burst_seconds  # the bucket's depth in seconds at the rate (set_rate keeps it)
        self.burst = burst or int((rate or 0) * burst_seconds)
        self._tokens = float(self.burst)
        self._earned = 0.0  # tokens earned since the start, in all (a waiter's progress is measured on it)
        self._last = time.monotonic()
        self._cond = threading.Condition()
        self.moved = 0  # bytes let through, in all
        self.waited = 0.0  # seconds the callers waited for the bucket, in all (0: it never held them back)

    def _refill(self, now: float) -> None:
        add = (now - self._last) * (self.rate or 0)
        self._last = now
        self._earned += add
        self._tokens = min(float(self.burst), self._tokens + add)

    def set_rate(self, rate: int | None) -> None:
        with self._cond:
            self._refill(time.monotonic())  # what was earned at the old rate stays earned
            self.rate = rate
            self.burst = int((rate or 0) * self.burst_seconds)
            self._tokens = min(self._tokens, self.burst)  # a lower rate applies at once
            self._cond.notify_all()  # waiters recompute at the new rate

    def consume(self, n: int) -> None:
        """Block until `n` bytes may pass. A request larger than the burst passes at the average rate."""
        with self._cond:
            self.moved += n
            if not self.rate:
                return
            start = time.monotonic()
            self._refill(start)
            self._tokens -= n
            need = -self._tokens
            if need <= 0:
                return
            mark = self._earned
            while self.rate:
                now = time.monotonic()
                self._refill(now)
                remaining = need - (self._earned - mark)
                if remaining <= 0:
                    break
                self._cond.wait(remaining / self.rate)
            self.waited += time.monotonic() - start
