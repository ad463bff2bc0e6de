"""`sendense job ...`: replication jobs, through their workflows."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from app.cli.output import JsonOpt, emit_json, fail, human, one_line, out, run, warn
from sendense import config
from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.models import JobStatus, Settings, SyncResult

if TYPE_CHECKING:
    from app.cli.client import JobView

job_app = typer.Typer(help="Replication jobs.", no_args_is_help=True)


async def connect() -> Any:
    """The job client, imported when a command needs it (not for `--help` or a usage error)."""
    from app.cli.client import Jobs

    return await Jobs.connect()


def _with_lag(st: JobStatus) -> JobStatus:
    if st.last_point_at is not None:
        st.rpo_lag_seconds = round((datetime.now(UTC) - st.last_point_at).total_seconds(), 1)
    return st


@job_app.command("create")
def job_create(
    file: Path = typer.Option(..., "-f", "--file", help="job spec (YAML)"),
    wait: bool = typer.Option(True, help="wait until the job has validated its source and target"),
    as_json: bool = JsonOpt,
) -> None:
    """Create a replication job from a spec; its first (full) sync starts at once."""
    from sendense.platforms import source_for, target_for
    from sendense.spec import load_spec

    async def go() -> JobStatus | None:
        spec = load_spec(file)
        jobs = await connect()
        if await jobs.exists(spec.name):  # before the checks below: they would see its replicas
            raise InvalidSpec(f"name: job {spec.name!r} already exists")
        if spec.link is not None:  # (a typo would leave its copies at the floor rate)
            from app.cli.link_client import Links

            try:
                await Links(jobs.client).status(spec.link)
            except ResourceNotFound:
                raise InvalidSpec(f"{file}: link: no link {spec.link!r} (sendense link create)") from None
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
        jobs = await (await connect()).list()
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
        st = await (await connect()).status(name)
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
        ("source", st.source + (f" on host {st.source_host}" if st.source_host else "")),
        ("target", st.target),
        ("interval", f"{st.interval_seconds:.0f}s"),
        ("retention", f"{st.retention_points} points"),
        ("last point", f"{st.last_point or '-'}"),
        ("RPO lag", f"{st.rpo_lag_seconds:.0f}s" if st.rpo_lag_seconds is not None else "-"),
        ("next sync", next_sync),
        ("syncs / failures", f"{st.syncs} / {st.failures}"),
        ("written", human(st.total_bytes_written)),
    ]
    if st.last_move:
        rows.append(("source moved", st.last_move))
    if st.link:
        rows.append(("link", f"{st.link}, priority {st.priority}: {_link_share(st)}"))
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
        rows.append(("last sync", f"{ls.kind}, {human(ls.bytes_written)} written, {ls.seconds:.1f}s"))
        if ls.bytes_on_wire is not None:  # read across a link: what it cost there
            ratio = f"{ls.bytes_read / ls.bytes_on_wire:.2f}x" if ls.bytes_on_wire else "-"
            rows.append(
                ("  link", f"{human(ls.bytes_on_wire)} on the wire for {human(ls.bytes_read)} read ({ratio})")
            )
        for note in ls.notes:
            rows.append(("  note", note))
    if (fo := st.failed_over) is not None:
        how = "planned" if fo.planned else "unplanned"
        rows.append(("failed over", f"{how}, to point {fo.point_id}: VM {fo.vm} ({fo.vm_id or 'no id'})"))
    if (fb := st.last_failback) is not None:
        started = "source started" if fb.started else f"source NOT started: {one_line(fb.note or '')}"
        down = f"{fb.cutover_seconds:.1f}s" if fb.cutover_seconds is not None else "-"
        what = f"{fb.failback_id}: {fb.syncs} reverse syncs, {human(fb.bytes_written)} written"
        rows.append(("last failback", f"{what}, down {down}, {started}"))
    if (d := st.last_drill) is not None:
        verdict = "booted" if d.ok else ("did NOT boot" if d.ok is False else "failed")
        tail = f": {one_line(d.error)}" if d.error else ""
        clean = "" if d.cleaned else ", NOT cleaned up"
        rows.append(("last drill", f"{d.drill_id} from point {d.point_id or '-'}, {verdict}{tail}{clean}"))
    if st.resyncs:
        rows.append(("resyncs", f"{st.resyncs} (last: {st.last_resync_reason})"))
    if st.last_error:
        rows.append(("last error", one_line(st.last_error)))
    if st.spec_problem:
        rows.append(("spec", st.spec_problem))
    return rows


def _link_share(st: JobView) -> str:
    from sendense.links import show_rate

    ls = st.link_share
    if ls is None or ls.note:
        return ls.note if ls is not None and ls.note else "-"
    if not ls.copies:
        return "not copying now"
    share = f", {ls.share:.0%} of the link" if ls.share is not None else ""
    measured = show_rate(int(ls.measured_rate)) if ls.measured_rate else "-"
    return f"granted {show_rate(ls.rate)}{share}, moving {measured}"


def _sync_result_line(r: SyncResult) -> str:
    return (
        f"point {r.point_id} ({r.kind}): read {human(r.bytes_read)}, wrote {human(r.bytes_written)}, "
        f"zeroed {human(r.bytes_zeroed)} in {r.seconds:.1f}s"
    )


def sync_with_progress(name: str, console: Console) -> SyncResult:
    from app.cli.progress import sync_now_with_progress

    async def go() -> SyncResult:
        return await sync_now_with_progress(await connect(), name, console)

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
        return await (await connect()).sync_now(name, wait=wait)

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
    await getattr(await connect(), verb)(name)


@job_app.command("settings")
def job_settings(
    name: str,
    interval: str = typer.Option(None, help="new sync interval, e.g. 5m"),
    retention: int = typer.Option(None, help="recovery points to keep"),
    bandwidth: int = typer.Option(None, help="bandwidth limit in bytes/s (0 = unlimited)"),
    priority: str = typer.Option(None, help="its class on its link: critical, normal, low"),
    as_json: bool = JsonOpt,
) -> None:
    """Change a running job's interval, retention, bandwidth limit or priority (its running copies
    move class on its link within seconds)."""
    from pydantic import ValidationError

    from sendense.spec import format_validation_error

    given = {
        "interval": interval,
        "retention_points": retention,
        "bandwidth_limit": bandwidth,
        "priority": priority,
    }
    try:
        s = Settings.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        fail(format_validation_error(e, "settings."))
    if not s.model_fields_set:
        fail("give at least one of --interval, --retention, --bandwidth, --priority")

    async def go() -> JobStatus:
        return await (await connect()).settings(name, s)

    st = run(go)
    emit_json(st) if as_json else out.print(
        f"interval {st.interval_seconds:.0f}s, retention {st.retention_points}, priority {st.priority}"
    )


@job_app.command("delete")
def job_delete(
    name: str,
    purge: bool = typer.Option(False, "--purge", help="also delete the replicas and all recovery points"),
    as_json: bool = JsonOpt,
) -> None:
    """Stop a job (after its running sync). Recovery points are kept unless --purge."""

    async def go() -> JobStatus:
        return await (await connect()).delete(name, purge)

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
