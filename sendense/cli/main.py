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
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from sendense import config
from sendense.cli.lab import lab_app
from sendense.errors import InvalidSpec, SendenseError
from sendense.models import JobStatus, Settings, SyncResult

if TYPE_CHECKING:
    from sendense.cli.client import JobView

app = typer.Typer(help="Sendense Replication: block-level VM replication on Temporal.", no_args_is_help=True)
job_app = typer.Typer(help="Replication jobs.", no_args_is_help=True)
point_app = typer.Typer(help="Recovery points (run on the target host).", no_args_is_help=True)
app.add_typer(job_app, name="job")
app.add_typer(point_app, name="point")
app.add_typer(lab_app, name="lab")

# Never markup: messages, paths and names are printed as they are (QEMU's "Is another process using
# the image [/path]?" is not a closing tag). Styles are applied with Text, never parsed from strings.
out = Console(markup=False, highlight=False, emoji=False)
err = Console(stderr=True, markup=False, highlight=False, emoji=False)
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


def one_line(msg: str) -> str:
    """Every error is one line: a multi-line message (QEMU's, a server's) is joined."""
    return " ".join(msg.split())


def error_line(msg: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", one_line(msg)), soft_wrap=True)


def warn(msg: str) -> None:
    err.print(Text.assemble(("warning:", "yellow"), " ", one_line(msg)), soft_wrap=True)


def fail(msg: str, code: int = 1) -> NoReturn:
    error_line(msg)
    raise typer.Exit(code)


def describe_error(e: BaseException) -> str:
    """One line for any exception the CLI did not expect: what went wrong, not where in the code."""
    from pydantic import ValidationError
    from temporalio.client import WorkflowQueryFailedError, WorkflowUpdateFailedError
    from temporalio.service import RPCError

    from sendense.spec import format_validation_error

    if isinstance(e, SendenseError):
        return e.message
    if isinstance(e, WorkflowUpdateFailedError):
        cause = e.cause
        return getattr(cause, "message", None) or str(cause)
    if isinstance(e, WorkflowQueryFailedError):
        return f"the job did not answer: {e.message}"
    if isinstance(e, RPCError):
        return f"Temporal: {e.message}"
    if isinstance(e, ValidationError):
        return format_validation_error(e, f"{e.title}: ")
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return f"{type(e).__name__}: {e}"


def debugging() -> bool:
    """SENDENSE_DEBUG=1: let unexpected exceptions through with their traceback."""
    return bool(os.environ.get("SENDENSE_DEBUG"))


def run(coro: Callable[[], Awaitable[T]]) -> T:
    """Run an async CLI action; every error becomes a one-line message and exit 1."""
    try:
        return asyncio.run(coro())  # type: ignore[arg-type]
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except SendenseError as e:
        fail(e.message)
    except Exception as e:  # noqa: BLE001 - the CLI prints one line, not a traceback
        if debugging():
            raise
        fail(describe_error(e))


def guarded(action: Callable[[], T]) -> T:
    """`run` for plain (not async) actions: connectors' calls on this host."""
    try:
        return action()
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except SendenseError as e:
        fail(e.message)
    except Exception as e:  # noqa: BLE001 - the CLI prints one line, not a traceback
        if debugging():
            raise
        fail(describe_error(e))


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
    port: int = typer.Option(7233, min=1, max=65535, help="Temporal frontend port"),
    ui_port: int = typer.Option(8233, min=1, max=65535, help="Temporal web UI port"),
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

    async def go() -> list[JobView]:
        jobs = await (await _jobs()).list()
        for s in jobs:
            _with_lag(s)
        return jobs

    jobs = run(go)
    if as_json:
        emit_json(jobs)
        return
    t = Table(  # names and point ids whole: they are what the user types next
        Column("name", no_wrap=True),
        "state",
        "source",
        Column("last point", no_wrap=True),
        "RPO lag",
        "syncs",
        "failures",
    )
    for s in jobs:
        lag = f"{s.rpo_lag_seconds:.0f}s" if s.rpo_lag_seconds is not None else "-"
        t.add_row(s.name, s.state, s.source, s.last_point or "-", lag, str(s.syncs), str(s.failures))
    out.print(t)
    for s in jobs:
        if s.no_answer:
            warn(f"job {s.name}: {s.no_answer}")


@job_app.command("status")
def job_status(name: str, as_json: bool = JsonOpt) -> None:
    """Show a job's state, last point, RPO lag, bytes, errors, and the step in flight with its retries."""

    async def go() -> JobView:
        st = await (await _jobs()).status(name)
        _with_lag(st)
        return st

    st = run(go)
    if as_json:
        emit_json(st)
        return
    for k, v in status_rows(st):
        out.print(Text.assemble((f"{k:>17}", "bold"), ": ", v), soft_wrap=True)  # one row, one line


def status_rows(st: JobView) -> list[tuple[str, str]]:
    """`job status` as (label, text) rows; the text is printed as is, never as markup."""
    next_sync = "- (paused)" if st.state == "paused" else str(st.next_sync_at or "-")
    rows = [
        ("state", st.state),
        ("source", st.source),
        ("target", st.target),
        ("interval", f"{st.interval_seconds:.0f}s"),
        ("retention", f"{st.retention_points} points"),
        ("last point", f"{st.last_point or '-'}"),
        ("RPO lag", f"{st.rpo_lag_seconds:.0f}s" if st.rpo_lag_seconds is not None else "-"),
        ("next sync", next_sync),
        ("syncs / failures", f"{st.syncs} / {st.failures}"),
        ("written", _human(st.total_bytes_written)),
    ]
    if st.current_sync:
        rows.append(("current sync", st.current_sync))
    for step in st.steps:
        of = f"/{step.maximum_attempts}" if step.maximum_attempts else ""
        text = f"{step.activity}, attempt {step.attempt}{of}"
        if step.state == "scheduled":  # no worker has it: a retry's backoff, or no worker on its queue
            due = step.next_attempt_at
            text += f" (next try {due.isoformat(timespec='seconds')})" if due else " (waiting for a worker)"
        if step.last_failure:
            text += f"; last error: {step.last_failure}"
        rows.append(("step", text))
    if st.last_sync:
        ls = st.last_sync
        rows.append(("last sync", f"{ls.kind}, {_human(ls.bytes_written)} written, {ls.seconds:.1f}s"))
    if st.resyncs:
        rows.append(("resyncs", f"{st.resyncs} (last: {st.last_resync_reason})"))
    if st.last_error:
        rows.append(("last error", one_line(st.last_error)))
    if st.spec_problem:
        rows.append(("spec", st.spec_problem))
    return rows


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
    """Start a sync now (refused on a paused job, with or without --wait: resume it first)."""
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
        out.print("sync requested (it starts now, or after the running sync)")


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

    given = {"interval": interval, "retention_points": retention, "bandwidth_limit": bandwidth}
    try:
        s = Settings.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        fail(format_validation_error(e, "settings."))
    if not s.model_fields_set:
        fail("give at least one of --interval, --retention, --bandwidth")

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
        spec, problem = await (await _jobs()).spec_and_problem(name)
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


# ------------------------------------------------------------------------------- demo


@app.command()
def demo(
    state_dir: Path = typer.Option(None, help="state directory"),
    port: int = typer.Option(7233, min=1, max=65535),
    ui_port: int = typer.Option(8233, min=1, max=65535),
    incrementals: int = typer.Option(3, min=0, max=1000, help="incremental syncs while the workload writes"),
    disk_mib: int = typer.Option(
        1024, min=64, max=1 << 20, help="size of the lab VM's first disk (the second is half)"
    ),
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
    code = cli(sys.argv[1:])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`sendense job list --json | head -1`): nothing more to say
            pass
    os._exit(code)


def cli(args: list[str]) -> int:
    """Run one command; return its exit code. Whatever goes wrong ends as one line on stderr and a
    non-zero code, never a traceback (SENDENSE_DEBUG=1 shows them), usage errors included."""
    try:
        rv = app(args, prog_name="sendense", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        error_line("interrupted")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        if _usage_error(e):
            return int(getattr(e, "exit_code", 2))
        if debugging():
            import traceback

            traceback.print_exc()
        error_line(describe_error(e))
        return 1


def _usage_error(e: Exception) -> bool:
    """A usage error of the command line parser (typer's own click): said in one line with a hint.
    Recognised by its shape, as typer vendors click under a private name."""
    fmt, code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
    if not callable(fmt) or not isinstance(code, int):
        return False
    msg = one_line(str(fmt()))
    if msg:  # (no message: the parser printed the help itself, as for `sendense job`)
        ctx = getattr(e, "ctx", None)
        path = getattr(ctx, "command_path", "")
        error_line(msg + (f" (see `{path} --help`)" if path else ""))
    return True


if __name__ == "__main__":
    main()
