"""`sendense failover`: the job's VM made on its target from a point (workflows.failover)."""

from __future__ import annotations

from typing import Any

import typer

from app.cli.output import JsonOpt, emit_json, one_line, out, run


def failover(
    job: str,
    point: str | None = typer.Option(None, "--point", help="the point to fail over to (default: the newest)"),
    as_json: bool = JsonOpt,
) -> None:
    """Stop the job's schedule and make its VM on the target from a point (the newest, or --point),
    booted and checked; the job is then failed-over. A failover that fails is rolled back and the job
    syncs on. Exit 1 unless the VM booted."""

    async def go() -> Any:
        from app.cli.client import Jobs

        return await (await Jobs.connect()).failover(job, point)

    r = run(go)
    if as_json:
        emit_json(r)
    elif r.error is None:
        out.print(
            f"job {job} failed over to point {r.point_id} ({'planned' if r.planned else 'unplanned'}): "
            f"VM {r.vm.name} ({r.vm.platform}, {r.vm.vm_id or 'no id'}) booted in {r.boot.seconds:.1f}s; "
            f"RTO {r.rto_seconds:.1f}s"
        )
    else:
        out.print(f"failover of job {job} failed: {one_line(r.error)}")
        out.print(
            "  rolled back: nothing left" if r.cleaned else f"  NOT rolled back: {'; '.join(r.left_behind)}"
        )
    if r.error is not None:
        raise typer.Exit(1)
