"""The job's disaster-recovery handlers (ReplicationWorkflow inherits them): a drill's outcome, the
failover update and the failback update. Each operation runs as its own child workflow
(workflows.failover, workflows.failback); the job stops syncing while one runs, and after a failover
until its failback. Deterministic: workflow code only, no connector imports.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.common import failure_message

with workflow.unsafe.imports_passed_through():
    from sendense.models import (
        CarriedState,
        DeleteRequest,
        DrillSummary,
        FailedOver,
        JobRequest,
        ReplicationInput,
    )
    from sendense.recovery import (
        FailbackInput,
        FailbackRequest,
        FailbackResult,
        FailoverInput,
        FailoverRequest,
        FailoverResult,
    )


class JobRecovery:
    """The recovery handlers of ReplicationWorkflow, with what they use of it."""

    inp: ReplicationInput | None
    st: CarriedState
    current: str | None
    deleting: DeleteRequest | None
    failing_over: bool
    failing_back: bool

    def _set_state(self, state: str) -> None:
        raise NotImplementedError

    def _resting_state(self) -> str:
        raise NotImplementedError

    async def _step(self, name: str, arg: Any, result_type: type | None = None) -> Any:
        raise NotImplementedError

    async def _sync(self) -> None:
        raise NotImplementedError

    @workflow.signal
    def drill_finished(self, summary: DrillSummary) -> None:
        """A drill of this job ended (workflows.drill): `job status` shows the newest."""
        if self.st.last_drill is None or (summary.ended_at or workflow.now()) >= (
            self.st.last_drill.ended_at or workflow.now()
        ):
            self.st.last_drill = summary

    @workflow.update
    async def failover(self, req: FailoverRequest) -> FailoverResult:
        """Stop the schedule, wait for a running sync to end, then make the job's VM on the target
        from a point (FailoverWorkflow, a child). Failed: the job syncs on as before. Done: the job is
        `failed-over` and syncs no more."""
        assert self.inp is not None
        requested_at = workflow.now()
        self.failing_over = True
        self._set_state("failing-over")
        try:
            await workflow.wait_condition(lambda: self.current is None)
            job = JobRequest(spec=self.inp.spec)
            planned, resume, point_id = False, False, req.point_id
            if point_id is None:  # planned if the source answers: pause it, take a final sync
                try:
                    state = await self._step("source_power_state", job, str)
                except ActivityError:  # no power verbs, or no answer: unplanned
                    state = "unreachable"
                planned = state in ("running", "paused")
                if planned:
                    resume = state == "running"  # (the undo, registered before the pause runs)
                    try:
                        await self._step("pause_source", job)
                    except ActivityError as e:
                        if resume:
                            await self._step("resume_source", job)
                        return self._failover_failed(
                            req, f"pausing the source VM failed: {failure_message(e)}"
                        )
                    before = self.st.last_point.point_id if self.st.last_point else None
                    await self._sync()  # the final sync: nothing lands after it
                    after = self.st.last_point.point_id if self.st.last_point else None
                    if after is None or after == before:
                        if resume:
                            await self._step("resume_source", job)
                        why = self.st.last_error or "no point was committed"
                        return self._failover_failed(req, f"the final sync failed: {why}", planned=True)
                    point_id = after
            result: FailoverResult = await workflow.execute_child_workflow(
                "FailoverWorkflow",
                FailoverInput(
                    spec=self.inp.spec,
                    failover_id=req.failover_id,
                    target_queue=self.inp.target_queue,
                    point_id=point_id,
                    vm=self.st.vm,
                    requested_at=requested_at,
                    planned=planned,
                    search_attributes=self.inp.search_attributes,
                ),
                id=f"failover-{self.inp.spec.name}-{req.failover_id}",
                result_type=FailoverResult,
                static_summary=f"Failover {req.failover_id} of job {self.inp.spec.name}",
            )
            if result.error is not None and resume:
                await self._step("resume_source", job)  # rolled back: the source runs on as before
            if result.error is None and planned:
                try:  # the source off for good: the job's VM runs on the target now
                    await self._step("power_off_source", job)
                except ActivityError as e:
                    result.source_note = f"the source VM stays paused, not powered off: {failure_message(e)}"
            if result.error is None and result.vm is not None:
                self.st.failed_over = FailedOver(
                    failover_id=req.failover_id,
                    point_id=result.point_id,
                    planned=result.planned,
                    vm=result.vm.name,
                    vm_id=result.vm.vm_id,
                    at=workflow.now(),
                )
            return result
        finally:
            self.failing_over = False
            self._set_state(self._resting_state())

    def _failover_failed(self, req: FailoverRequest, why: str, planned: bool = False) -> FailoverResult:
        assert self.inp is not None
        return FailoverResult(failover_id=req.failover_id, job=self.inp.spec.name, planned=planned, error=why)

    @failover.validator
    def _validate_failover(self, req: FailoverRequest) -> None:
        if self.deleting is not None:
            raise ApplicationError("job is being deleted", type="JobDeleted")
        if self.failing_over:
            raise ApplicationError("a failover of this job is running", type="FailoverRunning")
        if (done := self.st.failed_over) is not None:
            raise ApplicationError(
                f"job is failed over already (point {done.point_id}, VM {done.vm}); fail it back first",
                type="FailedOver",
            )

    @workflow.update
    async def failback(self, req: FailbackRequest) -> FailbackResult:
        """Replicate the failed-over VM back into the source's disks, cut over and start the source
        (FailbackWorkflow, a child). Failed: the VM runs on and the job stays failed over. Done: the
        job replicates again from its last base (its next sync, at once, is an incremental that takes
        what failback wrote)."""
        assert self.inp is not None and self.st.failed_over is not None
        self.failing_back = True
        self._set_state("failing-back")
        try:
            result: FailbackResult = await workflow.execute_child_workflow(
                "FailbackWorkflow",
                FailbackInput(
                    spec=self.inp.spec,
                    failback_id=req.failback_id,
                    source_queue=self.inp.source_queue,
                    target_queue=self.inp.target_queue,
                    failed_over=self.st.failed_over,
                    requested_at=workflow.now(),
                    stop_source=req.stop_source,
                    max_syncs=req.max_syncs,
                    small_bytes=req.small_bytes,
                    search_attributes=self.inp.search_attributes,
                ),
                id=f"failback-{self.inp.spec.name}-{req.failback_id}",
                result_type=FailbackResult,
                static_summary=f"Failback {req.failback_id} of job {self.inp.spec.name}",
            )
            if result.error is None:
                self.st.failed_over = None
                self.st.last_failback = result.summary(workflow.now())
                self.st.last_error = None
                self.st.pending_requests += 1  # a point of the failed-back source at once
            return result
        finally:
            self.failing_back = False
            self._set_state(self._resting_state())

    @failback.validator
    def _validate_failback(self, req: FailbackRequest) -> None:
        assert self.inp is not None
        if self.deleting is not None:
            raise ApplicationError("job is being deleted", type="JobDeleted")
        if self.failing_back:
            raise ApplicationError("a failback of this job is running", type="FailbackRunning")
        if self.failing_over:
            raise ApplicationError("a failover of this job is running", type="FailoverRunning")
        if self.st.failed_over is None:
            raise ApplicationError("not failed over: nothing to fail back", type="NotFailedOver")
