"""Where a job's source runs now (sendense.agents): the registry's answer, asked on the control queue
before each sync of a job whose source can move between hosts. Also the host agent's announcements."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from sendense import config, platforms
from sendense.agents import ANNOUNCE_EVERY, REGISTRY_ID, Announcement, LocalVm, Located, alive, locate
from sendense.models import JobRequest

log = logging.getLogger(__name__)


class Placement:
    """locate_source, on the control queue: it holds the worker's Temporal client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @activity.defn(name="locate_source")
    async def locate_source(self, req: JobRequest) -> Located:
        found = req.spec.source.locator()
        if found is None:
            return Located(why="the source does not move between hosts")
        platform, vm_id = found
        p = platforms.get(platform)
        asked: Located | None = None
        if p is not None and p.locate is not None:  # the platform's API says which host runs it
            asked = await asyncio.to_thread(p.locate, req.spec.source)
            if asked.host_id is None:
                return asked
        try:
            agents = await self.client.get_workflow_handle(REGISTRY_ID).query(
                "agents", result_type=list[Announcement]
            )
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                return Located(why="no agent has announced itself yet")
            raise
        # (announcements carry the registry's time of hearing them: workflow time, the server's)
        now = datetime.now(UTC)
        if asked is not None:
            return alive(agents, asked, now)
        return locate(agents, platform, vm_id, now)


def local_vms() -> tuple[list[LocalVm], list[str]]:
    """The VMs this agent's platforms run on its host, and what could not be listed (one line each)."""
    vms: list[LocalVm] = []
    errors: list[str] = []
    for p in platforms.load_all():
        if p.local_vms is None:
            continue
        try:
            vms.extend(p.local_vms())
        except Exception as e:  # an inventory that fails must not stop the others' announcements
            errors.append(f"{p.name}: {e}")
    return vms, errors


async def announce_forever(client: Client, data_address: str | None) -> None:
    """Announce this agent to the registry every ANNOUNCE_EVERY until cancelled. A failure is
    logged once until announcements work again."""
    failing = False
    while True:
        try:
            vms, errors = await asyncio.to_thread(local_vms)
            a = Announcement(host_id=config.host_id(), data_address=data_address, vms=vms, errors=errors)
            await client.start_workflow(
                "AgentRegistryWorkflow",
                args=[[]],
                id=REGISTRY_ID,
                task_queue=config.CONTROL_QUEUE,
                start_signal="announce",
                start_signal_args=[a],
            )
            if failing:
                log.info("announcing this agent to the registry works again")
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not failing:
                log.warning("announcing this agent to the registry failed (retried): %s", e)
            failing = True
        await asyncio.sleep(ANNOUNCE_EVERY.total_seconds())
