"""A copy's lease on its link's bandwidth (workflows.governor), kept while the copy runs.

A job whose spec names a `link` copies through a Throttle whose rate is the governor's grant: the
copy leases its share when it starts, renews it every LEASE_PERIOD from a side thread (reporting the
bytes it moved since, so `link status` shows what it really does), applies each answer at once,
and releases the lease when it ends. The governor is a workflow: the worker's client and its event
loop are attached once (`attach`, workers.worker), and the activity threads call through them.

If the governor does not answer (the server is away, the link was deleted), the copy keeps its last
rate while its lease is valid (the governor counts it that long), then drops to FLOOR_RATE (said once
in the log) until the governor answers again: it never takes more than its share for long, and never
stops.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Protocol

from temporalio import activity
from temporalio.client import Client

from sendense import config
from sendense.datapath.throttle import Throttle
from sendense.links import LeaseGrant, LeaseRelease, LeaseRequest
from sendense.models import BANDWIDTH_MIN, JobSpec

log = logging.getLogger(__name__)

LEASE_PERIOD = 1.0  # seconds between renewals (the governor lets a lease lapse after its valid_for)
FLOOR_RATE = BANDWIDTH_MIN  # bytes/s while the governor cannot be reached: 1 MiB/s
BURST_SECONDS = 0.25  # a copy on a link bursts a quarter second at most (its setup time is not banked)


class Governor(Protocol):
    """How a copy reaches its link's governor (blocking calls, from any thread)."""

    def lease(self, link: str, req: LeaseRequest, timeout: float) -> LeaseGrant: ...
    def release(self, link: str, req: LeaseRelease, timeout: float) -> None: ...


class Governors:
    """The link governors through this worker's Temporal client, on the event loop it runs on."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop

    def _call(self, link: str, update: str, arg: object, result_type: type | None, timeout: float) -> object:
        h = self.client.get_workflow_handle(config.link_workflow_id(link))
        coro = h.execute_update(update, arg, result_type=result_type, rpc_timeout=timedelta(seconds=timeout))
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def lease(self, link: str, req: LeaseRequest, timeout: float) -> LeaseGrant:
        grant = self._call(link, "lease", req, LeaseGrant, timeout)
        assert isinstance(grant, LeaseGrant)
        return grant

    def release(self, link: str, req: LeaseRelease, timeout: float) -> None:
        self._call(link, "release", req, None, timeout)


_attached: Governor | None = None


def attach(governor: Governor | None) -> None:
    """The way this worker's copies reach the governors (workers.worker attaches its client's)."""
    global _attached
    _attached = governor


def attached() -> Governor | None:
    return _attached


class LeaseKeeper:
    """Keeps one copy's lease on `link` and applies its grants to `throttle` (start ... stop)."""

    def __init__(
        self,
        link: str,
        job: str,
        priority: str,
        cap: int | None,
        holder: str,
        throttle: Throttle,
        governor: Governor | None,
        period: float = LEASE_PERIOD,
        floor: int = FLOOR_RATE,
        job_id: str = "",
    ) -> None:
        self.link, self.job, self.priority, self.cap, self.holder = link, job, priority, cap, holder
        self.job_id = job_id
        self.throttle, self.governor, self.period = throttle, governor, period
        self.floor = min(floor, cap) if cap else floor
        self.grant: LeaseGrant | None = None
        self.valid_until = float("-inf")  # monotonic: the last grant holds until then
        self.floored = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._moved = throttle.moved
        self._waited = throttle.waited
        self._since = time.monotonic()

    def start(self) -> None:
        """The first lease before the copy starts (so it starts at its share), then renewals."""
        self.throttle.set_rate(self.floor)
        self.renew()
        ctx = contextvars.copy_context()  # (the activity's context: its logger's details)
        self._thread = threading.Thread(target=ctx.run, args=(self._loop,), daemon=True, name="lease")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.governor is None:
            return
        moved, seconds = self._report()
        try:  # (its last bytes count in the link's totals)
            self.governor.release(
                self.link, LeaseRelease(holder=self.holder, bytes=moved, seconds=seconds), 2.0
            )
        except Exception as e:  # noqa: BLE001 - the lease lapses by itself
            log.info("link %s: release of %s failed (%s); it lapses", self.link, self.holder, _why(e))

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.renew()

    def _report(self) -> tuple[int, float]:
        """Bytes moved, and over how long, since the last report the governor took."""
        return self.throttle.moved - self._moved, time.monotonic() - self._since

    def _reported(self, moved: int, seconds: float, waited: float) -> None:
        self._moved += moved
        self._since += seconds
        self._waited += waited

    def renew(self) -> None:
        """One renewal: the grant applied, or (no answer) the last rate kept while it is valid, then
        the floor."""
        now = time.monotonic()
        try:
            if self.governor is None:
                raise LookupError("this worker reaches no link governor")
            moved, seconds = self._report()
            waited = self.throttle.waited - self._waited
            req = LeaseRequest(
                holder=self.holder,
                job=self.job,
                job_id=self.job_id,
                priority=self.priority,
                cap=self.cap,
                bytes=moved,
                seconds=seconds,
                waited=waited,
            )
            grant = self.governor.lease(self.link, req, max(self.period * 2, 2.0))
            self._reported(moved, seconds, waited)
        except Exception as e:  # noqa: BLE001 - whatever it is, the copy goes on at a safe rate
            if now >= self.valid_until and not self.floored:
                self.floored = True
                self.throttle.set_rate(self.floor)
                log.warning(
                    "link %s: its governor does not answer (%s); job %s copies at %d bytes/s until it does",
                    self.link,
                    _why(e),
                    self.job,
                    self.floor,
                )
            return
        if self.floored:
            log.info("link %s: its governor answers again; job %s copies at its share", self.link, self.job)
            self.floored = False
        self.grant = grant
        self.valid_until = now + grant.valid_for
        self.throttle.set_rate(grant.rate)


def _why(e: BaseException) -> str:
    text = " ".join(str(getattr(e, "message", None) or e).split())
    return text or type(e).__name__


def holder_id(job: str) -> str:
    """This copy among the link's holders: the job, and the activity's run, id and attempt."""
    if not activity.in_activity():
        return f"{job}/local"
    info = activity.info()
    return f"{job}/{(info.workflow_run_id or '')[:8]}/{info.activity_id}#{info.attempt}"


def link_throttle() -> Throttle:
    """The throttle of a copy on a link: at the floor until its first grant, bursting little."""
    return Throttle(FLOOR_RATE, burst_seconds=BURST_SECONDS)


@contextmanager
def governed(spec: JobSpec, governor: Governor | None = None) -> Iterator[Throttle | None]:
    """The throttle a copy of `spec`'s job runs through while it holds its link's lease; None for a
    job without a link (the copy then applies the job's own `tuning.bandwidth_limit`)."""
    if spec.link is None:
        yield None
        return
    throttle = link_throttle()
    keeper = LeaseKeeper(
        spec.link,
        spec.name,
        spec.priority,
        spec.tuning.bandwidth_limit,
        holder_id(spec.name),
        throttle,
        governor or attached(),
        job_id=spec.job_id,
    )
    keeper.start()
    try:
        yield throttle
    finally:
        keeper.stop()
