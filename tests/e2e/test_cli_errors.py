"""The CLI against the real dev server and worker: whatever a user gives it or a job reports, it answers
in lines of plain text (never markup) and refuses in one line with a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from helpers_kvm import MiB, make_qcow2, qemu_io

from app import stack
from tests.e2e.conftest import Cli


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0, p.stdout
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and "MarkupError" not in p.stderr
    return lines[0].removeprefix("error: ")


def job(cli: Cli, tmp: Path, name: str, disk: Path, target: Path) -> Path:
    spec = tmp / f"{name}.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(target)},
                "schedule": {"interval": "1h"},
            }
        )
    )
    cli.run("job", "create", "-f", str(spec))
    cli.wait_point(name, 1)
    return spec


@contextmanager
def image_held_by_another_process(disk: Path) -> Iterator[None]:
    """qemu-nbd serving the image writable holds QEMU's write lock on it, as a running VM would."""
    sock = disk.with_name("held.sock")
    p = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(disk)])
    try:
        for _ in range(100):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.05"])
        yield
    finally:
        p.terminate()
        p.wait(10)


def test_brackets_in_paths_and_errors_are_text_not_markup(e2e_stack: Cli, tmp_path: Path) -> None:
    """Before: `[/x]` in a path or a message (QEMU's "Is another process using the image [/...]?")
    crashed `job status` and `job sync-now --wait` with a rich MarkupError traceback."""
    cli = e2e_stack
    odd = tmp_path / "[" / "x]" / "[bold]"  # the paths read "[/x]/[bold]"
    odd.mkdir(parents=True)
    disk = make_qcow2(odd / "d.qcow2", 8 * MiB)
    qemu_io(disk, "write -P 0x11 0 1M")
    job(cli, tmp_path, "e2e-brackets", disk, odd / "rep")

    p = cli.run("job", "status", "e2e-brackets")
    assert f"target: kvm:{odd / 'rep'}" in p.stdout, p.stdout
    assert "e2e-brackets" in cli.run("job", "list").stdout
    assert cli.run("point", "list", "e2e-brackets").returncode == 0

    with image_held_by_another_process(disk):
        msg = one_line_error(cli.run("job", "sync-now", "e2e-brackets", "--wait", check=False))
        assert str(disk) in msg, msg
        msg_json = one_line_error(cli.run("job", "sync-now", "e2e-brackets", "--wait", "--json", check=False))
        assert str(disk) in msg_json
    p = cli.run("job", "status", "e2e-brackets")
    [last] = [line for line in p.stdout.splitlines() if line.strip().startswith("last error:")]
    assert str(disk) in last, p.stdout  # the whole message, on its one line
    cli.run("job", "delete", "e2e-brackets", "--purge")


@pytest.fixture(scope="module")
def settings_job(e2e_stack: Cli, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("settings")
    job(e2e_stack, tmp, "e2e-settings", make_qcow2(tmp / "d.qcow2", 8 * MiB), tmp / "rep")
    yield "e2e-settings"
    e2e_stack.run("job", "delete", "e2e-settings", "--purge")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--interval", "0s"), "settings.interval: interval must be at least 1s"),
        (("--interval", "99999999d"), "settings.interval: interval must be at most 30d"),
        (("--interval", "1e9"), "settings.interval: not a duration (use e.g. 30s, 5m, 1h)"),
        (("--bandwidth", "1000"), "settings.bandwidth_limit: bandwidth limit must be 1048576 (1 MiB/s) to "),
        (("--retention", "0"), "settings.retention_points: Input should be greater than or equal to 1"),
        ((), "give at least one of --interval, --retention, --bandwidth"),
    ],
)
def test_settings_out_of_bounds_are_refused_in_one_line(
    settings_job: str, e2e_stack: Cli, args: tuple[str, ...], expected: str
) -> None:
    """Before: accepted; then every activity failed "Failed decoding arguments" (or the workflow task
    failed) and `point list` printed a multi-line pydantic error."""
    cli, name = e2e_stack, settings_job
    msg = one_line_error(cli.run("job", "settings", name, *args, check=False))
    assert msg.startswith(expected), msg
    st = cli.json("job", "status", name)
    assert (st["interval_seconds"], st["retention_points"]) == (3600, 24)
    p = cli.run("point", "list", name)
    assert p.stderr == "" and len(cli.json("point", "list", name)) >= 1
    r = cli.json("job", "sync-now", name, "--wait")
    assert r["kind"] == "incremental"


