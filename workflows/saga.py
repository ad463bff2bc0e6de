"""The saga of the disaster-recovery workflows (drill, failover): undos registered before their steps
run, run newest first on failure, cancel or the end of a drill; and the retry policies of their steps.
Deterministic: workflow code only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

from workflows.common import failure_message

with workflow.unsafe.imports_passed_through():
    from sendense.models import BootCheck, PointInfo, RemoteExport, SnapshotRef, VmRef

# what the recovery activities (activities/recovery.py) return, by name
RESULT_TYPES: dict[str, type] = {
    "choose_point": PointInfo,
    "create_vm": VmRef,
    "power_on": VmRef,
    "boot_check": BootCheck,
    "reverse_snapshot": SnapshotRef,
    "export_snapshot": RemoteExport,
    "source_power_state": str,
    "power_on_source": str,
}

STEP = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30), maximum_attempts=5
)
# an undo is tried harder than a step: what it fails to remove is left behind (and said)
UNDO = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1), maximum_attempts=10
)
# create_vm from a cloud snapshot takes minutes; heartbeats show a dead worker much sooner
STEP_TIMEOUT = timedelta(minutes=30)
BOOT_MARGIN = timedelta(minutes=2)


@dataclass
class Undo:
    what: str
    run: Callable[[], Awaitable[Any]]


class Saga:
    """Undos registered before their steps run; `unwind` runs them newest first, each to the end,
    and says what could not be undone."""

    def __init__(self) -> None:
        self.undos: list[Undo] = []

    def register(self, what: str, run: Callable[[], Awaitable[Any]]) -> None:
        self.undos.append(Undo(what, run))

    def forget(self) -> None:
        """What was made stays (a failover's VM and its hold, once it booted)."""
        self.undos.clear()

    async def unwind(self) -> tuple[list[str], list[str]]:
        done, left = [], []
        while self.undos:
            u = self.undos.pop()
            try:
                await u.run()
                done.append(u.what)
            except ActivityError as e:
                left.append(f"{u.what}: {failure_message(e)}")
        return done, left


async def step(
    queue: str, heartbeat: timedelta, name: str, arg: Any, timeout: timedelta = STEP_TIMEOUT
) -> Any:
    """A saga's step: the recovery activity `name` on `queue`, heartbeating, retried as STEP."""
    return await workflow.execute_activity(
        name,
        arg,
        result_type=RESULT_TYPES.get(name),
        task_queue=queue,
        start_to_close_timeout=timeout,
        heartbeat_timeout=heartbeat,
        retry_policy=STEP,
    )


async def undo(queue: str, heartbeat: timedelta, name: str, arg: Any) -> None:
    """A saga's undo: retried harder than a step (UNDO)."""
    await workflow.execute_activity(
        name,
        arg,
        task_queue=queue,
        start_to_close_timeout=STEP_TIMEOUT,
        heartbeat_timeout=heartbeat,
        retry_policy=UNDO,
    )
