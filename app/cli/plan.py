"""`sendense plan ...`: recovery plans (workflows.plan)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from app.cli.output import JsonOpt, emit_json, one_line, out, run

plan_app = typer.Typer(
    help="Recovery plans: groups of VMs drilled tier by tier, in boot order.", no_args_is_help=True
)


async def _plans() -> Any:
    from app.cli.client import Jobs
    from app.cli.plan_client import Plans

    return Plans(await Jobs.connect())


@plan_app.command("create")
def plan_create(
    file: Path = typer.Option(..., "-f", "--file", help="plan (YAML)"), as_json: bool = JsonOpt
) -> None:
    """Create a recovery plan; every job it names must be running."""
    from app.cli.plan_client import load_plan

    async def go() -> str:
        plan = load_plan(file)
        await (await _plans()).create(plan)
        return plan.name

    name = run(go)
    emit_json({"created": name}) if as_json else out.print(f"plan {name} created")


@plan_app.command("list")
def plan_list(as_json: bool = JsonOpt) -> None:
    """The recovery plans."""

    async def go() -> list[str]:
        return list(await (await _plans()).list())

    names = run(go)
    if as_json:
        emit_json(names)
    else:
        for n in names:
            out.print(n)


@plan_app.command("status")
def plan_status(name: str, as_json: bool = JsonOpt) -> None:
    """The plan's tiers and its last drill."""

    async def go() -> dict[str, Any]:
        return dict(await (await _plans()).status(name))

    st = run(go)
    if as_json:
        emit_json(st)
        return
    for n, tier in enumerate(st["plan"].tiers, 1):
        out.print(f"tier {n}: {', '.join(vm.job for vm in tier.vms)}")
    last = st["last_drill"]
    out.print("last drill: none" if last is None else f"last drill: {_verdict(last)}")


@plan_app.command("delete")
def plan_delete(name: str, as_json: bool = JsonOpt) -> None:
    """Delete the plan (its jobs stay)."""

    async def go() -> None:
        await (await _plans()).delete(name)

    run(go)
    emit_json({"deleted": name}) if as_json else out.print(f"plan {name} deleted")


def _verdict(r: Any) -> str:
    ok = r.error is None and r.cleaned and all(v.boot is not None and v.boot.ok for v in r.vms)
    head = f"drill {r.drill_id}: {'every VM booted' if ok else 'FAILED'}"
    spread = f"; points within {r.spread_seconds:g}s of each other" if r.spread_seconds is not None else ""
    return (
        head
        + spread
        + (f"; {one_line(r.error)}" if r.error else "")
        + ("" if r.cleaned else "; NOT cleaned up")
    )


@plan_app.command("drill")
def plan_drill(
    name: str,
    keep: str = typer.Option("0s", "--keep", help="keep every VM up this long once all tiers booted"),
    as_json: bool = JsonOpt,
) -> None:
    """Drill the plan: for every VM the point nearest one common instant, tier by tier (hooks before and
    after each), each VM boot-checked; then everything is cleaned up. Exit 1 unless every VM booted."""
    from app.cli.drill import keep_duration

    async def go() -> Any:
        plans = await _plans()
        h = await plans.drill(name, keep_duration(keep))
        if not as_json:
            out.print(f"{h.id} started")
        return await plans.wait(name, h, None if as_json else (lambda s: out.print(f"  {s}")))

    r = run(go)
    if as_json:
        emit_json(r)
    else:
        for p in r.points:
            out.print(f"  {p.job}: point {p.point_id} ({p.created_at:%Y-%m-%d %H:%M:%S}Z)")
        for v in r.vms:
            boot = "booted" if v.boot is not None and v.boot.ok else "did NOT boot"
            out.print(f"  {v.job}: {boot}{'' if v.cleaned else ' (NOT cleaned up)'}")
        out.print(_verdict(r))
    if r.error is not None or not r.cleaned or not all(v.boot is not None and v.boot.ok for v in r.vms):
        raise typer.Exit(1)


@plan_app.command("failover")
def plan_failover(name: str, as_json: bool = JsonOpt) -> None:
    """Fail the plan over: for every VM the point nearest one common instant, tier by tier (hooks
    before and after each), each through its job's own failover. A failure stops the plan there (the
    tiers before stay failed over). Exit 1 unless every VM failed over."""

    async def go() -> Any:
        return await (await _plans()).failover(name)

    r = run(go)
    if as_json:
        emit_json(r)
    else:
        for j in r.jobs:
            verdict = "failed over" if j.error is None else f"FAILED: {one_line(j.error)}"
            out.print(f"  {j.job}: point {j.point_id}: {verdict}")
        out.print(
            f"plan {name}: "
            + ("every VM failed over" if r.error is None else f"stopped: {one_line(r.error)}")
        )
    if r.error is not None:
        raise typer.Exit(1)


@plan_app.command("failback")
def plan_failback(
    name: str,
    stop_source: bool = typer.Option(
        False, "--stop-source", help="power off source VMs found running (else their failback is refused)"
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Fail the plan back: tier by tier in boot order (hooks before and after each), each failed-over
    job through its job's own failback (its VM replicated back, cut over, the source started). Jobs not
    failed over are skipped. A failure stops the plan there (the tiers before stay failed back).
    Exit 1 unless every failed-over VM failed back."""

    async def go() -> Any:
        return await (await _plans()).failback(name, stop_source)

    r = run(go)
    if as_json:
        emit_json(r)
    else:
        for j in r.jobs:
            verdict = (
                f"failed back ({j.syncs} reverse syncs, down {j.cutover_seconds}s)"
                if j.error is None
                else f"FAILED: {one_line(j.error)}"
            )
            out.print(f"  {j.job}: {verdict}")
        for job in r.skipped:
            out.print(f"  {job}: not failed over, skipped")
        out.print(
            f"plan {name}: "
            + ("every failed-over VM failed back" if r.error is None else f"stopped: {one_line(r.error)}")
        )
    if r.error is not None:
        raise typer.Exit(1)
