"""DrillWorkflow: a test failover of one job, as a saga.

choose the point (the newest, or the one asked for) -> hold it -> create a test VM from it (isolated
network) -> power on -> boot check -> keep it up for `keep` or until `end` -> undo, newest first:
destroy the VM, release the hold. Every mutating step registers its undo before it runs, and every
step is idempotent by the name or hold id chosen here before it ran, so a failure, a cancel or a
worker killed at any step leaves nothing behind. The drill never changes a point (the VM runs on an
overlay or a copy, and the hold keeps prune away from it); the job keeps syncing on its interval
meanwhile. When it ends, the job's workflow is told (its `job status` shows the newest drill).
Deterministic: no I/O, no clocks but workflow.now(), no connector imports.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from sendense import platforms
    from sendense.models import PointInfo, VmPlan
    from sendense.recovery import (
        BootRequest,
        DrillInput,
        DrillResult,
        DrillStatus,
        HoldRequest,
        PointRequest,
        VmNameRequest,
        VmRequest,
    )

    platforms.load_all()

from workflows.common import SA_JOB, SA_OPERATION, SA_STATE, failure_message
from workflows.saga import BOOT_MARGIN, STEP_TIMEOUT, Saga, step, undo


@workflow.defn(name="DrillWorkflow")
class DrillWorkflow:
    def __init__(self) -> None:
        self.inp: DrillInput | None = None
        self.st = DrillStatus(drill_id="")
        self.ended = False

    @workflow.query
    def status(self) -> DrillStatus:
        return self.st

    @workflow.signal
    def end(self) -> None:
        """`sendense drill end`: stop keeping the VM; the drill cleans up now."""
        self.ended = True

    @workflow.run
    async def run(self, inp: DrillInput) -> DrillResult:
        if not inp.drill_id:  # a scheduled run: its own id, from the id the schedule gave its workflow
            digest = hashlib.sha1(workflow.info().workflow_id.encode()).hexdigest()[:8]
            inp = inp.model_copy(update={"drill_id": digest})
        self.inp = inp
        self.st = DrillStatus(drill_id=inp.drill_id)
        spec = inp.spec
        if inp.search_attributes:
            workflow.upsert_search_attributes(
                [SA_JOB.value_set(spec.name), SA_OPERATION.value_set("drill"), SA_STATE.value_set("starting")]
            )
        result = DrillResult(drill_id=inp.drill_id, job=spec.name, started_at=workflow.now())
        saga = Saga()
        name = f"drill-{inp.drill_id}"
        try:
            self._step_is("choosing the point")
            point: PointInfo = await self._act("choose_point", PointRequest(spec=spec, point_id=inp.point_id))
            result.point, result.point_id = point, point.point_id
            self.st.point_id = point.point_id

            hold = HoldRequest(
                spec=spec, point_id=point.point_id, hold_id=name, reason=f"drill {inp.drill_id}"
            )
            saga.register(
                f"release the hold on point {point.point_id}", lambda: self._undo("release_point", hold)
            )
            self._step_is(f"holding point {point.point_id}")
            await self._act("hold_point", hold)

            rec = spec.recovery
            plan = VmPlan(
                name=name,
                point_id=point.point_id,
                mode="test",
                cpus=rec.cpus or 1,
                memory_mib=rec.memory_mib or 512,
                firmware=rec.firmware or "bios",
            )
            vm_req = VmNameRequest(spec=spec, name=name)
            saga.register(f"destroy VM {name}", lambda: self._undo("destroy_vm", vm_req))
            self._step_is(f"creating VM {name}")
            result.vm = self.st.vm = await self._act("create_vm", VmRequest(spec=spec, plan=plan))
            self._step_is(f"powering on VM {name}")
            result.vm = self.st.vm = await self._act("power_on", vm_req)

            check = rec.boot_check
            self._step_is(f"boot check of VM {name}")
            result.boot = self.st.boot = await self._act(
                "boot_check",
                BootRequest(
                    spec=spec,
                    name=name,
                    pattern=check.console_contains,
                    timeout_seconds=check.timeout.total_seconds(),
                ),
                timeout=check.timeout + BOOT_MARGIN,
            )
            if inp.notify_workflow_id is not None:  # a plan waits for its tier's boot checks
                await workflow.get_external_workflow_handle(inp.notify_workflow_id).signal(
                    "vm_checked", args=[spec.name, result.boot.ok, result.boot.evidence[:300]]
                )
            if inp.keep > timedelta(0) and not self.ended:
                self.st.keep_until = workflow.now() + inp.keep
                self._step_is(f"keeping VM {name} until {self.st.keep_until:%Y-%m-%d %H:%M:%S}Z")
                try:
                    await workflow.wait_condition(lambda: self.ended, timeout=inp.keep)
                except TimeoutError:
                    pass
        except ActivityError as e:
            result.error = failure_message(e)
        except asyncio.CancelledError:
            result.error = "the drill was cancelled"
        finally:
            self._step_is("cleaning up")
            result.undone, result.left_behind = await saga.unwind()
            result.cleaned = not result.left_behind
            result.ended_at = workflow.now()
            self._step_is("ended" if result.error is None and result.boot and result.boot.ok else "failed")
        await self._tell_the_job(result)
        return result

    # ------------------------------------------------------------------ helpers

    def _step_is(self, step: str) -> None:
        self.st.step = step
        workflow.set_current_details(f"Drill {self.st.drill_id}: {step}")  # (the web UI shows it)
        if self.inp is not None and self.inp.search_attributes:
            state = "drilling" if step not in ("ended", "failed") else step
            workflow.upsert_search_attributes([SA_STATE.value_set(state)])

    async def _act(self, name: str, arg: Any, timeout: timedelta = STEP_TIMEOUT) -> Any:
        assert self.inp is not None
        return await step(self.inp.target_queue, self._heartbeat, name, arg, timeout)

    async def _undo(self, name: str, arg: Any) -> None:
        assert self.inp is not None
        await undo(self.inp.target_queue, self._heartbeat, name, arg)

    @property
    def _heartbeat(self) -> timedelta:
        """The job's heartbeat timeout: a step of a killed worker is retried on another this soon."""
        assert self.inp is not None
        return self.inp.spec.tuning.heartbeat_timeout

    async def _tell_the_job(self, result: DrillResult) -> None:
        """The job's `job status` shows the newest drill; a job that is gone is no error."""
        assert self.inp is not None
        try:
            await workflow.get_external_workflow_handle(self.inp.job_workflow_id).signal(
                "drill_finished", result.summary()
            )
        except Exception as e:  # noqa: BLE001 - the drill's own result stands whatever the job says
            workflow.logger.info(
                "drill %s: job %s not told: %s", self.inp.drill_id, self.inp.job_workflow_id, e
            )
