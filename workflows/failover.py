"""FailoverWorkflow: the job's VM made on its target from a point, as a saga (the job's workflow runs
it as its child, from its `failover` update, once its schedule is stopped and no sync runs).

choose the point -> hold it -> create the production VM (the job's hardware as discovered at create,
overridden by the spec's `recovery`; its NICs on the networks `recovery.network_map` names) -> power
on -> boot check. Every mutating step registers its undo before it runs; a failure, a cancel, a
killed worker or a VM that does not boot rolls everything back (the job then syncs on as before). Once
the VM booted, the VM and the hold stay: the VM runs on the point (an overlay or volumes made from it).
Deterministic: no I/O, no clocks but workflow.now(), no connector imports.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from sendense import platforms
    from sendense.models import PointInfo, VmPlan
    from sendense.recovery import (
        BootRequest,
        FailoverInput,
        FailoverResult,
        HoldRequest,
        PointRequest,
        VmNameRequest,
        VmRequest,
    )

    platforms.load_all()

from workflows.common import SA_JOB, SA_STATE, failure_message
from workflows.saga import BOOT_MARGIN, STEP_TIMEOUT, Saga, step, undo


@workflow.defn(name="FailoverWorkflow")
class FailoverWorkflow:
    def __init__(self) -> None:
        self.inp: FailoverInput | None = None
        self.step = "starting"

    @workflow.query
    def status(self) -> str:
        return self.step

    def _step_is(self, step: str) -> None:
        self.step = step
        workflow.set_current_details(f"Failover: {step}")  # (the web UI shows it)

    @workflow.run
    async def run(self, inp: FailoverInput) -> FailoverResult:
        self.inp = inp
        spec = inp.spec
        if inp.search_attributes:
            workflow.upsert_search_attributes(
                [SA_JOB.value_set(spec.name), SA_STATE.value_set("failing-over")]
            )
        result = FailoverResult(failover_id=inp.failover_id, job=spec.name, planned=inp.planned)
        saga = Saga()
        name = spec.name  # the production VM is the job's VM
        try:
            self._step_is("choosing the point")
            point: PointInfo = await self._act("choose_point", PointRequest(spec=spec, point_id=inp.point_id))
            result.point_id = point.point_id

            hold = HoldRequest(
                spec=spec, point_id=point.point_id, hold_id=f"failover-{inp.failover_id}", reason="failover"
            )
            saga.register(
                f"release the hold on point {point.point_id}", lambda: self._undo("release_point", hold)
            )
            self._step_is(f"holding point {point.point_id}")
            await self._act("hold_point", hold)

            rec, vm = spec.recovery, inp.vm
            plan = VmPlan(
                name=name,
                point_id=point.point_id,
                mode="production",
                cpus=rec.cpus or (vm.cpus if vm and vm.cpus else 1),
                memory_mib=rec.memory_mib or (vm.memory_mib if vm and vm.memory_mib else 512),
                firmware=rec.firmware or (vm.firmware if vm and vm.firmware else "bios"),
                nics=list(vm.nics) if vm else [],
                network_map=dict(rec.network_map),
            )
            vm_req = VmNameRequest(spec=spec, name=name)
            saga.register(f"destroy VM {name}", lambda: self._undo("destroy_vm", vm_req))
            self._step_is(f"creating VM {name}")
            result.vm = await self._act("create_vm", VmRequest(spec=spec, plan=plan))
            self._step_is(f"powering on VM {name}")
            result.vm = await self._act("power_on", vm_req)
            self._step_is(f"boot check of VM {name}")
            check = rec.boot_check
            result.boot = await self._act(
                "boot_check",
                BootRequest(
                    spec=spec,
                    name=name,
                    pattern=check.console_contains,
                    timeout_seconds=check.timeout.total_seconds(),
                ),
                timeout=check.timeout + BOOT_MARGIN,
            )
            if not result.boot.ok:
                result.error = f"VM {name} from point {point.point_id} did not boot: {result.boot.evidence}"
            else:
                result.rto_seconds = round((workflow.now() - inp.requested_at).total_seconds(), 1)
                saga.forget()  # the VM is the job's now, and its point stays held
        except ActivityError as e:
            result.error = failure_message(e)
        except asyncio.CancelledError:
            result.error = "the failover was cancelled"
        if result.error is not None:
            self._step_is("rolling back")
            result.undone, result.left_behind = await saga.unwind()
            result.cleaned = not result.left_behind
            result.vm = None if result.cleaned else result.vm
        self._step_is("failed over" if result.error is None else "failed")
        if inp.search_attributes:
            workflow.upsert_search_attributes([SA_STATE.value_set(self.step.replace(" ", "-"))])
        return result

    async def _act(self, name: str, arg: Any, timeout: timedelta = STEP_TIMEOUT) -> Any:
        assert self.inp is not None
        return await step(self.inp.target_queue, self.inp.spec.tuning.heartbeat_timeout, name, arg, timeout)

    async def _undo(self, name: str, arg: Any) -> None:
        assert self.inp is not None
        await undo(self.inp.target_queue, self.inp.spec.tuning.heartbeat_timeout, name, arg)
