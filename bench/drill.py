"""Drills: the RTO of a failover from a point, as a drill rehearses it, on a KVM and an AWS target.

The bootable guest (labs/guest: MBR, extlinux, a Linux kernel, `SENDENSE-GUEST-READY` on its serial
console once its init runs) copied standalone, replicated by a stopped-VM KVM job to (a) a KVM target
(the drill VM: bare QEMU on an overlay of the point) and (b) the AWS lab (`labs.aws`, started here as
`sendense lab up` does: the drill VM is an instance from an image of the point's EBS snapshots, run by
the lab's QEMU), with `recovery.boot_check.console_contains: SENDENSE-GUEST-READY`. Then `--runs`
drills of each through the client (`Drills.start` + `wait`, as `sendense drill run` does). Per drill:

- `drill_seconds`: request (before `Drills.start`) to the result in hand;
- `rto_seconds`: request to the boot check's success (its activity's completion event): what a
  failover from a point would take to a VM known to have booted, the choice of the point included;
- `boot_seconds`: the boot check's own figure (power-on to the ready marker on the console);
- `cleanup_seconds`: boot check passed to the hold released (destroy the VM, release the hold);
- `steps`: where the time goes, from the drill workflow's history: for each step the time since the
  previous step ended (`seconds`: queueing and workflow tasks included; the steps add up to the
  drill) and the activity's own run time (`run`); `report` is the last step's end to the result.

A drill that did not boot, stopped with an error or left something behind fails the measure (the run
exits 1), as a point that is not bit-exact does. QEMU runs under TCG where /dev/kvm is missing or does
not work (tools.boot.accelerator): boot times are then TCG's, said in `accelerator`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from app.cli.drill_client import Drills
from bench.harness import Bench, median, remove_job_bitmaps
from bench.history import activity_times
from bench.images import run
from sendense.models import JobSpec
from sendense.recovery import DrillResult

READY = "SENDENSE-GUEST-READY"
MIB = 1 << 20
DEVICE = "/machine/peripheral/dev0/virtio-backend"  # the KVM VM's first disk (connectors.kvm.vm_qemu)
STEPS = ("choose_point", "hold_point", "create_vm", "power_on", "boot_check", "destroy_vm", "release_point")
MEMORY_MIB = 256  # the AWS lab runs every instance with 256 MiB: the KVM drill VM gets the same
BOOT_TIMEOUT = "4m"
TARGETS = ("kvm", "aws")  # also in --quick: the AWS lab adds ~7 s (its start, a sync, one drill)


def guest_disk(bench: Bench, kind: str) -> Path:
    """A standalone copy of the bootable guest per target (its cached image may be a backing chain
    outside the policy's roots, and a job's bitmaps must not land in the cache; the failback measure
    writes random blocks into a target's copy, which then no longer boots)."""
    from labs.guest.build import build

    disk = bench.dir("drill") / f"guest-{kind}.qcow2"
    if not disk.exists():
        run("qemu-img", "convert", "-O", "qcow2", build(), disk)
    return disk


@contextlib.contextmanager
def aws_lab() -> Iterator[dict[str, Any]]:
    """The AWS lab under the bench's SENDENSE_HOME, registered for the running worker; stopped after."""
    from labs.aws import hook

    t0 = time.monotonic()
    lab = hook.up()
    lab["start_seconds"] = round(time.monotonic() - t0, 2)
    try:
        yield lab
    finally:
        hook.down()


def job_spec(name: str, disk: Path, target: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": name,
            "source": {"platform": "kvm", "disks": [str(disk)]},
            "target": target,
            "schedule": {"interval": "1h"},
            "recovery": {
                "memory_mib": MEMORY_MIB,
                "boot_check": {"console_contains": READY, "timeout": BOOT_TIMEOUT},
            },
        }
    )


