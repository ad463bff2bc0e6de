"""Recovery plans: jobs in tiers (boot order), with per-VM overrides and hook commands before and after
each tier; and what a plan's drill (workflows.plan) exchanges with its children and activities."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from sendense.models import JOB_NAME, Duration, HostId, JobSpec, RecoverySpec, Strict, Wire
from sendense.recovery import DrillResult, FailbackResult, FailoverResult


class Hook(Strict):
    """A command run on an agent before or after a tier (the agent's policy must list its program)."""

    command: list[str] = Field(
        min_length=1, max_length=64, description="program (absolute path) and arguments"
    )
    agent: HostId | None = Field(default=None, description="host id whose agent runs it (default: this host)")
    timeout: Duration = Field(default=timedelta(minutes=5), description="then it failed (1s to 1h)")

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        if not v[0].startswith("/"):
            raise ValueError("the program must be an absolute path")
        if any(len(a) > 1024 or "\0" in a for a in v):
            raise ValueError("an argument is longer than 1024 characters or holds a NUL")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= v <= timedelta(hours=1):
            raise ValueError("must be between 1s and 1h")
        return v


class PlanVm(Strict):
    job: str = Field(description="the job whose VM this is")
    recovery: RecoverySpec | None = Field(default=None, description="overrides the job's `recovery`")

    @field_validator("job")
    @classmethod
    def _job(cls, v: str) -> str:
        if not JOB_NAME.match(v):
            raise ValueError("must be a job name (1-63 chars of a-z 0-9 _ -)")
        return v


class Tier(Strict):
    vms: list[PlanVm] = Field(min_length=1, max_length=64)
    before: Hook | None = None
    after: Hook | None = None


class PlanSpec(Strict):
    name: str
    tiers: list[Tier] = Field(min_length=1, max_length=16, description="in boot order")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not JOB_NAME.match(v):
            raise ValueError("must be 1-63 chars of a-z 0-9 _ - starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _each_job_once(self) -> Self:
        seen: dict[str, int] = {}
        for i, tier in enumerate(self.tiers):
            for vm in tier.vms:
                if vm.job in seen:
                    raise ValueError(
                        f"job {vm.job} is in tier {seen[vm.job] + 1} and tier {i + 1}: once only"
                    )
                seen[vm.job] = i
        return self

    def jobs(self) -> list[str]:
        return [vm.job for t in self.tiers for vm in t.vms]


class PlanJob(Wire):
    """One VM of a plan's drill: its job's spec (with the plan's overrides) and where it runs."""

    spec: JobSpec
    job_workflow_id: str
    target_queue: str


class PlanDrillInput(Wire):
    plan: PlanSpec
    jobs: dict[str, PlanJob]
    hook_queues: dict[str, str] = Field(default_factory=dict, description="hook agent ('' local) -> queue")
    drill_id: str = Field(
        default="", pattern=r"^([a-z0-9][a-z0-9-]{0,31})?$", description="'': a scheduled run's own"
    )
    keep: timedelta = timedelta(0)
    plan_workflow_id: str | None = Field(default=None, description="told the result (`plan status`)")
    search_attributes: bool = True


class HookRequest(Wire):
    plan: str
    tier: int
    when: Literal["before", "after"]
    command: list[str]
    timeout_seconds: float


class HookResult(Wire):
    tier: int
    when: str
    ok: bool
    exit_code: int | None = None
    seconds: float = 0.0
    output: str = Field(default="", description="the output's tail")


class PointChoice(Wire):
    job: str
    point_id: str
    created_at: datetime


class PlanDrillResult(Wire):
    plan: str
    drill_id: str
    instant: datetime | None = Field(default=None, description="the common instant the points are nearest")
    spread_seconds: float | None = Field(default=None, description="newest minus oldest chosen point")
    points: list[PointChoice] = Field(default_factory=list)
    vms: list[DrillResult] = Field(default_factory=list)
    hooks: list[HookResult] = Field(default_factory=list)
    error: str | None = None
    cleaned: bool = False
    started_at: datetime | None = None
    ended_at: datetime | None = None


class JobFailoverRequest(Wire):
    """A plan's failover of one of its jobs, through the job's own `failover` update (by its id, so a
    retried step finds the same failover)."""

    job: str
    job_workflow_id: str
    failover_id: str
    point_id: str | None = None


class PlanFailoverInput(Wire):
    plan: PlanSpec
    jobs: dict[str, PlanJob]
    hook_queues: dict[str, str] = Field(default_factory=dict)
    failover_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    control_queue: str
    search_attributes: bool = True


class PlanFailoverResult(Wire):
    """A plan's failover: per job its failover's result, tier by tier, from the points nearest one
    instant. A failure stops the plan: the tiers before it stay failed over (a failback returns them),
    later tiers are not touched."""

    plan: str
    failover_id: str
    instant: datetime | None = None
    spread_seconds: float | None = None
    points: list[PointChoice] = Field(default_factory=list)
    jobs: list[FailoverResult] = Field(default_factory=list)
    hooks: list[HookResult] = Field(default_factory=list)
    error: str | None = None
    rto_seconds: float | None = Field(default=None, description="request to the last VM's boot check passed")
    started_at: datetime | None = None
    ended_at: datetime | None = None


class JobFailbackRequest(Wire):
    """A plan's failback of one of its jobs, through the job's own `failback` update (by its id)."""

    job: str
    job_workflow_id: str
    failback_id: str
    stop_source: bool = False


class PlanFailbackInput(Wire):
    plan: PlanSpec
    jobs: dict[str, PlanJob]
    hook_queues: dict[str, str] = Field(default_factory=dict)
    failback_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    control_queue: str
    stop_source: bool = False
    search_attributes: bool = True


class PlanFailbackResult(Wire):
    """A plan's failback: per job its failback's result, tier by tier in boot order (a tier's sources
    run again before the next tier's cut over). A failure stops the plan: the tiers before it stay
    failed back, later tiers stay failed over (their VMs run on), and the result says so."""

    plan: str
    failback_id: str
    jobs: list[FailbackResult] = Field(default_factory=list)
    hooks: list[HookResult] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list, description="jobs that were not failed over")
    error: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
