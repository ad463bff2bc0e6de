"""`sendense drill ...`: test failovers of a job (workflows.drill)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import typer

from app.cli.output import JsonOpt, emit_json, one_line, out, run
from sendense.errors import InvalidSpec
from sendense.models import parse_duration

drill_app = typer.Typer(
    help="Drills: test failovers in an isolated network, boot-checked.", no_args_is_help=True
)


async def _drills() -> Any:
    from app.cli.client import Jobs
    from app.cli.drill_client import Drills

    return Drills(await Jobs.connect())


def keep_duration(text: str) -> timedelta:
    try:
        keep = parse_duration(text)
    except ValueError:
        raise InvalidSpec("--keep: a duration such as 30s, 10m or 2h") from None
    if not timedelta(0) <= keep <= timedelta(days=7):
        raise InvalidSpec("--keep: between 0s and 7d")
    return keep  # type: ignore[no-any-return]


def _lines(r: Any) -> list[str]:
    lines = [f"drill {r.drill_id} of job {r.job}: point {r.point_id or '(none)'}"]
    if r.vm is not None:
        lines.append(f"  VM {r.vm.name} ({r.vm.platform}, {r.vm.mode}, {r.vm.vm_id or 'no id'})")
    if r.boot is not None:
        verdict = "booted" if r.boot.ok else "did NOT boot"
        lines.append(f"  {verdict} in {r.boot.seconds:.1f}s: {one_line(r.boot.evidence)[:300]}")
    if r.error:
        lines.append(f"  failed: {one_line(r.error)}")
    lines.append(
        "  cleaned up: nothing left" if r.cleaned else f"  NOT cleaned up: {'; '.join(r.left_behind)}"
    )
    return lines


@drill_app.command("run")
def drill_run(
    job: str,
    point: str | None = typer.Option(None, "--point", help="the point to boot (default: the newest)"),
    keep: str = typer.Option("0s", "--keep", help="keep the VM up this long after its boot check (e.g. 30m)"),
    as_json: bool = JsonOpt,
) -> None:
    """Hold a point, boot a test VM from it in an isolated network, check it booted, clean up.
    Replication goes on meanwhile. Exit 1 unless the VM booted and nothing is left."""

    async def go() -> Any:
        kept = keep_duration(keep)
        drills = await _drills()
        h = await drills.start(job, point, kept)
        if not as_json:
            out.print(f"drill {h.id} started")

        def step(st: Any) -> None:
            if not as_json:
                out.print(f"  {st.step}")

        return await drills.wait(h, step)

    r = run(go)
    if as_json:
        emit_json(r)
    else:
        for line in _lines(r):
            out.print(line)
    if r.error or not r.cleaned or r.boot is None or not r.boot.ok:
        raise typer.Exit(1)


def _every(text: str, what: str, low: timedelta, high: timedelta) -> timedelta:
    try:
        v = parse_duration(text)
    except ValueError:
        raise InvalidSpec(f"{what}: a duration such as 12h, 1d or 7d") from None
    if not low <= v <= high:
        raise InvalidSpec(f"{what}: between {low} and {high}")
    return v  # type: ignore[no-any-return]


def _at(text: str | None) -> timedelta:
    if text is None:
        return timedelta(0)
    hh, sep, mm = text.partition(":")
    if not (sep and hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60 and len(mm) == 2):
        raise InvalidSpec("--at: a time of day, HH:MM (UTC)")
    return timedelta(hours=int(hh), minutes=int(mm))


def _job_or_plan(job: str | None, plan: str | None) -> str:
    if (job is None) == (plan is None):
        raise InvalidSpec("give a job, or --plan NAME (one of them)")
    return f"plan {plan}" if plan is not None else f"job {job}"


async def _plans() -> Any:
    from app.cli.client import Jobs
    from app.cli.plan_client import Plans

    return Plans(await Jobs.connect())


@drill_app.command("schedule")
def drill_schedule(
    job: str | None = typer.Argument(None, help="the job (or --plan)"),
    plan: str | None = typer.Option(None, "--plan", help="a recovery plan instead of a job"),
    every: str = typer.Option(..., "--every", help="how often, e.g. 1d or 7d (1h to 90d)"),
    at: str | None = typer.Option(None, "--at", help="HH:MM UTC past each interval's start, e.g. 02:00"),
    as_json: bool = JsonOpt,
) -> None:
    """Drill a job (or a plan) on a Temporal Schedule (a drill still running when the next is due is
    skipped; each run is a drill of its own)."""

    async def go() -> tuple[str, str]:
        what = _job_or_plan(job, plan)
        period = _every(every, "--every", timedelta(hours=1), timedelta(days=90))
        offset = _at(at)
        if offset >= period:
            raise InvalidSpec("--at: must fall within one --every")
        if plan is not None:
            return what, str(await (await _plans()).schedule(plan, period, offset))
        return what, str(await (await _drills()).schedule(job, period, offset))

    what, sid = run(go)
    emit_json({"schedule_id": sid}) if as_json else out.print(f"drills of {what} scheduled ({sid})")


@drill_app.command("unschedule")
def drill_unschedule(
    job: str | None = typer.Argument(None, help="the job (or --plan)"),
    plan: str | None = typer.Option(None, "--plan", help="a recovery plan instead of a job"),
    as_json: bool = JsonOpt,
) -> None:
    """Remove the drill schedule of a job (or a plan); drills running now go on."""

    async def go() -> str:
        what = _job_or_plan(job, plan)
        if plan is not None:
            await (await _plans()).unschedule(plan)
        else:
            await (await _drills()).unschedule(job)
        return what

    what = run(go)
    emit_json({"unscheduled": True}) if as_json else out.print(f"drills of {what} unscheduled")


@drill_app.command("end")
def drill_end(job: str, as_json: bool = JsonOpt) -> None:
    """End the job's kept drill now: its VM is destroyed and its point released."""

    async def go() -> list[str]:
        return list(await (await _drills()).end(job))

    ids = run(go)
    emit_json({"ended": ids}) if as_json else out.print(f"ending drill {', '.join(ids)}: it cleans up now")


@drill_app.command("list")
def drill_list(job: str, as_json: bool = JsonOpt) -> None:
    """The job's drills, newest first, with their outcomes."""

    async def go() -> list[Any]:
        return list(await (await _drills()).list(job))

    drills = run(go)
    if as_json:
        emit_json(drills)
        return
    if not drills:
        out.print(f"job {job} has had no drill")
        return
    for d in drills:
        if hasattr(d, "cleaned"):
            for line in _lines(d):
                out.print(line)
        else:
            out.print(f"drill {d.drill_id}: running: {d.step}")