def qemus_under(path: Path) -> list[int]:
    """QEMU processes still running with a file under `path` (a KVM drill VM that was not destroyed)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if (
            p.info["status"] != psutil.STATUS_ZOMBIE
            and cmd
            and Path(cmd[0]).name.startswith("qemu-system")
            and any(str(path) in a for a in cmd)
        ):
            out.append(int(p.info["pid"]))
    return out


def timeline(requested: float, received: float, acts: list[dict[str, Any]]) -> dict[str, Any]:
    """One drill's figures from its activities' event times (epoch seconds, this machine's clock)."""
    ends = {a["type"]: a for a in acts if a["outcome"] == "completed"}
    steps: dict[str, dict[str, float]] = {}
    prev = requested
    for a in sorted(ends.values(), key=lambda a: a["ended"]):
        steps[a["type"]] = {
            "seconds": round(a["ended"] - prev, 3),
            "run": round(a["ended"] - a["started"], 3),
            "wait": round(a["started"] - a["scheduled"], 3),
            "attempt": a.get("attempt", 1),
        }
        prev = a["ended"]
    steps["report"] = {"seconds": round(received - prev, 3)}
    boot_end = ends["boot_check"]["ended"] if "boot_check" in ends else None
    release_end = ends["release_point"]["ended"] if "release_point" in ends else None
    return {
        "drill_seconds": round(received - requested, 3),
        "rto_seconds": round(boot_end - requested, 3) if boot_end else None,
        "cleanup_seconds": round(release_end - boot_end, 3) if boot_end and release_end else None,
        "steps": steps,
    }


def problems(res: DrillResult) -> list[str]:
    bad = []
    if res.error:
        bad.append(f"error: {res.error}")
    if res.boot is None or not res.boot.ok:
        bad.append(f"did not boot: {res.boot.evidence if res.boot else 'no boot check'}")
    if not res.cleaned or res.left_behind:
        bad.append(f"not cleaned: {', '.join(res.left_behind) or 'cleaned is false'}")
    return bad


async def drill_once(bench: Bench, name: str) -> dict[str, Any]:
    drills = Drills(await bench.client())
    requested = time.time()
    h = await drills.start(name)
    res = await drills.wait(h)
    received = time.time()
    out = timeline(requested, received, await activity_times(h))
    out.update(
        drill_id=res.drill_id,
        point_id=res.point_id,
        boot_ok=bool(res.boot and res.boot.ok),
        boot_seconds=round(res.boot.seconds, 3) if res.boot else None,
        boot_evidence=res.boot.evidence[:200] if res.boot else "",
        cleaned=res.cleaned,
        left_behind=res.left_behind,
        undone=res.undone,
        error=res.error,
        problems=problems(res),
    )
    if not out["boot_ok"]:  # the boot check ended, but the VM never showed it booted: no RTO
        out["rto_seconds"] = None
    return out


async def failover_once(bench: Bench, name: str) -> dict[str, Any]:
    """One (unplanned: the source is a stopped VM's disk) failover of the job: its RTO, from the
    request to the boot check passed (the failover's own figure). The job stays failed over (the
    failback measure ends it)."""
    jobs = await bench.client()
    requested = time.time()
    r = await jobs.failover(name)
    received = time.time()
    problems = [] if r.error is None and r.boot is not None and r.boot.ok else [r.error or "did not boot"]
    return {
        "rto_seconds": r.rto_seconds,
        "request_to_result_seconds": round(received - requested, 3),
        "boot_seconds": round(r.boot.seconds, 3) if r.boot else None,
        "planned": r.planned,
        "point_id": r.point_id,
        "vm_id": r.vm.vm_id if r.vm else "",
        "problems": problems,
    }


def vm_writes(kind: str, spec: JobSpec, vm_id: str, block: int, count: int) -> int:
    """Write `count` blocks of `block` bytes of random data at distinct block-aligned offsets of the
    failed-over VM's first disk, as its guest would (KVM: QEMU's own block backend through HMP
    `qemu-io`, the VM running; AWS lab: the lab's volume write, as the instance's guest), spread over
    the disk's first 256 MiB; returns the bytes written."""
    import random

    rng = random.Random(12)
    offsets = sorted(rng.sample(range(256 * MIB // block), count))
    if kind == "kvm":
        from connectors.kvm.vms import KvmVms
        from tools.qmp import QmpClient

        vms = KvmVms(spec.name, Path(spec.target.path), spec.job_id)  # type: ignore[attr-defined]
        with QmpClient(vms.files(spec.name).qmp).connect() as c:
            for i in offsets:
                line = f'qemu-io -d {DEVICE} "write -P {i % 251} {i * block} {block}"'
                out = c.execute("human-monitor-command", **{"command-line": line})
                if str(out).strip():
                    raise RuntimeError(f"qemu-io: {out}")
    else:
        from labs.aws import hook

        lab = hook.attach()
        assert lab is not None, "the AWS lab is not running"
        root = lab.vm(vm_id)["disks"][0]
        for i in offsets:
            lab.write(root, i * block, rng.randbytes(block))
    return count * block


async def failback_once(bench: Bench, kind: str, name: str, vm_id: str) -> dict[str, Any]:
    """The failed-over VM writes random blocks (KVM: 64 KiB, the overlay's cluster; AWS: 512 KiB, the
    EBS block), then `sendense failback`'s client call: bytes written back vs what the VM wrote (goal
    <= 1.1x plus a bounded constant: the guest's own writes while it runs, a few clusters), the reverse
    syncs, and the cutover (the VM powered off to the source started or its disks current)."""
    import secrets

    from sendense.recovery import FailbackRequest

    jobs = await bench.client()
    spec = await jobs.spec(name)
    block, count = (64 << 10, 256) if kind == "kvm" else (512 << 10, 32)  # 16 MiB either way
    wrote = vm_writes(kind, spec, vm_id, block, count)
    t0 = time.time()
    r = await jobs.failback(name, FailbackRequest(failback_id=secrets.token_hex(4)))
    seconds = time.time() - t0
    problems = [] if r.error is None else [r.error]
    problems += [f"left behind: {x}" for x in r.left_behind]
    return {
        "vm_wrote_bytes": wrote,
        "bytes_written": r.bytes_written,
        "bytes_read": r.bytes_read,
        "ratio": round(r.bytes_written / wrote, 3) if wrote else None,
        "syncs": r.syncs,
        "reverse_syncs": [s.model_dump() for s in r.reverse_syncs],
        "cutover_seconds": r.cutover_seconds,
        "failback_seconds": round(seconds, 2),
        "started": r.started,
        "problems": problems,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and min/max) over the runs; per step the median of each figure."""

    def fig(key: str) -> dict[str, Any]:
        xs = [r[key] for r in runs if r.get(key) is not None]
        mid = round(median(xs), 3) if xs else None
        return {"median": mid, "min": min(xs, default=None), "max": max(xs, default=None)}

    names = [s for s in (*STEPS, "report") if any(s in r["steps"] for r in runs)]
    steps = {}
    for s in names:
        per = [r["steps"][s] for r in runs if s in r["steps"]]
        steps[s] = {
            k: round(median([p[k] for p in per]), 3) for k in ("seconds", "run", "wait") if k in per[0]
        }
    return {
        "rto_seconds": fig("rto_seconds")["median"],
        "drill_seconds": fig("drill_seconds")["median"],
        "boot_seconds": fig("boot_seconds")["median"],
        "cleanup_seconds": fig("cleanup_seconds")["median"],
        "spread": {k: fig(k) for k in ("rto_seconds", "drill_seconds", "boot_seconds", "cleanup_seconds")},
        "steps": steps,
    }


async def drill_target(bench: Bench, kind: str, disk: Path, target: dict[str, Any]) -> dict[str, Any]:
    """A job from the guest's disk to `target`, its first sync, then `--runs` drills; job deleted after."""
    name = f"drill-{kind}-{int(time.time()) % 100000}"
    runs: list[dict[str, Any]] = []
    fo: dict[str, Any] = {}
    fb: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        await bench.create(job_spec(name, disk, target))
        sync = await bench.wait_syncs(name, 1, timeout=900)
        first_sync = time.monotonic() - t0
        for _ in range(bench.opts.runs):
            r = await drill_once(bench, name)
            if kind == "kvm" and (left := qemus_under(Path(target["path"]))):
                r["problems"].append(f"QEMU still running: pids {left}")
            runs.append(r)
        fo = await failover_once(bench, name)  # last: the job is failed over after it...
        fb = await failback_once(bench, kind, name, fo["vm_id"]) if not fo["problems"] else {}
        if fb:  # ...until its failback; the job replicates again then
            await bench.wait_syncs(name, 2, timeout=900)
    finally:
        await bench.delete(name, purge=True)
        remove_job_bitmaps(disk, name)
    if fo.get("problems"):
        runs[-1]["problems"].extend(f"failover: {p}" for p in fo["problems"])
    if fb.get("problems"):
        runs[-1]["problems"].extend(f"failback: {p}" for p in fb["problems"])
    return {
        "wall_seconds": round(time.monotonic() - t0, 2),  # job created to deleted, all drills
        "job": name,
        "ok": all(not r["problems"] for r in runs) and len(runs) == bench.opts.runs,
        "runs_count": len(runs),
        **summarize(runs),
        "failover": fo,
        "failback": fb,
        "first_sync_seconds": round(first_sync, 2),
        "first_sync_bytes_written": sync.bytes_written,
        "runs": runs,
    }


async def measure(bench: Bench) -> dict[str, Any]:
    from tools.boot import accelerator

    disk = guest_disk(bench, "kvm")
    out: dict[str, Any] = {
        "accelerator": accelerator(),
        "guest_mib": round(disk.stat().st_size / (1 << 20), 1),
        "memory_mib": MEMORY_MIB,
        "runs": bench.opts.runs,
    }
    kvm_target = {"platform": "kvm", "path": str(bench.dir("drill-kvm"))}
    out["kvm"] = await drill_target(bench, "kvm", disk, kvm_target)
    t0 = time.monotonic()
    with aws_lab() as lab:
        place = {"platform": "aws", "region": lab["region"], "endpoint_url": lab["endpoint_url"]}
        out["aws"] = await drill_target(bench, "aws", guest_disk(bench, "aws"), place)
        out["aws"]["lab_start_seconds"] = lab["start_seconds"]
    out["aws"]["wall_seconds_with_lab"] = round(time.monotonic() - t0, 2)
    failed = [
        f"{kind} drill {r['drill_id']}: {'; '.join(r['problems'])}"
        for kind in TARGETS
        for r in out[kind]["runs"]
        if r["problems"]
    ]
    out["ok"] = not failed and all(out[k]["ok"] for k in TARGETS)
    if failed:
        out["error"] = "a drill failed: " + " | ".join(failed)
    out["notes"] = (
        "rto = drill request to the boot check's completion event (a failover from a point up to a VM "
        "known to boot); drill = request to the result; boot = the boot check's power-on to ready marker; "
        "cleanup = boot check passed to the hold released; steps.<s>.seconds = time since the previous "
        "step ended (queue and workflow tasks included), .run = the activity's own last attempt; "
        f"QEMU under {accelerator().upper()}"
    )
    return out