def test_sync_now_on_a_paused_job_is_refused_with_or_without_wait(e2e_stack: Cli, tmp_path: Path) -> None:
    """Before: without --wait it queued a sync silently (run at resume); and status showed a next sync."""
    cli = e2e_stack
    job(cli, tmp_path, "e2e-paused", make_qcow2(tmp_path / "d.qcow2", 8 * MiB), tmp_path / "rep")
    cli.run("job", "pause", "e2e-paused")
    for wait in ((), ("--wait",)):
        msg = one_line_error(cli.run("job", "sync-now", "e2e-paused", *wait, check=False))
        assert msg == "job is paused; resume it first"
    st = cli.json("job", "status", "e2e-paused")
    assert st["state"] == "paused" and st["next_sync_at"] is None
    assert "next sync: - (paused)" in cli.run("job", "status", "e2e-paused").stdout
    cli.run("job", "resume", "e2e-paused")
    cli.wait_point("e2e-paused", 1)
    assert cli.json("job", "status", "e2e-paused")["syncs"] == 1, "a refused sync-now ran at resume"
    assert cli.json("job", "sync-now", "e2e-paused") == {"requested": True}
    cli.wait_point("e2e-paused", 2)
    cli.run("job", "delete", "e2e-paused", "--purge")


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """A read-only bind mount: refused even to root (mode bits are not)."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.root
def test_point_export_output_that_cannot_be_written_is_one_line(e2e_stack: Cli, tmp_path: Path) -> None:
    """Before: a Python traceback (FileExistsError, PermissionError/EROFS)."""
    cli = e2e_stack
    job(cli, tmp_path, "e2e-export", make_qcow2(tmp_path / "d.qcow2", 8 * MiB), tmp_path / "rep")
    a_file = tmp_path / "exported.img"
    a_file.write_bytes(b"keep")

    def export(out: Path) -> str:
        return one_line_error(cli.run("point", "export", "e2e-export", "--output", str(out), check=False))

    assert export(a_file) == f"--output {a_file}: exists and is not a directory"
    assert a_file.read_bytes() == b"keep"
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        assert export(ro) == f"--output {ro}: cannot write there (Read-only file system)"
        assert export(ro / "sub") == f"--output {ro / 'sub'}: cannot write there (Read-only file system)"
    assert list(ro.iterdir()) == []
    cli.run("job", "delete", "e2e-export", "--purge")


def test_usage_and_spec_file_errors_are_one_line(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    p = cli.run("job", "status", check=False)
    assert p.returncode == 2
    assert one_line_error(p) == "Missing argument 'name'. (see `sendense job status --help`)"
    msg = one_line_error(cli.run("job", "settings", "x", "--retention", "abc", check=False))
    assert msg.startswith("Invalid value for '--retention'")
    assert one_line_error(cli.run("job", "create", "-f", str(tmp_path), check=False)) == (
        f"spec file {tmp_path}: is a directory, not a YAML file"
    )
    binary = tmp_path / "disk.qcow2"
    make_qcow2(binary, MiB)
    assert "not UTF-8 text" in one_line_error(cli.run("job", "create", "-f", str(binary), check=False))
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\nname: b\n")
    assert one_line_error(cli.run("job", "create", "-f", str(dup), check=False)) == (
        f"{dup} line 2: key 'name' given twice"
    )


def test_a_step_no_worker_takes_is_shown_waiting(e2e_stack: Cli, tmp_path: Path) -> None:
    """A source host id that no agent serves (a typo): the job stays `starting`, and status says why."""
    cli = e2e_stack
    spec = tmp_path / "j.yaml"
    disk = make_qcow2(tmp_path / "d.qcow2", 8 * MiB)
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "e2e-nohost",
                "source": {"platform": "kvm", "disks": [str(disk)], "host": "no-such-host"},
                "target": {"platform": "kvm", "path": str(tmp_path / "rep")},
            }
        )
    )
    cli.run("job", "create", "-f", str(spec), "--no-wait")
    try:
        for _ in range(50):  # until the workflow's first task has scheduled the validation
            st = cli.json("job", "status", "e2e-nohost")
            if st["steps"]:
                break
            time.sleep(0.2)
        assert st["state"] == "starting"
        steps = [(s["activity"], s["attempt"], s["state"]) for s in st["steps"]]
        assert steps == [("validate_job", 1, "scheduled")]
        text = cli.run("job", "status", "e2e-nohost").stdout
        assert "step: validate_job, attempt 1/5 (waiting for a worker)" in text
    finally:  # (a delete would wait for the validation no agent will run)
        asyncio.run(terminate("e2e-nohost"))


async def terminate(job: str) -> None:
    from app.cli.client import Jobs

    await (await Jobs.connect()).handle(job).terminate("test cleanup")


def test_a_retrying_copy_shows_its_attempt_and_last_error(e2e_stack: Cli, tmp_path: Path) -> None:
    """Before: a sync retrying its copy showed only `syncing`. The copy's worker is killed; while the
    next attempt runs, status (text and JSON) shows the attempt and why the previous one failed."""
    from tests.e2e.helpers_temporal import copy_progress

    cli = e2e_stack
    disk = make_qcow2(tmp_path / "d.qcow2", 32 * MiB)
    qemu_io(disk, "write -P 0x5a 0 24M")  # 12 s at 2 MiB/s: the retry runs long enough to be seen
    spec = tmp_path / "j.yaml"
    tuning = {"bandwidth_limit": 2 * MiB, "checkpoint_bytes": 4 * MiB, "heartbeat_timeout": "2s"}
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "e2e-retry",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(tmp_path / "rep")},
                "schedule": {"interval": "1h"},
                "tuning": {**tuning, "inline_copy_bytes": 0, "connections": 1},
            }
        )
    )
    cli.run("job", "create", "-f", str(spec))
    deadline = time.monotonic() + 60
    while not (copy_progress("e2e-retry") or {}).get("offset"):
        assert time.monotonic() < deadline, "copy made no progress"
        time.sleep(0.2)
    stack.restart_worker(cli.state, signal.SIGKILL)
    shown = re.compile(r"step: copy_disk, attempt (\d+)/20( \(.*\))?; last error: (.*)")
    while True:
        st = cli.json("job", "status", "e2e-retry")
        steps = [s for s in st["steps"] if s["activity"] == "copy_disk" and s["attempt"] >= 2]
        text = shown.search(cli.run("job", "status", "e2e-retry").stdout)
        if steps and text:
            break
        assert time.monotonic() < deadline + 60 and st["syncs"] == 0, f"no retry seen: {st}"
        time.sleep(0.1)
    assert steps[0]["maximum_attempts"] == 20
    assert "heartbeat" in (steps[0]["last_failure"] or "").lower(), steps
    assert int(text.group(1)) >= 2 and "heartbeat" in text.group(3).lower(), text.group(0)
    st = cli.wait_point("e2e-retry", 1, timeout=120)
    assert st["steps"] == [] and st["failures"] == 0
    cli.run("job", "delete", "e2e-retry", "--purge")


def test_point_commands_for_a_target_on_another_host_say_where(e2e_stack: Cli, tmp_path: Path) -> None:
    """Before: `point list` read this host's directory and printed an empty table."""
    cli = e2e_stack
    spec = tmp_path / "j.yaml"
    disk = make_qcow2(tmp_path / "d.qcow2", 8 * MiB)
    target = {"platform": "kvm", "path": str(tmp_path / "rep"), "host": "dr-site-1"}
    spec.write_text(
        yaml.safe_dump(
            {"name": "e2e-remote", "source": {"platform": "kvm", "disks": [str(disk)]}, "target": target}
        )
    )
    cli.run("job", "create", "-f", str(spec), "--no-wait")
    try:
        local = cli.env["SENDENSE_HOST_ID"]
        expected = (
            f"job e2e-remote: its target is on host dr-site-1 (this is {local}); run point commands there"
        )
        assert one_line_error(cli.run("point", "list", "e2e-remote", check=False)) == expected
        out = tmp_path / "x"
        assert (
            one_line_error(cli.run("point", "export", "e2e-remote", "--output", str(out), check=False))
            == expected
        )
        assert not out.exists()
    finally:
        asyncio.run(terminate("e2e-remote"))


