"""Faults a test injects into the memory platform's verbs, through its store (`Store.faults`).

Never through a spec: what users write cannot make a connector fail on purpose.

    faults = Store.named("lab").faults
    faults.fail("target.commit")                        # the next commit fails once, retryable
    faults.fail("source.read", nth=3, times=None)       # every read from the 3rd on
    faults.fail("target.write", retryable=False, error=TargetError, message="disk full")
    faults.kill_after(1 << 20)                          # a copy dies once 1 MiB was written
    faults.fail("vms.create_vm", after_effect=True)     # the VM is made, then the call fails
    faults.fail("source.power_state")                   # the source's platform does not answer once

Calls are counted per verb from the moment a fault is injected: `nth=3` fails the 3rd call of the verb
after `fail` returned. `times` is how many calls fail (None: every one from the nth on). With
`after_bytes`, a read or write fails as soon as the bytes that verb moved since the injection would
pass that many (the failing call moves nothing): a copy killed mid-way, after its earlier chunks
landed. The error is `error(message, retryable=retryable)`, by default InjectedFault, whose one-line
message names the verb and the call. `calls` counts every call of every verb (tests read it).

With `after_effect=True` (mutating verbs only: EFFECT_VERBS) the call does what it does, then fails,
as a worker killed before its result reached the server would: the VM is created, the hold is
recorded, and the caller sees an error. A call whose own effect fails does not spend the fault.
`source.power_state` never raises (sendense.protocols.SourcePower): a fault due there makes it answer
"unreachable", as a platform that does not answer.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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
    "power_state",
    "pause_vm",
    "resume_vm",
    "power_off_vm",
    "power_on_vm",
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
VM_VERBS = (
    "list_networks",
    "create_vm",
    "power_on",
    "power_off",
    "boot_check",
    "console",
    "list_vms",
    "destroy_vm",
)
# failback (failback.py): the VM's changes read back (`changes.*`), the source written back (`sink.*`)
CHANGES_VERBS = ("snapshot_vm", "open_disk", "read", "release", "forget")
SINK_VERBS = (
    "disks",
    "open_disk",
    "write",
    "diverged",
    "rebase",
    "drop_base",
    "cut_over",
    "undo_cut_over",
    "cleanup",
)
VERBS = (
    tuple(f"source.{v}" for v in SOURCE_VERBS)
    + tuple(f"target.{v}" for v in TARGET_VERBS)
    + tuple(f"vms.{v}" for v in VM_VERBS)
    + tuple(f"changes.{v}" for v in CHANGES_VERBS)
    + tuple(f"sink.{v}" for v in SINK_VERBS)
)
# Verbs whose connector marks the end of their effect (`Faults.effect`): a fault can hit after it.
EFFECT_VERBS = (
    "target.hold",
    "target.release",
    "vms.create_vm",
    "vms.power_on",
    "vms.power_off",
    "vms.destroy_vm",
    "source.pause_vm",
    "source.resume_vm",
    "source.power_off_vm",
    "source.power_on_vm",
    "changes.snapshot_vm",
    "changes.release",
    "sink.rebase",
    "sink.cut_over",
)


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
    after_effect: bool = False
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
        after_effect: bool = False,
    ) -> Fault:
        if verb not in VERBS:
            raise ValueError(f"no verb {verb!r} in the memory platform (one of: {', '.join(VERBS)})")
        if nth < 1 or (times is not None and times < 1):
            raise ValueError("nth and times count calls from 1")
        if after_effect and (verb not in EFFECT_VERBS or after_bytes is not None):
            raise ValueError(
                f"after_effect: {verb} is not one of {', '.join(EFFECT_VERBS)} (or after_bytes was given)"
            )
        f = Fault(verb, nth, times, retryable, error, message, after_bytes, after_effect)
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
        self._due(verb, nbytes)  # after_effect is refused for verbs that only check

    @contextmanager
    def effect(self, verb: str) -> Iterator[None]:
        """Around a mutating verb's effect: a fault due raises before it, or, injected with
        `after_effect`, once the block completed (its effect stands)."""
        late = self._due(verb, 0)
        try:
            yield
        except BaseException:
            if late is not None:
                with self._lock:
                    late[0].fired -= 1  # the verb failed by itself: the fault hits a later call
            raise
        if late is not None:
            raise _error(*late)

    def _due(self, verb: str, nbytes: int) -> tuple[Fault, int] | None:
        """Count the call; raise the fault due before the effect, return one due after it (with
        the call's number)."""
        due: Fault | None = None
        with self._lock:
            self.calls[verb] += 1
            n = self.calls[verb]
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
        if due is None:
            return None
        if not due.after_effect:
            raise _error(due, n)
        return due, n


def _error(f: Fault, n: int) -> SendenseError:
    when = f"call {n}, after its effect" if f.after_effect else f"call {n}"
    return f.error(f.message or f"injected fault: {f.verb} ({when})", retryable=f.retryable)
