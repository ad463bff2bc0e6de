"""Fault injection and per-operation call counts, for the connector's retry tests.

`inject("GetSnapshotBlock", "RequestThrottledException", 2)` makes the next two GetSnapshotBlock calls fail
with that error, rendered in the operation's protocol (EBS rest-json or EC2 XML) with AWS's HTTP status
for the code (throttling 400 for EBS, RequestLimitExceeded 503 for EC2, internal errors 500), unless a
status is given. With `lost=True` the call is carried out first and only its answer is replaced by the
error (an answer lost on the way back: the client cannot tell whether the call happened). Counts
include every authenticated call, failed or not, injected faults included.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass

from labs.aws.wire import STATUS_OF, EbsError, Response, ec2_error

_REASONS = {"RequestThrottledException": "ACCOUNT_THROTTLED"}


@dataclass
class Fault:
    error: str
    remaining: int
    status: int
    after: int = 0  # calls of the operation still to pass before the fault fires
    lost: bool = False  # the call runs; its answer is replaced by the error


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[str, deque[Fault]] = {}
        self._calls: Counter[str] = Counter()

    def inject(
        self,
        operation: str,
        error: str,
        count: int = 1,
        status: int | None = None,
        after: int = 0,
        lost: bool = False,
    ) -> None:
        if not operation or not error or count < 1 or after < 0:
            raise ValueError("a fault needs an operation, an error, a count of at least 1 and after >= 0")
        with self._lock:
            fault = Fault(error, count, status or STATUS_OF.get(error, 400), after, lost)
            self._faults.setdefault(operation, deque()).append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> list[dict[str, object]]:
        with self._lock:
            return [
                {
                    "operation": op,
                    "error": f.error,
                    "count": f.remaining,
                    "status": f.status,
                    "after": f.after,
                    "lost": f.lost,
                }
                for op, queue in self._faults.items()
                for f in queue
            ]

    def call(self, operation: str, service: str) -> tuple[Response | None, bool]:
        """Count a call; the injected error response when a fault is armed for it, and whether the
        call is to be carried out first (its answer lost)."""
        with self._lock:
            self._calls[operation] += 1
            queue = self._faults.get(operation)
            if not queue:
                return None, False
            fault = queue[0]
            if fault.after > 0:
                fault.after -= 1
                return None, False
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.popleft()
        message = f"{fault.error} injected by the AWS lab into {operation}"
        if service == "ebs":
            layer = "service" if fault.error.endswith("Exception") else "coral"
            reason = _REASONS.get(fault.error)
            error = EbsError(fault.error, message, reason=reason, status=fault.status, layer=layer)
            return error.response(), fault.lost
        return ec2_error(fault.error, message, fault.status), fault.lost

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._calls)

    def reset_stats(self) -> None:
        with self._lock:
            self._calls.clear()
