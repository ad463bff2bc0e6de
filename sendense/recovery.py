"""What the disaster-recovery workflows (workflows.drill) and their activities (activities.recovery)
exchange: every request carries the job's spec, so each agent checks it against its own policy."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import Field

from sendense.models import (
    BootCheck,
    DiskCopyResult,
    DrillSummary,
    FailbackSummary,
    FailedOver,
    JobSpec,
    PointInfo,
    RemoteExport,
    SnapshotRef,
    VmInfo,
    VmPlan,
    VmRef,
    Wire,
)


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


class FailbackRequest(Wire):
    """`sendense failback`: the job's update, which runs the failback (workflows.failback) as its child."""

    failback_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    stop_source: bool = Field(
        default=False, description="power off a source VM found running (else the failback is refused)"
    )
    max_syncs: int = Field(default=5, ge=1, le=50, description="reverse syncs while the VM runs, at most")
    small_bytes: int = Field(
        default=64 << 20, ge=0, description="cut over once a reverse sync had at most this much to read"
    )


class FailbackInput(Wire):
    spec: JobSpec
    failback_id: str
    source_queue: str
    target_queue: str
    failed_over: FailedOver
    requested_at: datetime
    stop_source: bool = False
    max_syncs: int = 5
    small_bytes: int = 64 << 20
    search_attributes: bool = True


class ReverseSync(Wire):
    """One reverse sync of a failback: the VM's snapshot copied into the source's disks."""

    snapshot_id: str
    cutover: bool = Field(default=False, description="the final one, with the VM powered off")
    bytes_read: int = 0
    bytes_written: int = Field(default=0, description="data written on the source's disks")
    bytes_zeroed: int = Field(default=0, description="ranges zeroed on the source's disks")
    planned_bytes: int = Field(default=0, description="what it had to read: the delta")
    seconds: float = 0.0
    compared_whole: list[str] = Field(
        default_factory=list, description="disks compared whole: where the source diverged was not known"
    )


class FailbackResult(Wire):
    """A failback's outcome: the source's disks hold what the failed-over VM wrote, the VM is gone and
    the job replicates again; or why not, and that the failed-over VM runs on as before (`cleaned`)."""

    failback_id: str
    job: str
    point_id: str = ""
    vm: str = ""
    syncs: int = 0
    reverse_syncs: list[ReverseSync] = Field(default_factory=list)
    bytes_written: int = Field(default=0, description="written and zeroed on the source's disks, in all")
    bytes_read: int = 0
    cutover_seconds: float | None = Field(
        default=None, description="the VM powered off to the source started"
    )
    started: bool = False
    start_note: str | None = Field(default=None, description="why the source VM was not started, if not")
    notes: list[str] = Field(default_factory=list, description="what went otherwise than usual, and why")
    error: str | None = None
    cleaned: bool = True
    left_behind: list[str] = Field(default_factory=list)
    undone: list[str] = Field(default_factory=list)

    def summary(self, at: datetime) -> FailbackSummary:
        return FailbackSummary(
            failback_id=self.failback_id,
            point_id=self.point_id,
            syncs=self.syncs,
            bytes_written=self.bytes_written,
            cutover_seconds=self.cutover_seconds,
            started=self.started,
            note=self.start_note,
            at=at,
        )


class ReverseSnapshotRequest(Wire):
    spec: JobSpec
    vm: str
    snapshot_id: str
    base: dict[str, str] | None = None


class ReverseCopyRequest(Wire):
    spec: JobSpec
    snapshot: SnapshotRef = Field(description="the VM's snapshot with this disk only")
    disk: str
    since: str | None = Field(
        default=None,
        description="the failover point's change id of the disk: where the source changed since it is "
        "copied too (the first reverse sync); None: only the VM's changes",
    )
    export: RemoteExport | None = Field(
        default=None, description="read the VM's snapshot across the link from this export (two agents)"
    )


class ReverseReleaseRequest(Wire):
    spec: JobSpec
    snapshot: SnapshotRef
    committed: bool


class ReverseCopyResult(Wire):
    result: DiskCopyResult
    planned_bytes: int
    compared_whole: bool = False
