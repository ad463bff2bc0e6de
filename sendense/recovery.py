"""What the disaster-recovery workflows (workflows.drill) and their activities (activities.recovery)
exchange: every request carries the job's spec, so each agent checks it against its own policy."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import Field

from sendense.models import BootCheck, DrillSummary, JobSpec, PointInfo, VmInfo, VmPlan, VmRef, Wire


class PointRequest(Wire):
    spec: JobSpec
    point_id: str | None = Field(default=None, description="None: the newest point")


class HoldRequest(Wire):
    spec: JobSpec
    point_id: str
    hold_id: str
    reason: str = ""


class VmRequest(Wire):
    spec: JobSpec
    plan: VmPlan


class VmNameRequest(Wire):
    spec: JobSpec
    name: str


class BootRequest(Wire):
    spec: JobSpec
    name: str
    pattern: str
    timeout_seconds: float


class DrillInput(Wire):
    spec: JobSpec
    drill_id: str = Field(
        default="",
        pattern=r"^([a-z0-9][a-z0-9-]{0,31})?$",
        description="'': made from the workflow id (a scheduled drill: each run its own)",
    )
    job_workflow_id: str = Field(description="the job's workflow, told the outcome (its `job status`)")
    target_queue: str
    point_id: str | None = Field(default=None, description="None: the newest point when the drill starts")
    keep: timedelta = Field(default=timedelta(0), description="how long the VM stays up after its boot check")
    notify_workflow_id: str | None = Field(
        default=None, description="told `vm_checked(job, ok, evidence)` after the boot check (a plan's drill)"
    )
    search_attributes: bool = True


class DrillStatus(Wire):
    """A drill as it goes (its `status` query)."""

    drill_id: str
    step: str = "starting"
    point_id: str = ""
    vm: VmRef | None = None
    boot: BootCheck | None = None
    keep_until: datetime | None = None


class DrillResult(Wire):
    """A drill's outcome, when it has ended: what it booted from, whether it booted, what it made, and
    whether everything it made is gone again (`cleaned`; `left_behind` says what is not)."""

    drill_id: str
    job: str
    point_id: str = ""
    point: PointInfo | None = None
    boot: BootCheck | None = None
    vm: VmRef | None = None
    error: str | None = Field(default=None, description="why the drill stopped before its end, if it did")
    cleaned: bool = False
    left_behind: list[str] = Field(default_factory=list)
    undone: list[str] = Field(default_factory=list, description="the saga's undos, in the order they ran")
    started_at: datetime | None = None
    ended_at: datetime | None = None

    def summary(self) -> DrillSummary:
        return DrillSummary(
            drill_id=self.drill_id,
            point_id=self.point_id,
            ok=self.boot.ok if self.boot is not None else None,
            seconds=self.boot.seconds if self.boot is not None else 0.0,
            evidence=(self.boot.evidence if self.boot is not None else "")[:512],
            error=self.error,
            ended_at=self.ended_at,
            cleaned=self.cleaned,
        )


class FailoverRequest(Wire):
    """`sendense failover`: the job's update, which runs the failover (workflows.failover) as its child."""

    failover_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    point_id: str | None = Field(default=None, description="None: the newest point")


class FailoverInput(Wire):
    spec: JobSpec
    failover_id: str
    target_queue: str
    point_id: str | None = None
    vm: VmInfo | None = Field(default=None, description="the source VM as found at create: its hardware")
    requested_at: datetime
    planned: bool = False
    search_attributes: bool = True


class FailoverResult(Wire):
    """A failover's outcome: the production VM on the target, booted and checked, from which point;
    or why not, and that what it made was removed again (`cleaned`)."""

    failover_id: str
    job: str
    point_id: str = ""
    planned: bool = False
    boot: BootCheck | None = None
    vm: VmRef | None = None
    rto_seconds: float | None = Field(default=None, description="from the request to the boot check passed")
    error: str | None = None
    cleaned: bool = True
    left_behind: list[str] = Field(default_factory=list)
    undone: list[str] = Field(default_factory=list)
    source_note: str | None = Field(default=None, description="a planned failover's source, if not off")
