"""The agents of a deployment and the VMs each runs now: where a job's source is, before each sync.

Each host agent announces itself every ANNOUNCE_EVERY (workers.worker.Announcer) to one long-lived
registry workflow (workflows.agents, id REGISTRY_ID): its host id, its data address, and the VMs its
platforms run on it (a hypervisor host: its running VMs, by their stable ids). Before each sync a job
whose source can move (SourceSpec.locator) asks the registry which fresh agent runs its VM (`locate`):
a VM migrated to another host is followed there. Pure: no I/O, no clocks (the caller passes `now`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import Field

from sendense.models import Wire

REGISTRY_ID = "sendense-agents"
ANNOUNCE_EVERY = timedelta(seconds=15)
FRESH = timedelta(seconds=60)  # an agent not heard of for longer is not believed (down, or cut off)
FORGET = timedelta(hours=1)  # ... and gone from the registry after this


class LocalVm(Wire):
    platform: str
    vm_id: str = Field(description="the platform's stable id of the VM (e.g. a UUID)")
    name: str = ""
    where: str = Field(default="", description="the agent's address of the VM (e.g. a connection URI)")


class Announcement(Wire):
    host_id: str
    data_address: str | None = None
    vms: list[LocalVm] = Field(default_factory=list)
    errors: list[str] = Field(
        default_factory=list, description="what the agent could not list, one line each"
    )
    at: datetime | None = Field(default=None, description="when the registry heard it (its clock)")


class Located(Wire):
    """Where a job's source VM runs now: `host_id` (and `where`, the agent's address of it), or None
    with `why` (no fresh agent runs it: stopped, or its agent is down; or several claim it)."""

    host_id: str | None = None
    where: str = ""
    why: str = ""


def locate(agents: list[Announcement], platform: str, vm_id: str, now: datetime) -> Located:
    """The one fresh agent that runs VM `vm_id` of `platform`."""
    fresh = [a for a in agents if a.at is not None and now - a.at <= FRESH]
    found = [(a, v) for a in fresh for v in a.vms if v.platform == platform and v.vm_id == vm_id]
    if len(found) == 1:
        a, v = found[0]
        return Located(host_id=a.host_id, where=v.where)
    if not found:
        stale = sorted(
            a.host_id
            for a in agents
            if a not in fresh
            for v in a.vms
            if (v.platform, v.vm_id) == (platform, vm_id)
        )
        why = f"no agent heard from in the last {int(FRESH.total_seconds())} s runs it"
        return Located(why=why + (f" (last seen on host {', '.join(stale)})" if stale else ""))
    hosts = sorted({a.host_id for a, _ in found})
    return Located(why=f"hosts {', '.join(hosts)} all say they run it (a migration in progress?)")


def alive(agents: list[Announcement], asked: Located, now: datetime) -> Located:
    """`asked` (a platform's API named the host that runs the VM) if that host's agent was heard from
    in the last FRESH: a sync placed on a host with no agent would wait for one forever."""
    if asked.host_id is None:
        return asked
    if any(a.host_id == asked.host_id and a.at is not None and now - a.at <= FRESH for a in agents):
        return asked
    return Located(
        why=f"it runs on host {asked.host_id}, whose agent was not heard from in the last "
        f"{int(FRESH.total_seconds())} s"
    )


def heard(table: dict[str, Announcement], a: Announcement, now: datetime) -> dict[str, Announcement]:
    """The registry's table after announcement `a` arrived at `now`: stale agents forgotten."""
    table = {h: x for h, x in table.items() if x.at is not None and now - x.at <= FORGET}
    table[a.host_id] = a.model_copy(update={"at": now})
    return table
