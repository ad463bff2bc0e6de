"""`sendense demo`: the whole product on one machine.

Embedded stack -> a real Linux guest (the bootable guest of labs/guest, under QEMU with a QMP socket)
running its workload: files written and synced in a loop, a sequence counter -> a job replicating it
over QMP to the local KVM target -> full sync, incremental syncs while the guest writes -> the
recovery points, the newest one checked offline (e2fsck after journal replay, the sequence it holds),
and the web UI address.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from app import stack
from app.cli.progress import sync_now_with_progress, watch_copy
from sendense import config
from sendense.errors import ResourceNotFound, SendenseError
from sendense.models import JobStatus, SyncResult
from sendense.spec import load_spec

JOB = "demo"
MiB = 1 << 20


def _human(n: float) -> str:
    return f"{n / MiB:.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def B(text: str) -> tuple[str, str]:
    """Bold text for Text.assemble: styles are applied, never parsed from interpolated strings."""
    return (text, "bold")


def _lab(state: Path) -> Path:
    return state / "lab"


def run_demo(console: Console, state: Path, port: int, ui_port: int, incrementals: int) -> None:
    from labs.guest.build import build
    from tools.boot import GuestVm, overlay

    console.rule(Text("Sendense Replication demo", style="bold"))
    info = stack.up(state, port=port, ui_port=ui_port)
    console.print(Text.assemble("embedded stack: Temporal at ", B(info.address), ", web UI ", B(info.ui_url)))
    # this process's clients use the stack's payload key (also under a --state-dir of its own)
    os.environ.setdefault("SENDENSE_CODEC_KEY", str(stack.key_path(Path(info.state_dir))))

    asyncio.run(_forget_previous(console))
    lab = _lab(state)
    GuestVm.stop_detached(lab)
    lab.mkdir(parents=True, exist_ok=True)
    disk = lab / "guest.qcow2"
    disk.unlink(missing_ok=True)
    overlay(build(), disk)  # the guest's own disk, over the cached image (built by scripts/install.sh)
    qmp = lab / "qmp.sock"
    vm = GuestVm(disk, lab, mode="workload", qmp=qmp, detached=True).start()
    booted = vm.wait_for("SENDENSE-GUEST-SEQ 1", timeout=240)
    if not booted.ok:
        GuestVm.stop_detached(lab)
        raise SendenseError(f"the demo guest did not boot: {booted.evidence}")
    console.print(
        Text.assemble(
            "guest VM ",
            B("demo-vm"),
            f": Linux under qemu-system-x86_64, disk {disk} (256 MiB), QMP {qmp}; booted in "
            f"{booted.seconds:.1f}s, its workload writes and syncs files with a sequence counter",
        )
    )

    spec_path = state / "demo.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": JOB,
                "source": {"platform": "kvm", "qmp": str(qmp)},
                "target": {"platform": "kvm", "path": str(state / "replicas")},
                "schedule": {"interval": "2m"},
                "retention": {"points": 10},
            },
            sort_keys=False,
        )
    )
    console.print(Text.assemble(f"job spec {spec_path}:\n", (spec_path.read_text().rstrip(), "dim")))
    asyncio.run(_run_job(console, spec_path, vm, incrementals))
    ui = f"{info.ui_url}/namespaces/{config.temporal_config().namespace}/workflows/{config.workflow_id(JOB)}"
    console.rule(Text("done", style="bold"))
    console.print(Text.assemble("Watch the job in the Temporal web UI: ", (ui, f"bold link {ui}")))
    console.print(
        "The job keeps syncing every 2 minutes while the guest writes. Try:\n"
        f"  .venv/bin/sendense job status {JOB}\n"
        f"  .venv/bin/sendense point export {JOB} --format qcow2 --output /tmp/demo-export\n"
        "  .venv/bin/sendense demo --clean    (delete the demo job and stop the guest)\n"
        "  .venv/bin/sendense down            (stop the embedded stack)"
    )


async def _forget_previous(console: Console) -> None:
    from app.cli.client import Jobs

    jobs = await Jobs.connect()
    try:
        await jobs.delete(JOB, purge=True)
        console.print("removed the previous demo job")
    except ResourceNotFound:
        pass


async def _run_job(console: Console, spec_path: Path, vm: Any, incrementals: int) -> None:
    from app.cli.client import Jobs

    jobs = await Jobs.connect()
    spec = load_spec(spec_path)
    await jobs.create(spec)
    await jobs.wait_started(JOB)
    console.print(Text.assemble(B("full sync"), " (the job's first sync starts at once)"))

    async def first() -> JobStatus | None:
        st: JobStatus = await jobs.status(JOB)
        if st.last_error and st.syncs == 0:
            raise SendenseError(f"first sync failed: {st.last_error}")
        return st if st.syncs >= 1 else None

    st = await watch_copy(jobs, JOB, console, first)
    assert st.last_sync is not None
    _print_result(console, st.last_sync)
    for i in range(incrementals):
        await asyncio.sleep(3)
        console.print(Text.assemble(B(f"incremental sync {i + 1}/{incrementals}"), f" (guest at {_seq(vm)})"))
        _print_result(console, await sync_now_with_progress(jobs, JOB, console))

    points = await asyncio.to_thread(_points, spec)
    t = Table("point_id", "snapshot instant", "kind", "written", title=f"recovery points of job {JOB}")
    for p in points:
        t.add_row(
            p.point_id, p.created_at.isoformat(timespec="seconds"), p.kind, _human(p.stats.bytes_written)
        )
    console.print(t)
    newest = points[0]
    fs = await asyncio.to_thread(_check, Path(newest.disks[0].path))
    if not fs.ok:
        raise SendenseError(f"point {newest.point_id}: the guest's filesystem is not consistent: {fs.detail}")
    console.print(
        Text.assemble(
            "point ",
            B(newest.point_id),
            ": the guest's filesystem is ",
            B("clean"),
            f" after journal replay (e2fsck), holding workload sequence {fs.seq}: crash-consistent",
        )
    )


def _seq(vm: Any) -> str:
    """The guest's last sequence number on its console."""
    import re

    seqs = re.findall(r"SENDENSE-GUEST-SEQ (\d+)", vm.text())
    return f"sequence {seqs[-1]}" if seqs else "boot"


def _check(point_file: Path) -> Any:
    from labs.guest.fscheck import check

    return check(point_file)


def _points(spec: Any) -> list[Any]:
    from sendense.platforms import target_for

    return target_for(spec).list_points()


def _print_result(console: Console, r: SyncResult) -> None:
    console.print(
        Text.assemble(
            "  point ",
            B(r.point_id),
            f" ({r.kind}): read {_human(r.bytes_read)}, wrote {_human(r.bytes_written)}, "
            f"zeroed {_human(r.bytes_zeroed)} in {r.seconds:.1f}s",
        )
    )


def clean_demo(console: Console, state: Path) -> None:
    from tools.boot import GuestVm

    try:
        asyncio.run(_forget_previous(console))
    except SendenseError as e:
        console.print(f"job not removed: {e.message}")
    stopped = GuestVm.stop_detached(_lab(state))
    console.print("guest VM stopped" if stopped else "guest VM was not running")
