"""Client-side operations on site links (their governors, workflows.governor), shared by the CLI and
by services using the SDK."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from sendense import config
from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.links import GovernorInput, LinkChange, LinkSpec, LinkStatus, budget_at, window_at
from sendense.models import Wire
from sendense.spec import format_validation_error
from workers.worker import connect
from workflows.governor import LEASE_VALID, LinkGovernorWorkflow

# a spec field -> the option that sets it (errors name what the user typed)
OPTIONS = {
    "rate": "--rate",
    "timezone": "--tz",
    "windows": "--window",
    "weights": "--weights",
    "name": "NAME",
}


def parse_window(text: str) -> dict[str, Any]:
    """`08:00-18:00=200Mbit`, `22:00-06:00=unlimited`, `08:00-18:00=200Mbit@mon-fri` as a window."""
    times, eq, rest = text.partition("=")
    start, dash, end = times.partition("-")
    if not (eq and dash):
        raise InvalidSpec(f"--window {text}: START-END=RATE[@DAYS], e.g. 08:00-18:00=200Mbit@mon-fri")
    rate, at, days = rest.partition("@")
    w: dict[str, Any] = {"start": start.strip(), "end": end.strip(), "rate": rate.strip()}
    if at:
        w["days"] = days.strip()
    return w


def parse_weights(text: str) -> dict[str, Any]:
    """`critical=50,normal=30,low=20` (or some of them)."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        k, eq, v = part.partition("=")
        if not eq or not v.strip().isdigit():
            raise InvalidSpec("--weights: CLASS=WEIGHT,..., e.g. critical=50,normal=30,low=20")
        out[k.strip()] = int(v)
    return out


def validated(data: dict[str, Any], windows: list[str] | None = None) -> LinkSpec:
    """`data` as a link spec; an error names the option (`--tz: not an IANA time zone`)."""
    try:
        return LinkSpec.model_validate(data)
    except ValidationError as e:
        line = format_validation_error(e)
    m = re.match(r"^(\w+)(?:\.(\d+))?\.?([\w.]*): (.*)\Z", line)
    if m is None:
        raise InvalidSpec(line)
    field, index, rest, msg = m.groups()
    opt = OPTIONS.get(field, field)
    if field == "windows" and index is not None and windows is not None and int(index) < len(windows):
        opt = f"--window {windows[int(index)]}"
    raise InvalidSpec(f"{opt}{': ' + rest if rest else ''}: {msg}")


class Links:
    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def connect(cls) -> Links:
        return cls(await connect())

    def handle(self, name: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(config.link_workflow_id(name))

    async def _running(self, name: str) -> WorkflowHandle[Any, Any]:
        h = self.handle(name)
        try:
            desc = await h.describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ResourceNotFound(f"link {name}: not found (sendense link create {name} ...)") from None
            raise
        if desc.status != WorkflowExecutionStatus.RUNNING:
            raise ResourceNotFound(f"link {name}: not found (deleted)")
        return h

    async def create(self, spec: LinkSpec) -> None:
        try:
            await self.client.start_workflow(
                LinkGovernorWorkflow.run,
                GovernorInput(spec=spec.model_dump(mode="json")),
                id=config.link_workflow_id(spec.name),
                task_queue=config.CONTROL_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                static_summary=f"Link {spec.name}: the bandwidth governor",
            )
        except WorkflowAlreadyStartedError:
            raise InvalidSpec(f"NAME: link {spec.name!r} already exists") from None

    async def status(self, name: str, timeout: float = 10.0) -> LinkStatus:
        """The governor's status, with the budget and window of now and the leases still live now."""
        h = await self._running(name)
        st: LinkStatus = await h.query(LinkGovernorWorkflow.status, rpc_timeout=timedelta(seconds=timeout))
        return now_view(st)

    async def spec(self, name: str) -> LinkSpec:
        return LinkSpec.model_validate((await self.status(name)).spec)

    async def list(self) -> list[LinkStatus]:
        query = "WorkflowType='LinkGovernorWorkflow' AND ExecutionStatus='Running'"
        ids = [wf.id async for wf in self.client.list_workflows(query)]
        names = [i.removeprefix(config.LINK_WORKFLOW_PREFIX) for i in ids]
        found = await asyncio.gather(*(self.status(n) for n in names), return_exceptions=True)
        return sorted((s for s in found if isinstance(s, LinkStatus)), key=lambda s: str(s.spec["name"]))

    async def set(self, spec: LinkSpec) -> LinkStatus:
        h = await self._running(spec.name)
        try:
            st = await h.execute_update(
                LinkGovernorWorkflow.set_link, LinkChange(spec=spec.model_dump(mode="json"))
            )
        except WorkflowUpdateFailedError as e:
            raise InvalidSpec(str(getattr(e.cause, "message", None) or e.cause)) from None
        return now_view(st)

    async def delete(self, name: str) -> None:
        h = await self._running(name)
        try:
            await h.execute_update(LinkGovernorWorkflow.delete)
        except WorkflowUpdateFailedError as e:
            raise InvalidSpec(str(getattr(e.cause, "message", None) or e.cause)) from None
        await h.result()


def now_view(st: LinkStatus, now: datetime | None = None) -> LinkStatus:
    """`st` as of now: the governor computes the budget when a lease arrives, and with no copies
    none does; the leases not renewed in time are left out (they have lapsed)."""
    now = now or datetime.now(UTC)
    spec = LinkSpec.model_validate(st.spec)
    w = window_at(spec, now)
    live = [h for h in st.holders if now - h.last_seen <= timedelta(seconds=LEASE_VALID)]
    return st.model_copy(
        update={
            "at": now,
            "budget": budget_at(spec, now),
            "window": w.describe() if w is not None else None,
            "holders": live,
        }
    )


class JobShare(Wire):
    """A job's current share of its link, as `job status` shows it (its copies' leases summed)."""

    rate: int | None = None
    share: float | None = None
    measured_rate: float | None = None
    copies: int = 0
    note: str | None = None


async def job_share(client: Client, job: str, link: str) -> JobShare:
    """What the job's copies are granted on `link` now (none copying: zero copies)."""
    try:
        st = await Links(client).status(link, timeout=5.0)
    except (ResourceNotFound, RPCError) as e:
        return JobShare(note=getattr(e, "message", None) or str(e))
    mine = [h for h in st.holders if h.job == job]
    if not mine:
        return JobShare()
    rates = [h.rate for h in mine]
    return JobShare(
        rate=None if any(r is None for r in rates) else sum(r for r in rates if r is not None),
        share=None if any(h.share is None for h in mine) else sum(h.share or 0 for h in mine),
        measured_rate=sum(h.measured_rate or 0 for h in mine),
        copies=len(mine),
    )