async def start_unserved(name: str, disk: Path, target: Path) -> None:
    """A job whose workflow no worker runs (its task queue is served by nobody), via the SDK."""
    from app.cli.client import Jobs
    from sendense.models import ReplicationInput
    from sendense.spec import parse_spec
    from workflows.replication import ReplicationWorkflow

    spec = parse_spec(
        {
            "name": name,
            "source": {"platform": "kvm", "disks": [str(disk)]},
            "target": {"platform": "kvm", "path": str(target)},
        }
    )
    jobs = await Jobs.connect()
    await jobs.client.start_workflow(
        ReplicationWorkflow.run, ReplicationInput(spec=spec), id=f"job-{name}", task_queue="served-by-nobody"
    )


def test_a_job_that_does_not_answer_is_listed_and_said(e2e_stack: Cli, tmp_path: Path) -> None:
    """Before: `job list` waited 30 s and then failed as a whole (or left the job out), and `job status`
    printed "Temporal: Timeout expired" after 30 s."""
    cli = e2e_stack
    disk = make_qcow2(tmp_path / "d.qcow2", 8 * MiB)
    job(cli, tmp_path, "e2e-answers", disk, tmp_path / "rep")
    asyncio.run(start_unserved("e2e-silent", disk, tmp_path / "rep2"))
    try:
        t0 = time.monotonic()
        p = cli.run("job", "list")
        assert time.monotonic() - t0 < 20
        assert "e2e-answers" in p.stdout and "e2e-silent" in p.stdout
        assert p.stderr.startswith("warning: job e2e-silent: the job does not answer (")
        rows = {j["name"]: j for j in cli.json("job", "list")}
        assert rows["e2e-answers"]["state"] == "idle" and rows["e2e-silent"]["state"] == "error"
        assert "is a worker running for it?" in rows["e2e-silent"]["no_answer"]
        msg = one_line_error(cli.run("job", "status", "e2e-silent", check=False))
        assert msg == "job e2e-silent: does not answer within 10s; is a worker running for it?"
    finally:
        asyncio.run(terminate("e2e-silent"))
    cli.run("job", "delete", "e2e-answers", "--purge")
