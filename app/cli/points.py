"""`sendense point ...`: a job's recovery points, read on the target host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Column, Table

from app.cli.jobs import connect
from app.cli.output import JsonOpt, emit_json, fail, guarded, human, out, run, warn
from sendense import config

point_app = typer.Typer(help="Recovery points (run on the target host).", no_args_is_help=True)


def _target(name: str) -> Any:
    from sendense.platforms import target_for

    async def go() -> Any:
        spec, problem = await (await connect()).spec_and_problem(name)
        if problem:  # a job broken by settings stored before they were checked: still readable
            warn(f"job {name}: {problem}")
        return spec

    spec = run(go)
    host, local = spec.target.host, config.host_id()
    if host not in (None, local):  # its replicas are there: here the list would be empty, and say nothing
        fail(f"job {name}: its target is on host {host} (this is {local}); run point commands there")
    return guarded(lambda: target_for(spec))


@point_app.command("list")
def point_list(name: str, as_json: bool = JsonOpt) -> None:
    """List a job's recovery points, newest first."""
    tgt = _target(name)
    points = guarded(tgt.list_points)
    if as_json:
        emit_json(points)
        return
    t = Table(
        Column("point_id", no_wrap=True), Column("snapshot instant", no_wrap=True), "kind", "disks", "written"
    )
    for p in points:
        t.add_row(
            p.point_id,
            p.created_at.isoformat(timespec="seconds"),
            p.kind,
            str(len(p.disks)),
            human(p.stats.bytes_written),
        )
    out.print(t)


@point_app.command("export")
def point_export(
    name: str,
    point: str = typer.Option(None, "--point", help="point id (default: the newest)"),
    fmt: str = typer.Option("qcow2", "--format", help="raw | qcow2 | vmdk | vhdx"),
    output: Path = typer.Option(..., "--output", help="directory for the exported images"),
    as_json: bool = JsonOpt,
) -> None:
    """Export a recovery point's disks as standalone images."""
    if fmt not in ("raw", "qcow2", "vmdk", "vhdx"):
        fail(f"--format: {fmt!r} is not one of raw, qcow2, vmdk, vhdx")
    tgt = _target(name)
    output = output_dir(output)
    files = guarded(lambda: tgt.export(tgt.get_point(point).point_id, fmt, output))
    if as_json:
        emit_json({"files": [{"disk": k, "path": str(p)} for k, p in files]})
    else:
        for k, p in files:
            out.print(f"{k}: {p}")


def output_dir(output: Path) -> Path:
    """--output as a directory this process can write, created if missing; else one line naming it."""
    import tempfile

    path = output.expanduser()
    if path.exists() and not path.is_dir():
        fail(f"--output {output}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # writable? (root ignores mode bits, not a read-only mount)
            pass
    except OSError as e:
        fail(f"--output {output}: cannot write there ({e.strerror or e})")
    return path
