"""FailbackWorkflow: a failed-over job's VM replicated back into the source's disks, then the source
started again (the job's workflow runs it as its child, from its `failback` update).

1. The source VM must be off (its disks are written in place): found running or paused it is refused,
   or, with `stop_source`, powered off (undo: started again).
2. Reverse syncs while the failed-over VM runs: a snapshot of the VM, each disk copied into the
   source's disk (the first one from the VM's point, with where the source changed since the failover
   point; later ones from the previous reverse snapshot), the snapshot committed as the next base. They
   repeat until one had at most `small_bytes` to read, stopped shrinking, or `max_syncs` ran.
3. Cutover: the VM is powered off (undo: on again; from here the service is down), the final reverse
   sync, the source VM started where the product can (else its disks are current and the start is the
   operator's). No undo after this point: the source runs the service now.
4. The failed-over VM is destroyed and its point's failover hold released (what cannot be removed is
   said in `left_behind`, the failback stands).

Any failure before the source starts unwinds the saga: the VM runs on as production, failback's
tracking on it goes (`reverse_forget`), and the job stays failed over; what reverse syncs wrote on the
source's disks stays, which is harmless (the source is not running, and the next failback's first
reverse sync puts back everything the source's tracking says changed since the point).
Deterministic: no I/O, no clocks but workflow.now(), no connector imports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from sendense import platforms
    from sendense.config import host_of_queue
    from sendense.models import ExportRequest, JobRequest, PointInfo, SnapshotRef
    from sendense.recovery import (
        FailbackInput,
        FailbackResult,
        HoldRequest,
        PointRequest,
        ReverseCopyRequest,
        ReverseCopyResult,
        ReverseReleaseRequest,
        ReverseSnapshotRequest,
        ReverseSync,
        VmNameRequest,
    )

    platforms.load_all()

from workflows.common import SA_JOB, SA_OPERATION, SA_STATE, failure_message, failure_type, placement
from workflows.replication import COPY
from workflows.saga import STEP_TIMEOUT, Saga, step, undo

COPY_TIMEOUT = timedelta(hours=48)  # heartbeats show a dead worker much sooner
PATCH_REMOTE_FAILBACK = "remote-failback"  # two agents: the VM's steps on the target's, pulled across


@workflow.defn(name="FailbackWorkflow")
class FailbackWorkflow:
    def __init__(self) -> None:
        self.inp: FailbackInput | None = None
        self.step = "starting"
        self.remote = False
        self.vm_on_source = True  # reverse_snapshot/_release/_forget run on the source's queue
        self.sink_on_source = True  # reverse_copy and the cut-over's steps run on the source's queue

    @workflow.query
    def status(self) -> str:
        return self.step

    def _step_is(self, step: str) -> None:
        self.step = step
        workflow.set_current_details(f"Failback: {step}")  # (the web UI shows it)

    @workflow.run
    async def run(self, inp: FailbackInput) -> FailbackResult:
        self.inp = inp
        spec, fo = inp.spec, inp.failed_over
        if inp.search_attributes:
            workflow.upsert_search_attributes(
                [
                    SA_JOB.value_set(spec.name),
                    SA_OPERATION.value_set("failback"),
                    SA_STATE.value_set("failing-back"),
                ]
            )
        result = FailbackResult(failback_id=inp.failback_id, job=spec.name, point_id=fo.point_id, vm=fo.vm)
        # two agents (two sites): the VM's steps run on the target's agent, which exports its snapshots,
        # and the source's agent pulls them across the link into the source's disks
        where = placement(inp.source_queue, inp.target_queue)
        self.remote = where == "link" and workflow.patched(PATCH_REMOTE_FAILBACK)
        # a source reached by API (control queue) and a VM on an agent: that agent reads the VM and
        # writes the source by API (the sink's steps together, where its state is)
        self.vm_on_source = not self.remote and where != "target"
        self.sink_on_source = where != "target"
        saga = Saga()
        job, vm = JobRequest(spec=spec), VmNameRequest(spec=spec, name=fo.vm)
        try:
            self._step_is("checking the source VM")
            state = await self._act("source_power_state", job, source=True)
            if state in ("gone", "unreachable"):
                result.error = (
                    f"the source VM of job {spec.name} is {state}: failback writes the disks of "
                    f"{spec.source.describe()}"
                )
            elif state in ("running", "paused") and not inp.stop_source:
                result.error = (
                    f"the source VM of job {spec.name} is {state}: failback writes its disks; power it "
                    "off, or fail back with --stop-source"
                )
            if result.error is not None:
                return self._ended(result)
            # registered first, so it runs last: what failback made beside the source's disks goes
            saga.register("remove what failback made beside the source's disks", lambda: self._cleanup(job))
            if state in ("running", "paused"):
                saga.register("start the source VM again", lambda: self._undo("power_on_source", job, True))
                self._step_is("powering off the source VM")
                await self._act("power_off_source", job, source=True)

            point: PointInfo = await self._act("choose_point", PointRequest(spec=spec, point_id=fo.point_id))
            since = {d.key: d.change_id for d in point.disks}

            saga.register(
                f"remove failback's snapshots of VM {fo.vm}",
                lambda: self._undo("reverse_forget", vm, self.vm_on_source),
            )
            base: dict[str, str] | None = None
            last: int | None = None
            for n in range(1, inp.max_syncs + 1):
                self._step_is(f"reverse sync {n} (VM {fo.vm} running)")
                try:
                    r, base = await self._reverse_sync(result, f"{inp.failback_id}-{n}", base, since)
                except ActivityError as e:
                    if failure_type(e) != "NotWhileRunning":
                        raise
                    result.notes.append(f"no reverse sync while VM {fo.vm} runs: {failure_message(e)}")
                    break  # its changes are read once it is off: the cutover's sync takes them all
                if r.planned_bytes <= inp.small_bytes or (last is not None and r.planned_bytes >= last):
                    break
                last = r.planned_bytes

            self._step_is(f"cutover: powering off VM {fo.vm}")
            saga.register(f"power on VM {fo.vm} again", lambda: self._undo("power_on", vm))
            down = workflow.now()
            await self._act("power_off", vm)
            self._step_is("cutover: the final reverse sync")
            r, base = await self._reverse_sync(result, f"{inp.failback_id}-final", base, since, cutover=True)
            saga.register(
                "give the source VM back its disks",
                lambda: self._undo("failback_undo_cut_over", job, self.sink_on_source),
            )
            await self._act("failback_cut_over", job, source=self.sink_on_source)
            self._step_is("cutover: starting the source VM")
            why_not = await self._act("power_on_source", job, source=True)
            result.started = not why_not
            result.start_note = why_not or None
            result.cutover_seconds = round((workflow.now() - down).total_seconds(), 1)
            saga.forget()  # the source holds the service now: nothing to undo
        except ActivityError as e:
            result.error = failure_message(e)
        except asyncio.CancelledError:
            result.error = "the failback was cancelled"
        if result.error is not None:
            self._step_is("rolling back")
            result.undone, result.left_behind = await saga.unwind()
            result.cleaned = not result.left_behind
            return self._ended(result)

        self._step_is(f"removing VM {fo.vm}")  # failed back: what the failover made goes
        hold = HoldRequest(
            spec=spec, point_id=fo.point_id, hold_id=f"failover-{fo.failover_id}", reason="failover"
        )
        for what, name, arg, source in (
            (f"VM {fo.vm}", "destroy_vm", vm, False),
            (f"the failover's hold on point {fo.point_id}", "release_point", hold, False),
            ("what failback made beside the source's disks", "failback_cleanup", job, self.sink_on_source),
        ):
            try:
                await self._undo(name, arg, source)
            except ActivityError as e:
                result.left_behind.append(f"{what}: {failure_message(e)}")
        return self._ended(result)

    async def _cleanup(self, job: JobRequest) -> None:
        await self._undo("failback_cleanup", job, self.sink_on_source)

    def _ended(self, result: FailbackResult) -> FailbackResult:
        assert self.inp is not None
        self._step_is("failed back" if result.error is None else "failed")
        if self.inp.search_attributes:
            workflow.upsert_search_attributes([SA_STATE.value_set(self.step.replace(" ", "-"))])
        return result

    async def _reverse_sync(
        self,
        result: FailbackResult,
        snapshot_id: str,
        base: dict[str, str] | None,
        since: Mapping[str, str | None],
        cutover: bool = False,
    ) -> tuple[ReverseSync, dict[str, str]]:
        """One reverse sync: snapshot the VM, copy each disk, commit the snapshot as the next base. Until
        one committed (`base` None), where the source diverged since the point is copied as well."""
        assert self.inp is not None
        spec, fo = self.inp.spec, self.inp.failed_over
        t0 = workflow.now()
        snap: SnapshotRef = await self._act(
            "reverse_snapshot",
            ReverseSnapshotRequest(spec=spec, vm=fo.vm, snapshot_id=snapshot_id, base=base),
            source=self.vm_on_source,
        )
        export = None
        if self.remote:
            assert self.inp is not None
            peer = host_of_queue(self.inp.source_queue)
            export = await self._act(
                "export_snapshot",
                ExportRequest(spec=spec, sync_id=snapshot_id, snapshot=snap, peer_host=peer, kind="reverse"),
            )
        r = ReverseSync(snapshot_id=snapshot_id, cutover=cutover)
        for d in snap.disks:
            req = ReverseCopyRequest(
                spec=spec,
                snapshot=snap.model_copy(update={"disks": [d]}),
                disk=d.key,
                since=since.get(d.key) if base is None else None,
                export=export,
            )
            copied: ReverseCopyResult = await workflow.execute_activity(
                "reverse_copy",
                req,
                result_type=ReverseCopyResult,
                task_queue=self.inp.source_queue if self.sink_on_source else self.inp.target_queue,
                start_to_close_timeout=COPY_TIMEOUT,
                heartbeat_timeout=spec.tuning.heartbeat_timeout,
                retry_policy=COPY,
            )
            stats = copied.result.stats
            r.bytes_read += stats.bytes_read
            r.bytes_written += stats.bytes_written
            r.bytes_zeroed += stats.bytes_zeroed
            r.planned_bytes += copied.planned_bytes
            if copied.compared_whole:
                r.compared_whole.append(d.key)
        await self._act(
            "reverse_release",
            ReverseReleaseRequest(spec=spec, snapshot=snap, committed=True),
            self.vm_on_source,
        )
        r.seconds = round((workflow.now() - t0).total_seconds(), 1)
        result.reverse_syncs.append(r)
        result.syncs += 1
        result.bytes_read += r.bytes_read
        result.bytes_written += r.bytes_written + r.bytes_zeroed
        return r, {d.key: d.change_id for d in snap.disks if d.change_id}

    async def _act(self, name: str, arg: Any, source: bool = False, timeout: timedelta = STEP_TIMEOUT) -> Any:
        assert self.inp is not None
        queue = self.inp.source_queue if source else self.inp.target_queue
        return await step(queue, self.inp.spec.tuning.heartbeat_timeout, name, arg, timeout)

    async def _undo(self, name: str, arg: Any, source: bool = False) -> None:
        assert self.inp is not None
        queue = self.inp.source_queue if source else self.inp.target_queue
        await undo(queue, self.inp.spec.tuning.heartbeat_timeout, name, arg)
