"""`sendense demo`: the whole product on one machine.

Embedded stack -> lab VM (real QEMU under TCG, two qcow2 disks, QMP socket) with data and a workload
-> a job replicating it over QMP to the local KVM target -> full sync, incremental syncs while the
workload writes -> the recovery points and the web UI address.
"""

from __future__ import annotations

import asyncio
import random
import time
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


def _prefill(vm: Any, rng: random.Random) -> int:
    """A realistic mix: ~40% of each disk gets data (random patterns), some of it later zeroed."""
    written = 0
    for disk, size in enumerate(vm.sizes):
        chunk = 8 * MiB
        for off in range(0, size, chunk):
            if rng.random() < 0.4:
                vm.write(disk, off, rng.randrange(1, 256), chunk)
                written += chunk
    return written


def B(text: str) -> tuple[str, str]:
    """Bold text for Text.assemble: styles are applied, never parsed from interpolated strings."""
    return (text, "bold")


def run_demo(
    console: Console, state: Path, port: int, ui_port: int, incrementals: int, disk_mib: int
) -> None:
    from labs.kvm.vm import LabVm, Workload

    console.rule(Text("Sendense Replication demo", style="bold"))
    info = stack.up(state, port=port, ui_port=ui_port)
    console.print(Text.assemble("embedded stack: Temporal at ", B(info.address), ", web UI ", B(info.ui_url)))

    asyncio.run(_forget_previous(console))
    lab = state / "lab"
    old = LabVm(lab, [disk_mib * MiB, disk_mib * MiB // 2], name="demo-vm", detached=True)
    old.stop_detached()
    for f in lab.glob("disk*.qcow2"):
        f.unlink()
    vm = LabVm(lab, [disk_mib * MiB, disk_mib * MiB // 2], name="demo-vm", detached=True).start()
    rng = random.Random(7)
    prefilled = _prefill(vm, rng)
    console.print(
        Text.assemble(
            "lab VM ",
            B("demo-vm"),
            f": qemu-system-x86_64 (TCG), disks {disk_mib} MiB + {disk_mib // 2} MiB, "
            f"QMP {vm.qmp_path}; wrote {_human(prefilled)} of data",
        )
    )

    spec_path = state / "demo.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": JOB,
                "source": {"platform": "kvm", "qmp": str(vm.qmp_path)},
                "target": {"platform": "kvm", "path": str(state / "replicas")},
                "schedule": {"interval": "2m"},
                "retention": {"points": 10},
            },
            sort_keys=False,
        )
    )
    console.print(Text.assemble(f"job spec {spec_path}:\n", (spec_path.read_text().rstrip(), "dim")))
    asyncio.run(_run_job(console, spec_path, vm, Workload, incrementals))
    ui = f"{info.ui_url}/namespaces/{config.temporal_config().namespace}/workflows/{config.workflow_id(JOB)}"
    console.rule(Text("done", style="bold"))
    console.print(Text.assemble("Watch the job in the Temporal web UI: ", (ui, f"bold link {ui}")))
    console.print(
        "The job keeps syncing every 2 minutes. Try:\n"
        f"  .venv/bin/sendense job status {JOB}\n"
        f"  .venv/bin/sendense point export {JOB} --format qcow2 --output /tmp/demo-export\n"
        "  .venv/bin/sendense demo --clean    (delete the demo job and lab VM)\n"
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


async def _run_job(console: Console, spec_path: Path, vm: Any, workload_cls: Any, incrementals: int) -> None:
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

    workload = workload_cls(vm, rate=150.0, zero_fraction=0.1, seed=11).start()
    console.print("workload started: random 64 KiB writes through QMP while the job syncs")
    try:
        for i in range(incrementals):
            await asyncio.sleep(3)
            console.print(
                Text.assemble(
                    B(f"incremental sync {i + 1}/{incrementals}"),
                    f" (workload wrote {_human(workload.bytes_written)})",
                )
            )
            _print_result(console, await sync_now_with_progress(jobs, JOB, console))
    finally:
        workload.stop()

    points = await asyncio.to_thread(_points, spec)
    t = Table("point_id", "snapshot instant", "kind", "written", title=f"recovery points of job {JOB}")
    for p in points:
        t.add_row(
            p.point_id, p.created_at.isoformat(timespec="seconds"), p.kind, _human(p.stats.bytes_written)
        )
    console.print(t)


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
    from labs.kvm.vm import LabVm

    try:
        asyncio.run(_forget_previous(console))
    except SendenseError as e:
        console.print(f"job not removed: {e.message}")
    LabVm(state / "lab", [1], name="demo-vm", detached=True).stop_detached()
    console.print("lab VM stopped")
    time.sleep(0)
