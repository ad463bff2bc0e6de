"""Failback end to end on KVM (issue 12), with the bootable guest: the job's VM failed over to the
target runs the guest's filesystem workload; `sendense failback` copies what it wrote back into the
source's qcow2 image in place (reverse syncs while it runs, then the cutover), the failed-over VM and
its point's hold go, and the job replicates again with an incremental. The source image then holds
the failed-over VM's filesystem as of its power-off: e2fsck passes after journal replay, its sequence
counter is at least the last one the VM printed, and the guest boots from it."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from labs.guest.build import with_mode
from labs.guest.fscheck import check
from tests.e2e.conftest import Cli
from tests.e2e.test_drill_e2e import drill_qemus
from tools.boot import GuestVm

BOOTED = r"SENDENSE-GUEST-BOOTED mode=\w+ seq=\d+"


async def _job_spec(name: str) -> Any:
    from app.cli.client import Jobs

    return await (await Jobs.connect()).spec(name)


def test_failback_of_a_job_never_failed_over_is_one_line(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    p = cli.run("failback", "nosuchjob", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "nosuchjob" in p.stderr, p.stderr
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "neverfo",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(tmp_path / "replicas")},
                "schedule": {"interval": "1h"},
            }
        )
    )
    cli.run("job", "create", "-f", str(tmp_path / "job.yaml"))
    try:
        cli.wait_point("neverfo", timeout=120)
        p = cli.run("failback", "neverfo", check=False)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "job neverfo: not failed over: nothing to fail back" in p.stderr, p.stderr
    finally:
        cli.run("job", "delete", "neverfo", "--purge")


@pytest.mark.slow
def test_failback_brings_the_failed_over_guests_writes_home(e2e_stack: Cli, tmp_path: Path) -> None:
    from sendense.platforms import target_for, vms_for

    cli = e2e_stack
    disk = with_mode(tmp_path / "guest.qcow2", "workload")  # a VM made from it runs the workload
    replicas = tmp_path / "replicas"
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "failbackguest",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(replicas)},
                "schedule": {"interval": "1h"},
                "recovery": {"memory_mib": 256, "boot_check": {"console_contains": BOOTED, "timeout": "4m"}},
            }
        )
    )
    cli.run("job", "create", "-f", str(tmp_path / "job.yaml"))
    spec = None
    try:
        cli.wait_point("failbackguest", timeout=300)
        fo = cli.json("failover", "failbackguest", timeout=600)
        assert fo["error"] is None, fo
        spec = asyncio.run(_job_spec("failbackguest"))
        vms = vms_for(spec)
        deadline = time.monotonic() + 300
        while "SENDENSE-GUEST-SEQ 50" not in vms.console("failbackguest"):  # the VM writes
            assert time.monotonic() < deadline, vms.console("failbackguest")[-400:]
            time.sleep(1)
        printed = [int(n) for n in re.findall(r"SENDENSE-GUEST-SEQ (\d+)", vms.console("failbackguest"))]

        r = cli.json("failback", "failbackguest", timeout=900)
        assert r["error"] is None, r
        assert r["syncs"] >= 2 and r["reverse_syncs"][-1]["cutover"], r
        assert all(s["compared_whole"] == [] for s in r["reverse_syncs"]), r  # the source knew
        print("failback:", r)
        assert not r["started"] and "the disks are current" in r["start_note"]  # a VM known by its disks
        assert r["cutover_seconds"] is not None and r["bytes_written"] > 0
        assert drill_qemus(replicas) == []  # the failed-over VM is gone
        assert not any(p.holds for p in target_for(spec).list_points())

        fs = check(disk)  # the failed-over VM's filesystem, as of its power-off
        assert fs.ok, fs.detail
        assert fs.seq is not None and fs.seq >= max(printed), (fs.seq, printed[-3:])

        st = cli.wait_point("failbackguest", count=2, timeout=300)  # replicating again, at once
        assert (
            st["state"] == "idle" and st["failed_over"] is None and st["last_failback"]["syncs"] == r["syncs"]
        )
        assert st["last_sync"]["kind"] == "incremental", st["last_sync"]
        newest = target_for(spec).list_points()[0]
        same = subprocess.run(["qemu-img", "compare", "-q", str(disk), str(newest.disks[0].path)])
        assert same.returncode == 0, "the new point differs from the failed-back source"
        text = " ".join(cli.run("job", "status", "failbackguest").stdout.split())
        assert f"last failback: {r['failback_id']}: {r['syncs']} reverse syncs" in text, text

        vm = GuestVm(disk, tmp_path / "vm", mode="boot").start()  # the operator starts the source
        try:
            booted = vm.wait_for("SENDENSE-GUEST-READY", timeout=240)
            assert booted.ok and booted.seq == fs.seq, (booted.evidence, fs.seq)
        finally:
            vm.stop()
    finally:
        if spec is not None:
            vms_for(spec).destroy_vm("failbackguest")
            for p in target_for(spec).list_points():
                for h in p.holds:
                    target_for(spec).release(p.point_id, h)
        cli.run("job", "delete", "failbackguest", "--purge", check=False)
    assert drill_qemus(replicas) == []


@pytest.mark.slow
def test_planned_failover_and_failback_of_a_running_guest_over_qmp(e2e_stack: Cli, tmp_path: Path) -> None:
    """The whole round trip of a running VM: the guest's workload runs under QEMU with a QMP socket;
    a planned failover pauses it, takes a final sync and quits it; the job's VM on the target continues
    the workload from that point; failback writes the VM's work back into the source's images (QMP
    form: the product does not start a QEMU it did not start, it says so); the operator starts the
    guest again, which continues from the failed-over VM's sequence, and the job syncs incrementally
    from the base it had before the failover."""
    import tempfile

    from sendense.platforms import target_for, vms_for

    cli = e2e_stack
    short = Path(tempfile.mkdtemp(prefix="sd-fb-"))  # unix socket paths stay short
    disk = with_mode(tmp_path / "guest.qcow2", "workload")
    replicas = tmp_path / "replicas"
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "roundtrip",
                "source": {"platform": "kvm", "qmp": str(short / "qmp.sock")},
                "target": {"platform": "kvm", "path": str(replicas)},
                "schedule": {"interval": "1h"},
                "recovery": {"memory_mib": 256, "boot_check": {"console_contains": BOOTED, "timeout": "4m"}},
            }
        )
    )
    vm = GuestVm(disk, tmp_path / "vm", mode="workload", qmp=short / "qmp.sock").start()
    spec = None
    try:
        assert vm.wait_for("SENDENSE-GUEST-SEQ 25", timeout=240).ok, vm.text()[-400:]
        cli.run("job", "create", "-f", str(tmp_path / "job.yaml"))
        cli.wait_point("roundtrip", timeout=300)
        fo = cli.json("failover", "roundtrip", timeout=600)
        assert fo["error"] is None and fo["planned"], fo
        seq_at_failover = int(re.search(r"seq=(\d+)", fo["boot"]["evidence"]).group(1))  # type: ignore[union-attr]
        vm.stop()  # (QEMU quit already: the planned failover powered it off)
        spec = asyncio.run(_job_spec("roundtrip"))
        vms = vms_for(spec)
        target = seq_at_failover + 50 - seq_at_failover % 25
        deadline = time.monotonic() + 300
        while f"SENDENSE-GUEST-SEQ {target}" not in vms.console("roundtrip"):  # it writes on
            assert time.monotonic() < deadline, vms.console("roundtrip")[-400:]
            time.sleep(1)
        printed = [int(n) for n in re.findall(r"SENDENSE-GUEST-SEQ (\d+)", vms.console("roundtrip"))]

        r = cli.json("failback", "roundtrip", timeout=900)
        assert r["error"] is None, r
        assert all(s["compared_whole"] == [] for s in r["reverse_syncs"]), r
        assert not r["started"] and r["start_note"], r  # a QEMU the product did not start
        fs = check(disk)
        assert fs.ok and fs.seq is not None and fs.seq >= max(printed) > seq_at_failover, (fs, printed[-3:])
        assert drill_qemus(replicas) == []

        vm = GuestVm(disk, tmp_path / "vm2", mode="workload", qmp=short / "qmp.sock").start()  # the operator
        booted = vm.wait_for("SENDENSE-GUEST-SEQ", timeout=240)
        assert booted.ok and booted.seq == fs.seq, (booted.evidence, fs.seq)
        s = cli.json("job", "sync-now", "roundtrip", "--wait", timeout=300)
        assert s["kind"] == "incremental", s  # from the base the job had before the failover
        newest = target_for(spec).list_points()[0]
        got = check(Path(newest.disks[0].path))
        assert got.ok and got.seq is not None and got.seq >= fs.seq, got
    finally:
        vm.stop()
        if spec is not None:
            vms_for(spec).destroy_vm("roundtrip")
            for p in target_for(spec).list_points():
                for h in p.holds:
                    target_for(spec).release(p.point_id, h)
        cli.run("job", "delete", "roundtrip", "--purge", check=False)


@pytest.mark.slow
def test_a_failback_survives_its_worker_killed_during_a_reverse_copy(e2e_stack: Cli, tmp_path: Path) -> None:
    """SIGKILL of the worker while a reverse sync copies (throttled to 2 MiB/s so that it is caught in
    the act): the failback completes on the new worker, the source ends equal to the VM, and the data
    written is what the VM wrote, give or take a checkpoint window: the retry compares, so the bytes the
    killed attempt wrote after its last checkpoint are found equal and not counted again. The killed
    writer (qemu-nbd, with the worker) leaves the source image's dirty bitmaps flagged in use, i.e.
    inconsistent: the retry compares the disk whole (zero ranges zeroed, data written only where it
    differs), and the job's next forward sync is a resync that says why. Slower, never wrong."""
    import json
    import signal

    from app import stack
    from bench.drill import vm_writes
    from sendense.platforms import target_for, vms_for
    from tests.e2e.conftest import SENDENSE
    from tools.qemu import qemu_img

    cli = e2e_stack
    disk = tmp_path / "guest.qcow2"
    qemu_img("convert", "-O", "qcow2", str(with_mode(tmp_path / "g.qcow2", "boot")), str(disk))
    replicas = tmp_path / "replicas"
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "fbkill",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(replicas)},
                "schedule": {"interval": "1h"},
                "tuning": {"heartbeat_timeout": "5s", "checkpoint_bytes": 1 << 20},
                "recovery": {"memory_mib": 256, "boot_check": {"console_contains": BOOTED, "timeout": "4m"}},
            }
        )
    )
    cli.run("job", "create", "-f", str(tmp_path / "job.yaml"))
    spec = None
    fb = None
    try:
        cli.wait_point("fbkill", timeout=300)
        fo = cli.json("failover", "fbkill", timeout=600)
        assert fo["error"] is None, fo
        spec = asyncio.run(_job_spec("fbkill"))
        wrote = vm_writes("kvm", spec, fo["vm"]["vm_id"], 64 << 10, 256)  # 16 MiB
        cli.run("job", "settings", "fbkill", "--bandwidth", str(2 << 20))
        fb = subprocess.Popen(
            [SENDENSE, "failback", "fbkill", "--json"],
            env=cli.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        tokens = cli.state / "work" / "fbkill" / "tokens"
        deadline = time.monotonic() + 120
        while not list(tokens.glob("reverse-*.json")):  # a reverse copy checkpointed
            assert time.monotonic() < deadline and fb.poll() is None, "no reverse copy was caught"
            time.sleep(0.1)
        stack.restart_worker(cli.state, signal.SIGKILL)
        out, err = fb.communicate(timeout=600)
        assert fb.returncode == 0, err + out
        r = json.loads(out)
        assert r["error"] is None, r
        data = sum(s["bytes_written"] for s in r["reverse_syncs"])
        # below: written by the killed attempt after its checkpoint, then found equal by the retry's compare
        # (CI saw 16 MiB - 312 KiB); above: the guest's own few writes and a window re-copied
        assert wrote - 2 * (1 << 20) <= data <= wrote + 2 * (1 << 20), r["reverse_syncs"]
        assert r["reverse_syncs"][0]["compared_whole"] == ["disk0"], r["reverse_syncs"]
        cli.run("job", "settings", "fbkill", "--bandwidth", "0")
        assert drill_qemus(replicas) == []
        st = cli.wait_point("fbkill", count=2, timeout=300)
        assert st["last_sync"]["kind"] == "resync" and "inconsistent" in st["last_resync_reason"], st
        newest = target_for(spec).list_points()[0]
        same = subprocess.run(["qemu-img", "compare", "-q", str(disk), str(newest.disks[0].path)])
        assert same.returncode == 0
    finally:
        if fb is not None and fb.poll() is None:
            fb.kill()
        if spec is not None:
            vms_for(spec).destroy_vm("fbkill")
            for p in target_for(spec).list_points():
                for h in p.holds:
                    target_for(spec).release(p.point_id, h)
        cli.run("job", "delete", "fbkill", "--purge", check=False)
