"""Drills end to end (issue 12): the bootable guest's disk replicated by the embedded stack's real
worker, then `sendense drill run`: its newest point held, a test VM made from it (an overlay: the
point never changes) under QEMU, the guest's ready marker on its console, everything removed again,
the hold released; the job went on syncing meanwhile and `job status` shows the drill."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from helpers_kvm import file_digest

from app import stack
from labs.guest.build import build
from tests.e2e.conftest import SENDENSE, Cli
from tools.qemu import qemu_img

READY = "SENDENSE-GUEST-READY"


def drill_qemus(job_dir: Path) -> list[str]:
    return [
        " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline", "status"])
        if p.info["status"] != psutil.STATUS_ZOMBIE
        and (p.info["cmdline"] or [""])[0].endswith("qemu-system-x86_64")
        and any(str(job_dir) in a for a in p.info["cmdline"] or [])
    ]


def test_a_drill_boots_the_guest_from_the_newest_point_and_leaves_nothing(
    e2e_stack: Cli, tmp_path: Path
) -> None:
    cli = e2e_stack
    disk = tmp_path / "guest.qcow2"  # a standalone copy: a backing file outside the policy's roots is refused
    qemu_img("convert", "-O", "qcow2", str(build()), str(disk))
    replicas = tmp_path / "replicas"
    spec = tmp_path / "guest.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "drillguest",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(replicas)},
                "schedule": {"interval": "1h"},
                "recovery": {
                    "memory_mib": 256,
                    # the guest's own agent answers guest-sync, and QEMU says the VM runs
                    "boot_check": {
                        "console_contains": READY,
                        "timeout": "4m",
                        "guest_agent": True,
                        "status_checks": True,
                    },
                },
            }
        )
    )
    cli.run("job", "create", "-f", str(spec))
    st = cli.wait_point("drillguest", timeout=300)
    [point] = cli.json("point", "list", "drillguest")
    point_file = Path(point["disks"][0]["path"])
    before = file_digest(point_file)

    p = cli.run("drill", "run", "drillguest", "--json", check=False, timeout=600)
    assert p.returncode == 0, p.stderr + p.stdout
    r = json.loads(p.stdout)
    assert r["point_id"] == st["last_point"] and r["error"] is None
    assert r["boot"]["ok"] and READY in r["boot"]["evidence"], r["boot"]
    assert "VM running; guest agent answered" in r["boot"]["evidence"], r["boot"]
    assert r["vm"]["name"] == f"drill-{r['drill_id']}" and r["vm"]["mode"] == "test"
    assert r["cleaned"] and r["left_behind"] == []
    assert r["undone"] == [f"destroy VM drill-{r['drill_id']}", f"release the hold on point {r['point_id']}"]

    assert file_digest(point_file) == before  # the drill never changed the point
    assert drill_qemus(replicas) == []
    [after] = cli.json("point", "list", "drillguest")
    assert after["holds"] == []
    status = cli.json("job", "status", "drillguest")
    assert status["last_drill"]["drill_id"] == r["drill_id"] and status["last_drill"]["ok"] is True
    text = " ".join(cli.run("job", "status", "drillguest").stdout.split())
    assert f"last drill: {r['drill_id']} from point {r['point_id']}, booted" in text, text
    [listed] = cli.json("drill", "list", "drillguest")
    assert listed["drill_id"] == r["drill_id"] and listed["cleaned"]

    # the job went on: a sync after the drill commits a point as before
    cli.run("job", "sync-now", "drillguest", "--wait")
    assert len(cli.json("point", "list", "drillguest")) == 2
    cli.run("job", "delete", "drillguest", "--purge")


def test_drill_errors_are_one_line(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    p = cli.run("drill", "run", "no-such-job", check=False)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0
    assert "job no-such-job: not found" in p.stderr
    p = cli.run("drill", "end", "no-such-job", check=False)
    assert p.returncode == 1 and "job no-such-job has no drill running" in p.stderr
    p = cli.run("drill", "run", "x", "--keep", "forever", check=False)
    assert p.returncode == 1 and "--keep: a duration" in p.stderr
    p = cli.run("failover", "no-such-job", check=False)
    assert p.returncode == 1 and "job no-such-job: not found" in p.stderr and p.stderr.count("\n") == 1
    p = cli.run("plan", "drill", "no-such-plan", check=False)
    assert p.returncode == 1 and "plan no-such-plan: not found" in p.stderr and p.stderr.count("\n") == 1
    (tmp_path / "cycle.yaml").write_text(
        "name: p\ntiers:\n  - vms: [{job: a}]\n  - vms: [{job: b}, {job: a}]\n"
    )
    p = cli.run("plan", "create", "-f", str(tmp_path / "cycle.yaml"), check=False)
    assert p.returncode == 1 and "job a is in tier 1 and tier 2: once only" in p.stderr


@pytest.mark.slow
def test_a_drill_survives_its_worker_killed_during_the_boot_check_and_while_kept(
    e2e_stack: Cli, tmp_path: Path
) -> None:
    """Issue 12: SIGKILL of the worker in the middle of a drill, twice (during the boot check, then
    while the VM is kept): the steps in flight are retried on the new worker, idempotent by name, the
    drill ends when told, and nothing is left: no QEMU, no hold."""
    cli = e2e_stack
    disk = tmp_path / "guest.qcow2"
    qemu_img("convert", "-O", "qcow2", str(build()), str(disk))
    replicas = tmp_path / "replicas"
    spec = tmp_path / "guest.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "drillkill",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(replicas)},
                "schedule": {"interval": "1h"},
                "tuning": {"heartbeat_timeout": "5s"},
                "recovery": {"memory_mib": 256, "boot_check": {"console_contains": READY, "timeout": "4m"}},
            }
        )
    )
    cli.run("job", "create", "-f", str(spec))
    cli.wait_point("drillkill", timeout=300)
    drill = subprocess.Popen(
        [SENDENSE, "drill", "run", "drillkill", "--keep", "30m", "--json"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def step() -> str:
            running = [d for d in cli.json("drill", "list", "drillkill") if "step" in d]
            return running[0]["step"] if running else ""

        for phase in ("boot check of VM", "keeping VM"):
            deadline = time.monotonic() + 240
            while not step().startswith(phase):
                assert time.monotonic() < deadline, f"the drill never reached {phase!r}: {step()!r}"
                time.sleep(0.3)
            stack.restart_worker(cli.state, signal.SIGKILL)
        assert drill_qemus(replicas), "the kept drill VM runs on after its worker was killed"
        cli.run("drill", "end", "drillkill")
        out, err = drill.communicate(timeout=300)
    finally:
        if drill.poll() is None:
            drill.kill()
    assert drill.returncode == 0, err + out
    r = json.loads(out)
    assert r["boot"]["ok"] and r["cleaned"] and r["error"] is None, r
    assert drill_qemus(replicas) == []
    assert cli.json("point", "list", "drillkill")[0]["holds"] == []
    cli.run("job", "delete", "drillkill", "--purge")


def test_scheduled_drills_run_on_a_temporal_schedule_each_its_own(e2e_stack: Cli, tmp_path: Path) -> None:
    """`drill schedule` makes a Temporal Schedule (not a cron string in a workflow) whose runs are
    drills of their own (each its own id, VM and hold), skipped while one still runs; `drill
    unschedule` and `job delete` remove it."""
    import asyncio

    from temporalio.client import ScheduleOverlapPolicy
    from temporalio.service import RPCError

    from workers.worker import connect

    cli = e2e_stack
    disk = tmp_path / "guest.qcow2"
    qemu_img("convert", "-O", "qcow2", str(build()), str(disk))
    spec = tmp_path / "guest.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "drillsched",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(tmp_path / "replicas")},
                "schedule": {"interval": "1h"},
                "recovery": {"memory_mib": 256, "boot_check": {"console_contains": READY, "timeout": "4m"}},
            }
        )
    )
    cli.run("job", "create", "-f", str(spec))
    cli.wait_point("drillsched", timeout=300)
    p = cli.run("drill", "schedule", "drillsched", "--every", "1d", "--at", "25:00", check=False)
    assert p.returncode == 1 and "--at: a time of day, HH:MM (UTC)" in p.stderr
    assert cli.json("drill", "schedule", "drillsched", "--every", "7d", "--at", "02:00") == {
        "schedule_id": "drill-schedule-drillsched"
    }

    async def trigger_and_describe() -> object:
        h = (await connect()).get_schedule_handle("drill-schedule-drillsched")
        await h.trigger()
        return await h.describe()

    desc = asyncio.run(trigger_and_describe())
    interval = desc.schedule.spec.intervals[0]  # type: ignore[attr-defined]
    assert interval.every.days == 7 and interval.offset.total_seconds() == 2 * 3600
    assert desc.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP  # type: ignore[attr-defined]

    deadline = time.monotonic() + 300
    while True:
        drills = cli.json("drill", "list", "drillsched")
        done = [d for d in drills if "cleaned" in d]
        if done:
            break
        assert time.monotonic() < deadline, f"the scheduled drill did not end: {drills}"
        time.sleep(1)
    [d] = done
    assert d["boot"]["ok"] and d["cleaned"] and len(d["drill_id"]) == 8
    assert cli.json("job", "status", "drillsched")["last_drill"]["drill_id"] == d["drill_id"]

    cli.run("drill", "unschedule", "drillsched")
    p = cli.run("drill", "unschedule", "drillsched", check=False)
    assert p.returncode == 1 and "job drillsched has no drill schedule" in p.stderr
    cli.run("drill", "schedule", "drillsched", "--every", "1d")
    cli.run("job", "delete", "drillsched", "--purge")

    async def gone() -> bool:
        try:
            await (await connect()).get_schedule_handle("drill-schedule-drillsched").describe()
        except RPCError:
            return True
        return False

    assert asyncio.run(gone()), "job delete left its drill schedule"


async def _job_spec(name: str) -> Any:
    from app.cli.client import Jobs

    return await (await Jobs.connect()).spec(name)


def test_failover_boots_the_jobs_vm_on_the_target_and_the_job_stops_syncing(
    e2e_stack: Cli, tmp_path: Path
) -> None:
    """Issue 12, unplanned failover on KVM: the newest point of the guest becomes the job's production
    VM (QEMU on an overlay of the point), booted to the guest's ready marker; the job is failed-over,
    refuses syncs and a second failover in one line each; the point never changes."""
    from sendense.models import JobSpec
    from sendense.platforms import target_for, vms_for

    cli = e2e_stack
    disk = tmp_path / "guest.qcow2"
    qemu_img("convert", "-O", "qcow2", str(build()), str(disk))
    replicas = tmp_path / "replicas"
    spec_doc = {
        "name": "failoverguest",
        "source": {"platform": "kvm", "disks": [str(disk)]},
        "target": {"platform": "kvm", "path": str(replicas)},
        "schedule": {"interval": "1h"},
        "recovery": {"memory_mib": 256, "boot_check": {"console_contains": READY, "timeout": "4m"}},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_doc))
    cli.run("job", "create", "-f", str(tmp_path / "job.yaml"))
    st = cli.wait_point("failoverguest", timeout=300)
    [point] = cli.json("point", "list", "failoverguest")
    point_file = Path(point["disks"][0]["path"])
    before = file_digest(point_file)
    try:
        r = cli.json("failover", "failoverguest", timeout=600)
        assert r["error"] is None and r["point_id"] == st["last_point"] and not r["planned"]
        assert r["boot"]["ok"] and READY in r["boot"]["evidence"]
        assert r["vm"]["name"] == "failoverguest" and r["vm"]["mode"] == "production"
        assert 0 < r["rto_seconds"] < 600
        assert drill_qemus(replicas), "the production VM runs"
        status = cli.json("job", "status", "failoverguest")
        assert status["state"] == "failed-over" and status["failed_over"]["point_id"] == r["point_id"]
        text = " ".join(cli.run("job", "status", "failoverguest").stdout.split())
        assert f"failed over: unplanned, to point {r['point_id']}: VM failoverguest" in text, text
        p = cli.run("job", "sync-now", "failoverguest", check=False)
        assert p.returncode == 1 and "job is failed over" in p.stderr and p.stderr.count("\n") == 1
        p = cli.run("failover", "failoverguest", check=False)
        assert p.returncode == 1 and "failed over already (point" in p.stderr and p.stderr.count("\n") == 1
        assert file_digest(point_file) == before
    finally:  # (failback, which ends a failover, is the next slice: undo it by hand)
        spec: JobSpec = asyncio.run(_job_spec("failoverguest"))
        vms_for(spec).destroy_vm("failoverguest")
        for p in target_for(spec).list_points():
            for h in p.holds:
                target_for(spec).release(p.point_id, h)
        cli.run("job", "delete", "failoverguest", "--purge")
    assert drill_qemus(replicas) == []


def test_a_plan_drill_boots_two_tiers_of_guests_through_the_cli(e2e_stack: Cli, tmp_path: Path) -> None:
    """Issue 12, recovery plans: two jobs of the guest in two tiers, a hook between them; `plan drill`
    boots both from the points nearest one instant, in order, and cleans up; `plan status` shows it."""
    cli = e2e_stack
    for name in ("plandb", "planweb"):
        disk = tmp_path / f"{name}.qcow2"
        qemu_img("convert", "-O", "qcow2", str(build()), str(disk))
        (tmp_path / f"{name}.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "source": {"platform": "kvm", "disks": [str(disk)]},
                    "target": {"platform": "kvm", "path": str(tmp_path / "replicas")},
                    "schedule": {"interval": "1h"},
                    "recovery": {
                        "memory_mib": 256,
                        "boot_check": {"console_contains": READY, "timeout": "4m"},
                    },
                }
            )
        )
        cli.run("job", "create", "-f", str(tmp_path / f"{name}.yaml"))
    plan = {
        "name": "shop",
        "tiers": [
            {"vms": [{"job": "plandb"}], "after": {"command": ["/bin/true"], "timeout": "30s"}},
            {"vms": [{"job": "planweb"}]},
        ],
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**plan, "tiers": [{"vms": [{"job": "nosuch"}]}]}))
    p = cli.run("plan", "create", "-f", str(tmp_path / "bad.yaml"), check=False)
    assert p.returncode == 1 and "plan shop: no running job nosuch" in p.stderr
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    for name in ("plandb", "planweb"):
        cli.wait_point(name, timeout=300)
    cli.run("plan", "create", "-f", str(tmp_path / "plan.yaml"))
    assert "shop" in cli.json("plan", "list")
    r = cli.json("plan", "drill", "shop", timeout=600)
    assert r["error"] is None and r["cleaned"], r
    assert [v["job"] for v in r["vms"]] == ["plandb", "planweb"]
    assert all(v["boot"]["ok"] for v in r["vms"])
    assert [(h["tier"], h["when"], h["ok"]) for h in r["hooks"]] == [(1, "after", True)]
    assert r["spread_seconds"] is not None and {c["job"] for c in r["points"]} == {"plandb", "planweb"}
    assert drill_qemus(tmp_path / "replicas") == []
    st = cli.json("plan", "status", "shop")
    assert st["last_drill"]["drill_id"] == r["drill_id"]

    # scheduled plan drills: a Temporal Schedule whose runs tell the plan (`plan status`)
    p = cli.run("drill", "schedule", "plandb", "--plan", "shop", "--every", "1d", check=False)
    assert p.returncode == 1 and "give a job, or --plan NAME (one of them)" in p.stderr
    sid = cli.json("drill", "schedule", "--plan", "shop", "--every", "1d")["schedule_id"]

    async def trigger() -> None:
        from workers.worker import connect

        await (await connect()).get_schedule_handle(sid).trigger()

    asyncio.run(trigger())
    deadline = time.monotonic() + 300
    while cli.json("plan", "status", "shop")["last_drill"]["drill_id"] == r["drill_id"]:
        assert time.monotonic() < deadline, "the scheduled plan drill did not end"
        time.sleep(1)
    scheduled = cli.json("plan", "status", "shop")["last_drill"]
    assert scheduled["error"] is None and scheduled["cleaned"] and len(scheduled["drill_id"]) == 8
    cli.run("drill", "unschedule", "--plan", "shop")

    # the plan's failover: each job through its own failover, at the points nearest one instant
    from sendense.platforms import target_for, vms_for

    specs = {name: asyncio.run(_job_spec(name)) for name in ("plandb", "planweb")}
    try:
        f = cli.json("plan", "failover", "shop", timeout=600)
        assert f["error"] is None, f
        assert [(j["job"], j["boot"]["ok"]) for j in f["jobs"]] == [("plandb", True), ("planweb", True)]
        assert {j["job"]: j["point_id"] for j in f["jobs"]} == {c["job"]: c["point_id"] for c in f["points"]}
        for name in ("plandb", "planweb"):
            assert cli.json("job", "status", name)["state"] == "failed-over"
        assert len(drill_qemus(tmp_path / "replicas")) == 2

        # and back: each job's own failback, tier by tier (stopped VMs' disks: the operator starts them)
        b = cli.json("plan", "failback", "shop", timeout=600)
        assert b["error"] is None and b["skipped"] == [], b
        assert [j["job"] for j in b["jobs"]] == ["plandb", "planweb"]
        assert all(j["syncs"] >= 2 and not j["started"] and j["start_note"] for j in b["jobs"]), b
        assert drill_qemus(tmp_path / "replicas") == []
        for name in ("plandb", "planweb"):
            st = cli.wait_point(name, count=2, timeout=300)  # replicating again
            assert st["failed_over"] is None and st["last_failback"] is not None, st
        p = cli.run("plan", "failback", "shop", check=False)  # nothing failed over: nothing to do
        assert p.returncode == 0 and "not failed over, skipped" in p.stdout, p.stdout
    finally:
        for name, spec in specs.items():
            vms_for(spec).destroy_vm(name)
            for p in target_for(spec).list_points():
                for h in p.holds:
                    target_for(spec).release(p.point_id, h)
    cli.run("plan", "delete", "shop")
    for name in ("plandb", "planweb"):
        cli.run("job", "delete", name, "--purge")


@pytest.mark.slow
def test_a_planned_failover_of_a_running_guest_continues_its_sequence(e2e_stack: Cli, tmp_path: Path) -> None:
    """Issue 12, planned failover on KVM: the guest runs its workload (files and a sequence counter,
    each step synced) under QEMU with a QMP socket. `sendense failover` pauses it, takes a final sync,
    makes the job's VM from that point and powers the source off. The new VM boots the filesystem of
    the final point (e2fsck clean), whose sequence is at least the last one the source printed: nothing
    the source wrote before the pause is lost."""
    import re
    import tempfile

    from labs.guest.fscheck import check
    from sendense.platforms import target_for, vms_for
    from tools.boot import GuestVm

    cli = e2e_stack
    short = Path(tempfile.mkdtemp(prefix="sd-fo-"))  # unix socket paths stay short
    disk = tmp_path / "guest.qcow2"
    qemu_img("convert", "-O", "qcow2", str(build()), str(disk))
    replicas = tmp_path / "replicas"
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "plannedfo",
                "source": {"platform": "kvm", "qmp": str(short / "qmp.sock")},
                "target": {"platform": "kvm", "path": str(replicas)},
                "schedule": {"interval": "1h"},
                "recovery": {
                    "memory_mib": 256,
                    "boot_check": {
                        "console_contains": r"SENDENSE-GUEST-BOOTED mode=\w+ seq=\d+",
                        "timeout": "4m",
                    },
                },
            }
        )
    )
    vm = GuestVm(disk, tmp_path / "vm", mode="workload", qmp=short / "qmp.sock").start()
    spec = None
    try:
        assert vm.wait_for("SENDENSE-GUEST-SEQ 25", timeout=240).ok, vm.text()[-400:]
        cli.run("job", "create", "-f", str(tmp_path / "job.yaml"))
        cli.wait_point("plannedfo", timeout=300)
        assert vm.wait_for("SENDENSE-GUEST-SEQ 50", timeout=240).ok  # it writes on after the seed
        r = cli.json("failover", "plannedfo", timeout=600)
        printed = [int(n) for n in re.findall(r"SENDENSE-GUEST-SEQ (\d+)", vm.text())]
        assert r["error"] is None and r["planned"] and r["source_note"] is None, r
        spec = asyncio.run(_job_spec("plannedfo"))
        points = target_for(spec).list_points()
        assert len(points) == 2 and r["point_id"] == points[0].point_id  # the final sync's point
        seq = int(re.search(r"seq=(\d+)", r["boot"]["evidence"]).group(1))  # type: ignore[union-attr]
        fs = check(Path(points[0].disks[0].path))
        assert fs.ok and fs.seq == seq, (fs.detail, seq)
        assert seq >= max(printed), (seq, printed[-3:])  # nothing written before the pause is lost
        deadline = time.monotonic() + 30
        while vm.running():  # the source was powered off (QMP quit)
            assert time.monotonic() < deadline, "the source VM still runs"
            time.sleep(0.2)
    finally:
        vm.stop()
        if spec is not None:
            vms_for(spec).destroy_vm("plannedfo")
            for p in target_for(spec).list_points():
                for h in p.holds:
                    target_for(spec).release(p.point_id, h)
        cli.run("job", "delete", "plannedfo", "--purge", check=False)


@pytest.mark.slow
def test_a_failover_survives_its_worker_killed_during_the_boot_check(e2e_stack: Cli, tmp_path: Path) -> None:
    """Issue 12: SIGKILL of the worker while the failover's boot check runs: the step is retried on the
    new worker (the VM, made by name, is found again, not made twice) and the failover completes."""
    from sendense.platforms import target_for, vms_for

    cli = e2e_stack
    disk = tmp_path / "guest.qcow2"
    qemu_img("convert", "-O", "qcow2", str(build()), str(disk))
    replicas = tmp_path / "replicas"
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "fokill",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(replicas)},
                "schedule": {"interval": "1h"},
                "tuning": {"heartbeat_timeout": "5s"},
                "recovery": {"memory_mib": 256, "boot_check": {"console_contains": READY, "timeout": "4m"}},
            }
        )
    )
    cli.run("job", "create", "-f", str(tmp_path / "job.yaml"))
    cli.wait_point("fokill", timeout=300)
    fo = subprocess.Popen(
        [SENDENSE, "failover", "fokill", "--json"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    spec = asyncio.run(_job_spec("fokill"))
    try:
        deadline = time.monotonic() + 240
        while not drill_qemus(replicas):  # the VM was made and powered on: its boot check runs
            assert time.monotonic() < deadline, "the failover never powered its VM on"
            time.sleep(0.2)
        stack.restart_worker(cli.state, signal.SIGKILL)
        out, err = fo.communicate(timeout=300)
        assert fo.returncode == 0, err + out
        r = json.loads(out)
        assert r["error"] is None and r["boot"]["ok"], r
        assert len(drill_qemus(replicas)) == 1  # one VM, not two
        assert [v.name for v in vms_for(spec).list_vms()] == ["fokill"]
    finally:
        if fo.poll() is None:
            fo.kill()
        vms_for(spec).destroy_vm("fokill")
        for p in target_for(spec).list_points():
            for h in p.holds:
                target_for(spec).release(p.point_id, h)
        cli.run("job", "delete", "fokill", "--purge", check=False)
