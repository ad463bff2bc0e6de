"""`sendense failback`: a failed-over job's VM replicated back to the source, then cut over
(workflows.failback)."""

from __future__ import annotations

import secrets
from typing import Any

import typer

from app.cli.output import JsonOpt, emit_json, human, one_line, out, run
from sendense.recovery import FailbackRequest


def failback(
    job: str,
    stop_source: bool = typer.Option(
        False, "--stop-source", help="power off the source VM if it runs (else the failback is refused)"
    ),
    max_syncs: int = typer.Option(5, "--max-syncs", min=1, max=50, help="reverse syncs before the cutover"),
    small_mib: int = typer.Option(
        64, "--small-mib", min=0, help="cut over once a reverse sync had at most this many MiB to read"
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Replicate a failed-over job's VM back into its source's disks, sending only what changed since
    the failover; repeat while the VM runs until the delta is small, then cut over: power the VM off,
    take the final reverse sync, start the source VM (where the product can) and remove the VM. The
    job then replicates again, incrementally. A failback that fails is rolled back: the VM runs on.
    Exit 1 unless the source holds the VM's data."""
    req = FailbackRequest(
        failback_id=secrets.token_hex(4),
        stop_source=stop_source,
        max_syncs=max_syncs,
        small_bytes=small_mib << 20,
    )

    async def go() -> Any:
        from app.cli.client import Jobs

        return await (await Jobs.connect()).failback(job, req)

    r = run(go)
    if as_json:
        emit_json(r)
    elif r.error is None:
        down = f"{r.cutover_seconds:.1f}s" if r.cutover_seconds is not None else "-"
        out.print(
            f"job {job} failed back from VM {r.vm}: {r.syncs} reverse syncs, {human(r.bytes_written)} "
            f"written, down {down}"
        )
        out.print(
            "  source VM started" if r.started else f"  source VM not started: {one_line(r.start_note or '')}"
        )
        if r.left_behind:
            out.print(f"  left behind: {'; '.join(r.left_behind)}")
    else:
        out.print(f"failback of job {job} failed: {one_line(r.error)}")
        out.print(
            "  rolled back: the VM runs on" if r.cleaned else f"  NOT rolled back: {'; '.join(r.left_behind)}"
        )
    if r.error is not None:
        raise typer.Exit(1)
