"""Faults a test injects into the memory platform's verbs, through its store (`Store.faults`).

Never through a spec: what users write cannot make a connector fail on purpose.

    faults = Store.named("lab").faults
    faults.fail("target.commit")                        # the next commit fails once, retryable
    faults.fail("source.read", nth=3, times=None)       # every read from the 3rd on
    faults.fail("target.write", retryable=False, error=TargetError, message="disk full")
    faults.kill_after(1 << 20)                          # a copy dies once 1 MiB was written

Calls are counted per verb from the moment a fault is injected: `nth=3` fails the 3rd call of the verb
after `fail` returned. `times` is how many calls fail (None: every one from the nth on). With
`after_bytes`, a read or write fails as soon as the bytes that verb moved since the injection would
pass that many (the failing call moves nothing): a copy killed mid-way, after its earlier chunks
landed. The error is `error(message, retryable=retryable)`, by default InjectedFault, whose one-line
message names the verb and the call. `calls` counts every call of every verb (tests read it).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from sendense.errors import SendenseError

SOURCE_VERBS = (
    "validate",
    "discover",
    "create_snapshot",
    "open_disk",
    "read",
    "release_snapshot",
    "forget",
)
TARGET_VERBS = (
    "validate",
    "prepare",
    "open_disk",
    "read",
    "write",
    "commit",
    "abort",
    "list_points",
    "prune",
    "export",
    "destroy",
    "hold",
    "release",
)
VERBS = tuple(f"source.{v}" for v in SOURCE_VERBS) + tuple(f"target.{v}" for v in TARGET_VERBS)


class InjectedFault(SendenseError):
    """A fault a test injected into the memory platform."""

    kind = "InjectedFault"
    retryable = True


@dataclass
class Fault:
    verb: str
    nth: int = 1
    times: int | None = 1
    retryable: bool = True
    error: type[SendenseError] = InjectedFault
    message: str = ""
    after_bytes: int | None = None
    seen: int = 0  # calls of the verb since the injection
    moved: int = 0  # bytes the verb moved since the injection
    fired: int = 0

    @property
    def spent(self) -> bool:
        return self.times is not None and self.fired >= self.times


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.calls: Counter[str] = Counter()

    def fail(
        self,
        verb: str,
        *,
        nth: int = 1,
        times: int | None = 1,
        retryable: bool = True,
        error: type[SendenseError] = InjectedFault,
        message: str = "",
        after_bytes: int | None = None,
    ) -> Fault:
        if verb not in VERBS:
            raise ValueError(f"no verb {verb!r} in the memory platform (one of: {', '.join(VERBS)})")
        if nth < 1 or (times is not None and times < 1):
            raise ValueError("nth and times count calls from 1")
        f = Fault(verb, nth, times, retryable, error, message, after_bytes)
        with self._lock:
            self._faults.append(f)
        return f

    def kill_after(self, nbytes: int, *, verb: str = "target.write", retryable: bool = True) -> Fault:
        """The copy dies once `nbytes` were written (or read, with verb="source.read"), once."""
        return self.fail(
            verb,
            after_bytes=nbytes,
            retryable=retryable,
            message=f"injected fault: copy killed after {nbytes} bytes",
        )

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.calls.clear()

    @property
    def pending(self) -> list[Fault]:
        """Faults that will still fire."""
        with self._lock:
            return [f for f in self._faults if not f.spent]

    def check(self, verb: str, nbytes: int = 0) -> None:
        """Called by the connectors at the start of every verb; raises the fault that is due."""
        due: Fault | None = None
        with self._lock:
            self.calls[verb] += 1
            for f in self._faults:
                if f.verb != verb or f.spent:
                    continue
                f.seen += 1
                if f.after_bytes is not None:
                    if f.moved + nbytes > f.after_bytes and due is None:
                        due = f
                    else:
                        f.moved += nbytes
                elif f.seen >= f.nth and due is None:
                    due = f
            if due is not None:
                due.fired += 1
        if due is not None:
            n = self.calls[verb]
            raise due.error(due.message or f"injected fault: {verb} (call {n})", retryable=due.retryable)
