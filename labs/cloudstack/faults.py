"""Fault injection and per-command call counts, for the client's and the connector's retry tests.

`inject("listVolumes", 429)` answers the next listVolumes call with CloudStack's API-limit error
(HTTP 429, cserrorcode 4545); `inject("listVolumes", 503, count=2)` with a 503 twice (a proxy or a
management server restarting: CloudStack's error shape, status 503). `inject("deployVirtualMachine",
530, job=True)` lets the call be accepted (a jobid) and makes its async job fail with that error
(jobstatus 2, jobresult {errorcode, cserrorcode, errortext}), without doing the work. Counts include
every verified call, failed or not.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass

from labs.cloudstack import wire
from labs.cloudstack.wire import ApiError

_CSCODES = {
    429: wire.CS_REQUEST_LIMIT,
    530: wire.CS_CLOUD_RUNTIME,
    533: wire.CS_INSUFFICIENT_SERVER_CAPACITY,
    534: wire.CS_RESOURCE_UNAVAILABLE,
    535: wire.CS_RESOURCE_ALLOCATION,
}
_TEXTS = {429: "The given user has reached his/her account api limit, please retry after 1000 ms."}


@dataclass
class Fault:
    errorcode: int
    remaining: int
    after: int
    job: bool
    text: str
    cserrorcode: int | None


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[tuple[str, bool], deque[Fault]] = {}
        self._calls: Counter[str] = Counter()

    def inject(
        self,
        command: str,
        errorcode: int,
        count: int = 1,
        *,
        after: int = 0,
        job: bool = False,
        text: str = "",
        cserrorcode: int | None = None,
    ) -> None:
        if not command or count < 1 or after < 0 or not 400 <= errorcode <= 599:
            raise ValueError("a fault needs a command, an error code 400-599, count >= 1 and after >= 0")
        fault = Fault(
            errorcode,
            count,
            after,
            job,
            text or _TEXTS.get(errorcode, f"error {errorcode} injected by the CloudStack lab into {command}"),
            cserrorcode if cserrorcode is not None else _CSCODES.get(errorcode),
        )
        with self._lock:
            self._faults.setdefault((command, job), deque()).append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, command: str, job: bool) -> ApiError | None:
        with self._lock:
            queue = self._faults.get((command, job))
            if not queue:
                return None
            fault = queue[0]
            if fault.after > 0:
                fault.after -= 1
                return None
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.popleft()
        return ApiError(fault.errorcode, fault.text, fault.cserrorcode)

    def call(self, command: str) -> ApiError | None:
        """Count a verified call; the error to answer it with, when one is armed."""
        with self._lock:
            self._calls[command] += 1
        return self._take(command, False)

    def job_failure(self, command: str) -> ApiError | None:
        return self._take(command, True)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._calls)

    def reset_stats(self) -> None:
        with self._lock:
            self._calls.clear()
