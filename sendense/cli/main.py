"""The `sendense` command line."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Column, Table

from sendense import config
from sendense.cli.lab import lab_app
from sendense.errors import InvalidSpec, SendenseError
from sendense.models import JobStatus, Settings, SyncResult

app = typer.Typer(help="Sendense Replication: block-level VM replication on Temporal.", no_args_is_help=True)
job_app = typer.Typer(help="Replication jobs.", no_args_is_help=True)
point_app = typer.Typer(help="Recovery points (run on the target host).", no_args_is_help=True)
app.add_typer(job_app, name="job")
app.add_typer(point_app, name="point")
app.add_typer(lab_app, name="lab")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _dump(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list):
        return [_dump(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _dump(v) for k, v in obj.items()}
    return obj


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_dump(obj), indent=2, default=str) + "\n")


def fail(msg: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run(coro: Callable[[], Awaitable[T]]) -> T:
    """Run an async CLI action; SendenseErrors become one-line messages and exit 1."""
    try:
        return asyncio.run(coro())  # type: ignore[arg-type]
    except SendenseError as e:
        fail(e.message)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - the CLI prints one line, not a traceback
        from temporalio.client import WorkflowUpdateFailedError
        from temporalio.service import RPCError

        if isinstance(e, WorkflowUpdateFailedError):
            cause = e.cause
            fail(getattr(cause, "message", None) or str(cause))
        if isinstance(e, RPCError):
            fail(f"Temporal: {e.message}")
        if os.environ.get("SENDENSE_DEBUG"):
            raise
        fail(f"{type(e).__name__}: {e}")
    raise AssertionError("unreachable")


async def _jobs() -> Any:
    from sendense.cli.client import Jobs

    return await Jobs.connect()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _with_lag(st: JobStatus) -> JobStatus:
    if st.last_point_at is not None:
        st.rpo_lag_seconds = round((datetime.now(UTC) - st.last_point_at).total_seconds(), 1)
    return st


# ------------------------------------------------------------------------------- stack


@app.command()
def up(
    port: int = typer.Option(7233, help="Temporal frontend port"),
    ui_port: int = typer.Option(8233, help="Temporal web UI port"),
    state_dir: Path = typer.Option(None, help="state directory (default $SENDENSE_HOME or ~/.sendense)"),
    as_json: bool = JsonOpt,
) -> None:
    """Start the embedded stack: Temporal dev server (with web UI) and a worker, in the background."""
    from sendense import stack

    try:
        info = stack.up(state_dir or config.home(), port=port, ui_port=ui_port)
    except SendenseError as e:
        fail(e.message)
    data = info.to_dict()
    if as_json:
        emit_json(data)
    else:
        out.print(
            f"Temporal at {data.get('address')}, web UI {data.get('ui_url')}, "
            f"worker pid {data.get('worker_pid')}"
        )


@app.command()
def down(state_dir: Path = typer.Option(None, help="state directory"), as_json: bool = JsonOpt) -> None:
    """Stop the embedded stack."""
    from sendense import stack

    was = stack.down(state_dir or config.home())
    if as_json:
        emit_json({"stopped": was})
    else:
        out.print("stopped" if was else "nothing was running")


@app.command()
def status(state_dir: Path = typer.Option(None, help="state directory"), as_json: bool = JsonOpt) -> None:
    """Report the embedded stack."""
    from sendense import stack

    st = stack.status(state_dir or config.home())
    if as_json:
        emit_json(st)
        return
    for k, v in st.items():
        out.print(f"{k:>16}: {v}")


@app.command()
def worker() -> None:
    """Run a worker in the foreground (control queue and this host's queue)."""
    from workers.worker import main

    main()


# ------------------------------------------------------------------------------- jobs


@job_app.command("create")
def job_create(
    file: Path = typer.Option(..., "-f", "--file", help="job spec (YAML)"),
    wait: bool = typer.Option(True, help="wait until the job has validated its source and target"),
    as_json: bool = JsonOpt,
) -> None:
    """Create a replication job from a spec; its first (full) sync starts at once."""
    from connectors.registry import source_for, target_for
    from sendense.spec import load_spec

    async def go() -> JobStatus | None:
        spec = load_spec(file)
        jobs = await _jobs()
        if await jobs.exists(spec.name):  # before the checks below: they would see its replicas
            raise InvalidSpec(f"name: job {spec.name!r} already exists")
        spec = spec.model_copy(update={"job_id": secrets.token_hex(8)})  # its replicas will carry it
        local = config.host_id()
        if spec.source.host in (None, local):
            src = source_for(spec, config.home() / "work" / spec.name)
            src.validate()
        if spec.target.host in (None, local):
            target_for(spec).validate()
        await jobs.create(spec)
        return await jobs.wait_started(spec.name) if wait else None

    st = run(go)
    if as_json:
        emit_json(st or {"created": True})
    else:
        out.print(f"job created; state {st.state if st else 'starting'}")


@job_app.command("list")
def job_list(as_json: bool = JsonOpt) -> None:
    """List running jobs."""

    async def go() -> list[JobStatus]:
        return [_with_lag(s) for s in await (await _jobs()).list()]

    jobs = run(go)
    if as_json:
        emit_json(jobs)
        return
    t = Table("name", "state", "source", "last point", "RPO lag", "syncs", "failures")
    for s in jobs:
        lag = f"{s.rpo_lag_seconds:.0f}s" if s.rpo_lag_seconds is not None else "-"
        t.add_row(s.name, s.state, s.source, s.last_point or "-", lag, str(s.syncs), str(s.failures))
    out.print(t)


@job_app.command("status")
def job_status(name: str, as_json: bool = JsonOpt) -> None:
    """Show a job's state, last point, RPO lag, bytes and errors."""

    async def go() -> JobStatus:
        return _with_lag(await (await _jobs()).status(name))

    st = run(go)
    if as_json:
        emit_json(st)
        return
    rows = [
        ("state", st.state),
        ("source", st.source),
        ("target", st.target),
        ("interval", f"{st.interval_seconds:.0f}s"),
        ("retention", f"{st.retention_points} points"),
        ("last point", f"{st.last_point or '-'}"),
        ("RPO lag", f"{st.rpo_lag_seconds:.0f}s" if st.rpo_lag_seconds is not None else "-"),
        ("next sync", str(st.next_sync_at or "-")),
        ("syncs / failures", f"{st.syncs} / {st.failures}"),
        ("written", _human(st.total_bytes_written)),
    ]
    if st.last_sync:
        ls = st.last_sync
        rows.append(("last sync", f"{ls.kind}, {_human(ls.bytes_written)} written, {ls.seconds:.1f}s"))
    if st.resyncs:
        rows.append(("resyncs", f"{st.resyncs} (last: {st.last_resync_reason})"))
    if st.last_error:
        rows.append(("last error", st.last_error))
    for k, v in rows:
        out.print(f"[bold]{k:>17}[/bold]: {v}", highlight=False)


def _sync_result_line(r: SyncResult) -> str:
    return (
        f"point {r.point_id} ({r.kind}): read {_human(r.bytes_read)}, wrote {_human(r.bytes_written)}, "
        f"zeroed {_human(r.bytes_zeroed)} in {r.seconds:.1f}s"
    )


def sync_with_progress(name: str, console: Console) -> SyncResult:
    from sendense.cli.progress import sync_now_with_progress

    async def go() -> SyncResult:
        return await sync_now_with_progress(await _jobs(), name, console)

    return run(go)


@job_app.command("sync-now")
def job_sync_now(
    name: str,
    wait: bool = typer.Option(False, "--wait", help="wait for the sync and print its result"),
    as_json: bool = JsonOpt,
) -> None:
    """Start a sync now."""
    if wait and not as_json:
        r = sync_with_progress(name, out)
        out.print(_sync_result_line(r))
        return

    async def go() -> SyncResult | None:
        return await (await _jobs()).sync_now(name, wait=wait)

    res = run(go)
    if as_json:
        emit_json(res if res is not None else {"requested": True})
    else:
        out.print("sync requested")


@job_app.command("pause")
def job_pause(name: str, as_json: bool = JsonOpt) -> None:
    """Pause a job (a running sync finishes first)."""
    run(lambda: _call(name, "pause"))
    emit_json({"paused": True}) if as_json else out.print("paused")


@job_app.command("resume")
def job_resume(name: str, as_json: bool = JsonOpt) -> None:
    """Resume a paused job."""
    run(lambda: _call(name, "resume"))
    emit_json({"resumed": True}) if as_json else out.print("resumed")


async def _call(name: str, verb: str) -> None:
    await getattr(await _jobs(), verb)(name)


@job_app.command("settings")
def job_settings(
    name: str,
    interval: str = typer.Option(None, help="new sync interval, e.g. 5m"),
    retention: int = typer.Option(None, help="recovery points to keep"),
    bandwidth: int = typer.Option(None, help="bandwidth limit in bytes/s (0 = unlimited)"),
    as_json: bool = JsonOpt,
) -> None:
    """Change a running job's interval, retention or bandwidth limit."""
    from pydantic import ValidationError

    from sendense.spec import format_validation_error

    try:
        s = Settings.model_validate(
            {"interval": interval, "retention_points": retention, "bandwidth_limit": bandwidth}
        )
    except ValidationError as e:
        fail(format_validation_error(e, "settings."))

    async def go() -> JobStatus:
        return await (await _jobs()).settings(name, s)

    st = run(go)
    emit_json(st) if as_json else out.print(
        f"interval {st.interval_seconds:.0f}s, retention {st.retention_points}"
    )


@job_app.command("delete")
def job_delete(
    name: str,
    purge: bool = typer.Option(False, "--purge", help="also delete the replicas and all recovery points"),
    as_json: bool = JsonOpt,
) -> None:
    """Stop a job (after its running sync). Recovery points are kept unless --purge."""

    async def go() -> JobStatus:
        return await (await _jobs()).delete(name, purge)

    final = run(go)
    left = final.left_behind if final is not None else []
    purged = purge and not any(x.startswith("replicas:") for x in left)
    if as_json:
        emit_json({"deleted": name, "purged": purged, "left_behind": left})
    else:
        out.print(
            f"job {name} deleted" + ("" if not left else "; left behind: " + "; ".join(left)), markup=False
        )
    if purge and not purged:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------- points


def _target(name: str) -> Any:
    from connectors.registry import target_for

    async def go() -> Any:
        return target_for(await (await _jobs()).spec(name))

    return run(go)


@point_app.command("list")
def point_list(name: str, as_json: bool = JsonOpt) -> None:
    """List a job's recovery points, newest first."""
    tgt = _target(name)
    try:
        points = tgt.list_points()
    except SendenseError as e:
        fail(e.message)
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
            _human(p.stats.bytes_written),
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
    tgt = _target(name)
    try:
        if fmt not in ("raw", "qcow2", "vmdk", "vhdx"):
            raise InvalidSpec(f"--format: {fmt!r} is not one of raw, qcow2, vmdk, vhdx")
        files = tgt.export(tgt.get_point(point).point_id, fmt, output)
    except SendenseError as e:
        fail(e.message)
    if as_json:
        emit_json({"files": [{"disk": k, "path": str(p)} for k, p in files]})
    else:
        for k, p in files:
            out.print(f"{k}: {p}")


# ------------------------------------------------------------------------------- demo


@app.command()
def demo(
    state_dir: Path = typer.Option(None, help="state directory"),
    port: int = typer.Option(7233),
    ui_port: int = typer.Option(8233),
    incrementals: int = typer.Option(3, help="incremental syncs to run while the workload writes"),
    disk_mib: int = typer.Option(1024, help="size of the lab VM's first disk (the second is half)"),
    clean: bool = typer.Option(False, "--clean", help="delete the demo job and stop the lab VM"),
) -> None:
    """Run the whole product on this machine: stack, lab VM with a workload, a job, syncs, points."""
    from sendense.cli.demo import clean_demo, run_demo

    try:
        if clean:
            clean_demo(out, state_dir or config.home())
        else:
            run_demo(out, state_dir or config.home(), port, ui_port, incrementals, disk_mib)
    except SendenseError as e:
        fail(e.message)


def main() -> None:
    """Entry point. Exits with os._exit after flushing: the Temporal client's native runtime threads
    can crash CPython's interpreter finalization (PyGILState_Release) after a successful command."""
    code = 0
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
