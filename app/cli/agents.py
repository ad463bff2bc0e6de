"""`sendense agent list`: the agents the registry heard from (workflows.agents), and the VMs each runs."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Column, Table

from app.cli.output import JsonOpt, emit_json, out, run
from sendense.agents import FRESH, REGISTRY_ID, Announcement

agent_app = typer.Typer(help="Host agents: which run, and which VMs each runs now.", no_args_is_help=True)


async def registered() -> list[Announcement]:
    """What each agent last announced (empty: none has yet)."""
    from temporalio.service import RPCError, RPCStatusCode

    from workers.worker import connect

    client = await connect()
    try:
        return list(
            await client.get_workflow_handle(REGISTRY_ID).query("agents", result_type=list[Announcement])
        )
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return []
        raise


@agent_app.command("list")
def agent_list(as_json: bool = JsonOpt) -> None:
    """Each agent's host id, when it was last heard from, its data address and the VMs it runs (a job
    whose VM moved follows it to the agent listed here at its next sync)."""
    agents = run(registered)
    if as_json:
        emit_json(agents)
        return
    if not agents:
        out.print("no agent has announced itself yet (agents announce every 15 s once they run)")
        return
    now = datetime.now(UTC)
    t = Table(Column("host", no_wrap=True), "heard", "data address", "VMs", "problems")
    for a in agents:
        age = (now - a.at).total_seconds() if a.at else None
        heard = (
            "-"
            if age is None
            else f"{max(0, age):.0f}s ago" + ("" if age <= FRESH.total_seconds() else " (stale)")
        )
        names = ", ".join(v.name or v.vm_id for v in a.vms[:4]) + (
            f" +{len(a.vms) - 4}" if len(a.vms) > 4 else ""
        )
        t.add_row(
            a.host_id,
            heard,
            a.data_address or "-",
            f"{len(a.vms)}: {names}" if a.vms else "0",
            "; ".join(a.errors) or "-",
        )
    out.print(t)
