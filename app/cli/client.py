"""Client-side operations on jobs, shared by the CLI and by services using the SDK."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.api.failure.v1 import Failure
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateStage,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from app.cli.link_client import JobShare, job_share
from sendense import config, platforms
from sendense.errors import InvalidSpec, ResourceNotFound, ResourceUnavailable, SendenseError
from sendense.models import (
    CopyToken,
    DeleteRequest,
    JobSpec,
    JobStatus,
    ReplicationInput,
    Retention,
    Schedule,
    Settings,
    SyncNowRequest,
    SyncResult,
    Tuning,
)
from sendense.recovery import FailbackRequest, FailbackResult, FailoverRequest, FailoverResult
from workers.worker import connect
from workflows.common import SA_JOB, SA_SOURCE, SA_STATE, SA_TARGET
from workflows.replication import ReplicationWorkflow


class PendingStep(BaseModel):
    """An activity of the job in flight, as the server describes it: which attempt, and why the last
    one failed (a sync retrying under errors shows more than `syncing`)."""

    activity: str
    attempt: int
    maximum_attempts: int = 0
    state: str = ""
    last_failure: str | None = None
    next_attempt_at: datetime | None = None


class JobView(JobStatus):
    """`job status`: the workflow's own status and the steps in flight with their retries."""

    steps: list[PendingStep] = Field(default_factory=list)
    spec_problem: str | None = Field(default=None, description="why the job's stored spec is invalid")
    link_share: JobShare | None = Field(default=None, description="its copies' share of its link now")
    no_answer: str | None = Field(default=None, description="why the job's status could not be read")


def pending_steps(
    desc: WorkflowExecutionDescription, failures: dict[int, str] | None = None
) -> list[PendingStep]:
    """The steps in flight; `failures`: their last failures' messages decoded (by index), which the
    history holds encrypted (workers.codec: `Encoded failure` in the clear)."""
    steps = []
    for i, pa in enumerate(desc.raw_description.pending_activities):
        failure = pa.last_failure.message if pa.HasField("last_failure") else ""
        failure = (failures or {}).get(i, failure)
        nxt = (
            pa.next_attempt_schedule_time.ToDatetime(UTC)
            if pa.HasField("next_attempt_schedule_time")
            else None
        )
        steps.append(
            PendingStep(
                activity=pa.activity_type.name,
                attempt=pa.attempt,
                maximum_attempts=pa.maximum_attempts,
                state=PendingActivityState.Name(pa.state).removeprefix("PENDING_ACTIVITY_STATE_").lower(),
                last_failure=" ".join(failure.split()) or None,
                next_attempt_at=nxt,
            )
        )
    return steps


def readable_spec(data: Any) -> tuple[JobSpec, str | None]:
    """A job's spec as the workflow holds it, and what is wrong with it if it no longer validates
    (settings stored before they were checked): the parts that fail fall back to their defaults, so
    that its points can still be listed and exported."""
    from sendense.spec import format_validation_error

    try:
        return JobSpec.model_validate(data), None
    except ValidationError as e:
        problem = (
            f"its stored settings are invalid ({format_validation_error(e)}); "
            "set them again with `sendense job settings`"
        )
    fixed = dict(data)
    for section, model in (("schedule", Schedule), ("retention", Retention), ("tuning", Tuning)):
        try:
            model.model_validate(fixed.get(section) or {})
        except ValidationError:
            fixed.pop(section, None)
    return JobSpec.model_validate(fixed), problem


class Jobs:
    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def connect(cls) -> Jobs:
        return cls(await connect())

    def handle(self, name: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(config.workflow_id(name))

    async def _running(self, name: str) -> WorkflowHandle[Any, Any]:
        return (await self._described(name))[0]

    async def _described(self, name: str) -> tuple[WorkflowHandle[Any, Any], WorkflowExecutionDescription]:
        h = self.handle(name)
        try:
            desc = await h.describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ResourceNotFound(f"job {name}: not found") from None
            raise
        if desc.status != WorkflowExecutionStatus.RUNNING:
            status = desc.status.name.lower() if desc.status else "closed"
            raise ResourceNotFound(f"job {name}: not running ({status})")
        return h, desc

    async def exists(self, name: str) -> bool:
        """Whether a job of this name is running."""
        try:
            await self._running(name)
        except ResourceNotFound:
            return False
        return True

    async def create(self, spec: JobSpec, search_attributes: bool = True) -> WorkflowHandle[Any, Any]:
        if not spec.job_id:  # the job's identity: its replicas and points belong to it, not to its name
            spec = spec.model_copy(update={"job_id": secrets.token_hex(8)})
        # a source reached by API (its steps on the control queue), the target on this machine's
        # agent: the job names this host for the target, so that no other agent takes it for its own
        api_source = platforms.queue_of(spec.source) == config.CONTROL_QUEUE
        if (
            api_source
            and spec.target.host is None
            and platforms.queue_of(spec.target) != config.CONTROL_QUEUE
        ):
            spec = spec.model_copy(
                update={"target": spec.target.model_copy(update={"host": config.host_id()})}
            )
        source_q, target_q = platforms.queues(spec)
        sa = TypedSearchAttributes(
            [
                SearchAttributePair(SA_JOB, spec.name),
                SearchAttributePair(SA_SOURCE, spec.source.platform),
                SearchAttributePair(SA_TARGET, spec.target.platform),
                SearchAttributePair(SA_STATE, "starting"),
            ]
        )
        try:
            return await self.client.start_workflow(
                ReplicationWorkflow.run,
                ReplicationInput(spec=spec, source_queue=source_q, target_queue=target_q),
                id=config.workflow_id(spec.name),
                task_queue=config.CONTROL_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=sa if search_attributes else TypedSearchAttributes.empty,
                static_summary=f"Replication {spec.name}: {spec.source.platform} -> {spec.target.platform}",
                static_details=f"Replicates {spec.source.describe()} to "
                f"{spec.target.describe()}, every {spec.schedule.interval}, "
                f"keeping {spec.retention.points} recovery points.",
            )
        except WorkflowAlreadyStartedError:
            raise InvalidSpec(f"name: job {spec.name!r} already exists") from None

    async def wait_started(self, name: str, timeout: float = 120) -> JobStatus:
        """Wait until the job has validated its source and target (or failed doing so)."""
        h = self.handle(name)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            desc = await h.describe()
            if desc.status != WorkflowExecutionStatus.RUNNING:
                raise SendenseError(f"job {name}: {await self._failure(h)}")
            st: JobStatus = await h.query(ReplicationWorkflow.status)
            if st.state != "starting" or asyncio.get_running_loop().time() > deadline:
                return st
            await asyncio.sleep(0.3)

    async def _failure(self, h: WorkflowHandle[Any, Any]) -> str:
        try:
            await h.result()
        except Exception as e:  # noqa: BLE001 - we want the root cause's message
            cause: BaseException | None = e
            while getattr(cause, "cause", None) is not None:
                cause = cause.cause  # type: ignore[union-attr]
            return getattr(cause, "message", None) or str(cause)
        return "ended"

    async def list(self, timeout: float = 5.0) -> list[JobView]:
        """Every running job's status, asked all at once: a job that does not answer in `timeout`
        seconds (no worker runs its workflow, its task fails) is listed in state `error` saying so,
        not left out, and does not hold up or fail the others."""
        query = "WorkflowType='ReplicationWorkflow' AND ExecutionStatus='Running'"
        ids = [wf.id async for wf in self.client.list_workflows(query)]

        async def one(wf_id: str) -> JobView:
            h = self.client.get_workflow_handle(wf_id)
            try:
                st: JobStatus = await h.query(
                    ReplicationWorkflow.status, rpc_timeout=timedelta(seconds=timeout)
                )
                return JobView(**dict(st))
            except (RPCError, WorkflowQueryFailedError) as e:
                why = " ".join(str(getattr(e, "message", "") or e).split())
            name = wf_id.removeprefix(config.WORKFLOW_ID_PREFIX)
            return JobView(
                name=name,
                state="error",
                source="-",
                target="-",
                interval_seconds=0,
                retention_points=0,
                no_answer=f"the job does not answer ({why}); is a worker running for it?",
            )

        out = await asyncio.gather(*(one(i) for i in ids))
        return sorted(out, key=lambda s: s.name)

    async def status(self, name: str, timeout: float = 10.0) -> JobView:
        h, desc = await self._described(name)
        try:
            st: JobStatus = await h.query(ReplicationWorkflow.status, rpc_timeout=timedelta(seconds=timeout))
        except RPCError as e:
            if e.status not in (
                RPCStatusCode.DEADLINE_EXCEEDED,
                RPCStatusCode.CANCELLED,
            ):  # (the client's deadline)
                raise
            raise ResourceUnavailable(
                f"job {name}: does not answer within {timeout:.0f}s; is a worker running for it?"
            ) from None
        _, problem = readable_spec(await h.query("get_spec", result_type=dict))
        failures = await self._failure_messages(desc)
        share = await job_share(self.client, name, st.link) if st.link else None
        return JobView(
            **dict(st), steps=pending_steps(desc, failures), spec_problem=problem, link_share=share
        )

    async def _failure_messages(self, desc: WorkflowExecutionDescription) -> dict[int, str]:
        """The pending activities' last failure messages, decrypted (by index)."""
        out: dict[int, str] = {}
        for i, pa in enumerate(desc.raw_description.pending_activities):
            if not pa.HasField("last_failure") or not pa.last_failure.HasField("encoded_attributes"):
                continue
            failure = Failure()
            failure.CopyFrom(pa.last_failure)
            try:
                exc = await self.client.data_converter.decode_failure(failure)
            except Exception as e:  # noqa: BLE001 - a key this client lacks: say so in the step
                out[i] = f"(cannot decrypt: {getattr(e, 'message', None) or e})"
                continue
            out[i] = str(getattr(exc, "message", None) or exc)
        return out

    async def spec(self, name: str) -> JobSpec:
        return (await self.spec_and_problem(name))[0]

    async def spec_and_problem(self, name: str) -> tuple[JobSpec, str | None]:
        """The job's spec (see `readable_spec`) and, for a job whose stored settings are invalid, why."""
        h = self.handle(name)
        try:
            data = await h.query("get_spec", result_type=dict)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ResourceNotFound(f"job {name}: not found") from None
            raise
        return readable_spec(data)

    async def sync_now(self, name: str, wait: bool) -> SyncResult | None:
        """Request a sync; with `wait`, return its result (the sync that starts after this request).
        Either way it goes through the update's validator: a paused or deleting job refuses it (a
        signal would have been queued silently on a paused job)."""
        h = await self._running(name)
        upd = await h.start_update(
            ReplicationWorkflow.sync_now, SyncNowRequest(), wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )
        if wait or getattr(upd, "_known_outcome", None) is not None:  # refused by the validator: raise it
            return await upd.result()
        return None

    async def copy_progress(self, h: WorkflowHandle[Any, Any]) -> dict[str, CopyToken]:
        desc = await h.describe()
        out: dict[str, CopyToken] = {}
        for pa in desc.raw_description.pending_activities:
            if pa.activity_type.name != "copy_disk" or not pa.heartbeat_details.payloads:
                continue
            vals = await self.client.data_converter.decode(list(pa.heartbeat_details.payloads))
            if vals:
                tok = CopyToken.model_validate(vals[0])
                out[tok.disk] = tok
        return out

    async def pause(self, name: str) -> None:
        await (await self._running(name)).signal(ReplicationWorkflow.pause)

    async def resume(self, name: str) -> None:
        await (await self._running(name)).signal(ReplicationWorkflow.resume)

    async def settings(self, name: str, settings: Settings) -> JobStatus:
        h = await self._running(name)
        return await h.execute_update(ReplicationWorkflow.update_settings, settings)

    async def failover(self, name: str, point_id: str | None = None) -> FailoverResult:
        """Fail the job over (unplanned: the newest point, or `point_id`): its result, also when the
        failover failed and was rolled back (`error` says why)."""
        h = await self._running(name)
        try:
            return await h.execute_update(
                ReplicationWorkflow.failover,
                FailoverRequest(failover_id=secrets.token_hex(4), point_id=point_id),
            )
        except WorkflowUpdateFailedError as e:
            raise InvalidSpec(f"job {name}: {getattr(e.cause, 'message', None) or e.cause}") from None

    async def failback(self, name: str, req: FailbackRequest) -> FailbackResult:
        """Fail the job back (workflows.failback): its result, also when the failback failed and was
        rolled back (`error` says why)."""
        h = await self._running(name)
        try:
            return await h.execute_update(ReplicationWorkflow.failback, req)
        except WorkflowUpdateFailedError as e:
            raise InvalidSpec(f"job {name}: {getattr(e.cause, 'message', None) or e.cause}") from None

    async def delete(self, name: str, purge: bool) -> JobStatus:
        """The job's final status: `left_behind` says what the delete could not remove."""
        h = await self._running(name)
        try:  # no more drills of a job that is going (a schedule would start them on and on)
            await self.client.get_schedule_handle(config.drill_schedule_id(name)).delete()
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
        await h.execute_update(ReplicationWorkflow.delete, DeleteRequest(purge=purge))
        final = await h.result()
        return final if isinstance(final, JobStatus) else JobStatus.model_validate(final)
