"""VMware -> KVM, KVM -> VMware and VMware -> VMware end to end: the real dev server and worker
process, the vSphere lab started by `sendense lab up` (vcsim-lab, its VDDK stand-in), the agent reaching
it with the lab's login from what `lab up` registered (never from the spec), driven through the CLI.
Full then incremental, bit-exact against the source at the snapshot instant, only changed areas read."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers_kvm import KiB, MiB, make_qcow2, qemu_io, to_raw
from helpers_vsphere import current_disk, disk_image, guest_io

from app import stack
from labs.guest.build import build as build_guest
from labs.guest.build import with_mode
from labs.guest.fscheck import check as fscheck
from labs.vsphere import VsphereLab
from labs.vsphere import hook as vsphere_hook
from tests.e2e.conftest import Cli, free_port
from tests.e2e.test_replication_e2e import export_raw, same

G = 64 * KiB  # the lab's change tracking block
READY = "SENDENSE-GUEST-READY"


@pytest.fixture(scope="module")
def vs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, dict[str, Any], VsphereLab]]:  # noqa: E501
    """A stack of its own, with no vSphere login in its environment: `lab up` registers the lab's for
    its endpoint, and the running worker reaches the lab without a restart."""
    state = Path(tmp_path_factory.mktemp("sdvs"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDENSE_VSPHERE_", "SENDENSE_VDDK_"))}
    env.update(SENDENSE_HOME=str(state), SENDENSE_HOST_ID=f"vs{port}")
    env.pop("SENDENSE_TEMPORAL", None)
    cli = Cli(env=env, state=state)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        stack.up(state, port=port, ui_port=free_port())
        labs = cli.json("lab", "up", "--show-secrets")
        attached = vsphere_hook.attach()
        assert attached is not None
        yield cli, {**labs["vsphere"], "aws": labs["aws"]}, attached
    finally:
        try:
            stack.down(state)
        finally:
            cli.run("lab", "down", check=False)
            os.environ.clear()
            os.environ.update(saved)


def write_job(tmp_path: Path, name: str, source: dict[str, Any], target: dict[str, Any]) -> None:
    spec = {"name": name, "source": source, "target": target, "schedule": {"interval": "1h"}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def test_lab_up_says_what_a_spec_needs_and_hides_the_password(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab],
) -> None:
    cli, lab, _ = vs_stack
    again = cli.json("lab", "up")["vsphere"]
    assert again["endpoint_url"] == lab["endpoint_url"]
    assert again["env"]["SENDENSE_VSPHERE_PASSWORD"] is None and lab["env"]["SENDENSE_VSPHERE_PASSWORD"]
    assert set(again["source"]) == {"platform", "server", "thumbprint", "vm"}
    assert lab["env"]["SENDENSE_VSPHERE_PASSWORD"] not in cli.run("lab", "status").stdout


def test_vmware_to_kvm_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    cli, lab, vlab = vs_stack
    made = cli.json("lab", "vm", "vs-web", "--disk-mib", "256", "--disk-mib", "16")
    moref = made["moref"]
    guest_io(vlab, moref, 1, "write -P 0x21 1M 512k")
    ref0 = [disk_image(vlab, moref, i, tmp_path / f"r0-{i}.raw") for i in (0, 1)]
    write_job(
        tmp_path,
        "e2e-vs-kvm",
        {**lab["source"], "vm": "vs-web"},
        {"platform": "kvm", "path": str(cli.state / "replicas")},
    )
    cli.json("job", "create", "-f", str(tmp_path / "e2e-vs-kvm.yaml"))
    st = cli.wait_point("e2e-vs-kvm", 1, timeout=300)
    assert st["last_sync"]["kind"] == "full"
    p1 = st["last_point"]

    guest_io(vlab, moref, 0, "write -P 0x31 100M 4k", "write -P 0x32 200M 64k")  # two blocks
    guest_io(vlab, moref, 1, "write -P 0x41 10M 10")  # one
    ref1 = [disk_image(vlab, moref, i, tmp_path / f"r1-{i}.raw") for i in (0, 1)]
    r = cli.json("job", "sync-now", "e2e-vs-kvm", "--wait", timeout=300)
    assert r["kind"] == "incremental"
    assert r["bytes_read"] == 3 * G  # only the changed blocks were read
    for point, refs in ((p1, ref0), (r["point_id"], ref1)):
        files = export_raw(cli, "e2e-vs-kvm", point, tmp_path / f"x-{point}")
        assert sorted(files) == ["scsi0-0", "scsi0-1"]
        assert same(files["scsi0-0"], refs[0]) and same(files["scsi0-1"], refs[1])
    history = cli.run("job", "status", "e2e-vs-kvm", "--json").stdout
    assert lab["env"]["SENDENSE_VSPHERE_PASSWORD"] not in history
    cli.json("job", "delete", "e2e-vs-kvm", "--purge")


def test_kvm_to_vmware_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    cli, lab, vlab = vs_stack
    d0 = make_qcow2(tmp_path / "root.qcow2", 48 * MiB)
    d1 = make_qcow2(tmp_path / "data.qcow2", 16 * MiB)
    qemu_io(d0, "write -P 0x11 0 5M", "write -P 0x12 40M 1M")
    qemu_io(d1, "write -P 0x21 3M 512k")
    ref0 = [to_raw(d, tmp_path / f"r0-{i}.raw") for i, d in enumerate((d0, d1))]
    write_job(tmp_path, "e2e-kvm-vs", {"platform": "kvm", "disks": [str(d0), str(d1)]}, lab["target"])
    cli.json("job", "create", "-f", str(tmp_path / "e2e-kvm-vs.yaml"))
    st = cli.wait_point("e2e-kvm-vs", 1, timeout=300)
    assert st["last_sync"]["kind"] == "full"
    p1 = st["last_point"]

    qemu_io(d0, "write -P 0x31 1M 4k", "write -z 40M 1M")
    qemu_io(d1, "write -P 0x41 10M 64k")
    ref1 = [to_raw(d, tmp_path / f"r1-{i}.raw") for i, d in enumerate((d0, d1))]
    r = cli.json("job", "sync-now", "e2e-kvm-vs", "--wait", timeout=300)
    assert r["kind"] == "incremental"
    points = [p["point_id"] for p in cli.json("point", "list", "e2e-kvm-vs")]
    assert points == [r["point_id"], p1]
    for point, refs in ((p1, ref0), (r["point_id"], ref1)):  # read back through the VDDK stand-in
        files = export_raw(cli, "e2e-kvm-vs", point, tmp_path / f"x-{point}")
        assert same(files["disk0"], refs[0]) and same(files["disk1"], refs[1])
    cli.json("job", "delete", "e2e-kvm-vs", "--purge")
    assert vlab.si().RetrieveContent().searchIndex.FindByInventoryPath("DC0/vm/sendense-e2e-kvm-vs") is None


def vmware_source_round(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab],
    tmp_path: Path,
    job: str,
    target: dict[str, Any],
    block: int = G,
) -> None:
    """A lab VM (the guest and a data disk) replicated to `target`: full, then incremental, each point
    exported and compared with the VM's disks at the snapshot instant; then the job is purged."""
    cli, lab, vlab = vs_stack
    vm = f"{job}-vm"
    moref = cli.json("lab", "vm", vm, "--disk-mib", "256", "--disk-mib", "8")["moref"]
    guest_io(vlab, moref, 1, "write -P 0x21 1M 512k")
    ref0 = [disk_image(vlab, moref, i, tmp_path / f"r0-{i}.raw") for i in (0, 1)]
    write_job(tmp_path, job, {**lab["source"], "vm": vm}, target)
    cli.json("job", "create", "-f", str(tmp_path / f"{job}.yaml"))
    p1 = cli.wait_point(job, 1, timeout=300)["last_point"]
    guest_io(vlab, moref, 0, "write -P 0x31 100M 4k")
    guest_io(vlab, moref, 1, "write -P 0x41 2M 64k")
    ref1 = [disk_image(vlab, moref, i, tmp_path / f"r1-{i}.raw") for i in (0, 1)]
    r = cli.json("job", "sync-now", job, "--wait", timeout=300)
    assert r["kind"] == "incremental" and r["bytes_read"] == 2 * block  # (the target's whole blocks)
    for point, refs in ((p1, ref0), (r["point_id"], ref1)):
        files = export_raw(cli, job, point, tmp_path / f"x-{point}")
        assert same(files["scsi0-0"], refs[0]) and same(files["scsi0-1"], refs[1])
    cli.json("job", "delete", job, "--purge")


def test_vmware_to_aws_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    aws = vs_stack[1]["aws"]
    target = {"platform": "aws", "region": aws["region"], "endpoint_url": aws["endpoint_url"]}
    vmware_source_round(vs_stack, tmp_path, "e2e-vs-aws", target, block=512 * KiB)


def test_vmware_to_vmware_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    vmware_source_round(vs_stack, tmp_path, "e2e-vs-vs", vs_stack[1]["target"])


@pytest.mark.slow
def test_vmware_failover_to_kvm_then_failback_sends_only_what_changed(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    """A lab VM running the guest's filesystem workload, replicated to KVM; a failover boots it there
    (the workload writes), `sendense failback` brings what it wrote home into the VMware VM's disks in
    place (reverse syncs through the VDDK stand-in, CBT telling where the source went its own way),
    powers the VMware VM on, and the job replicates again with an incremental. Only what changed
    travels; the VM's filesystem at home is the failed-over VM's as of its power-off."""
    from sendense.platforms import target_for, vms_for
    from tests.e2e.test_failback_e2e import BOOTED, _job_spec

    cli, lab, vlab = vs_stack
    job = "e2e-vs-fb"
    moref = cli.json("lab", "vm", "vs-fb", "--disk-mib", "256")["moref"]
    workload = with_mode(tmp_path / "workload.qcow2", "workload")  # what a VM made from it runs
    path, fmt = current_disk(vlab, moref, 0)
    subprocess.run(["qemu-img", "convert", "-n", "-O", fmt, str(workload), path], check=True)
    replicas = tmp_path / "replicas"
    spec_doc = {
        "name": job,
        "source": {**lab["source"], "vm": "vs-fb"},
        "target": {"platform": "kvm", "path": str(replicas)},
        "schedule": {"interval": "1h"},
        "recovery": {"memory_mib": 256, "boot_check": {"console_contains": BOOTED, "timeout": "4m"}},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_doc))
    cli.json("job", "create", "-f", str(tmp_path / "job.yaml"))
    spec = None
    try:
        cli.wait_point(job, timeout=300)
        fo = cli.json("failover", job, timeout=600)
        assert fo["error"] is None and fo["boot"]["ok"], fo
        spec = asyncio.run(_job_spec(job))
        vms = vms_for(spec)
        deadline = time.monotonic() + 300
        while "SENDENSE-GUEST-SEQ 30" not in vms.console(job):  # the failed-over VM writes
            assert time.monotonic() < deadline, vms.console(job)[-400:]
            time.sleep(1)
        printed = [int(n) for n in re.findall(r"SENDENSE-GUEST-SEQ (\d+)", vms.console(job))]

        r = cli.json("failback", job, timeout=900)
        assert r["error"] is None, r
        print("failback:", r)
        assert r["syncs"] >= 2 and r["reverse_syncs"][-1]["cutover"], r
        assert all(s["compared_whole"] == [] for s in r["reverse_syncs"]), r  # CBT knew where
        read = sum(s["bytes_read"] for s in r["reverse_syncs"])
        assert read == sum(s["planned_bytes"] for s in r["reverse_syncs"])  # only the listed changes
        assert 0 < read < 128 * MiB, read  # of a 256 MiB disk (the workload writes ~30 MiB here)
        assert r["started"], r  # PowerOnVM_Task: the VMware VM runs again
        assert vlab.vm(moref).runtime.powerState == "poweredOn"
        assert not any(p.holds for p in target_for(spec).list_points())

        st = cli.wait_point(job, count=2, timeout=300)  # replicating again, at once
        assert st["last_sync"]["kind"] == "incremental", st["last_sync"]
        vlab.wait(vlab.vm(moref).PowerOffVM_Task())
        path, fmt = current_disk(vlab, moref, 0)
        fs = fscheck(Path(path), fmt)  # the failed-over VM's filesystem came home
        assert fs.ok, fs.detail
        assert fs.seq is not None and fs.seq >= max(printed), (fs.seq, printed[-3:])
    finally:
        if spec is not None:
            vms_for(spec).destroy_vm(job)
            for p in target_for(spec).list_points():
                for h in p.holds:
                    target_for(spec).release(p.point_id, h)
        cli.run("job", "delete", job, "--purge", check=False)


def test_aws_to_vmware_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    """An EC2 instance of the AWS lab (two EBS volumes) replicated into a vSphere placeholder: full then
    incremental (ListChangedBlocks: only the changed 512 KiB blocks read), each point read back
    through the VDDK stand-in equal to the volumes at their snapshot."""
    cli, lab, _ = vs_stack
    aws = lab["aws"]
    block = 512 * KiB  # EBS's block
    inst = cli.json("lab", "instance", "e2e-aws-vs", "--disk-gib", "1", "--disk-gib", "1", "--blank")
    (dev0, vol0), (dev1, vol1) = [(v["device"].rsplit("/", 1)[-1], v["volume_id"]) for v in inst["volumes"]]
    cli.run("lab", "write", vol0, "0", "--pattern", "17", "--length", str(3 * MiB))
    cli.run("lab", "write", vol1, str(100 * MiB + 5), "--pattern", "34", "--length", "1000")
    source = {
        "platform": "aws",
        "instance_id": inst["instance_id"],
        "region": aws["region"],
        "endpoint_url": aws["endpoint_url"],
    }
    write_job(tmp_path, "e2e-aws-vs", source, lab["target"])
    cli.json("job", "create", "-f", str(tmp_path / "e2e-aws-vs.yaml"))
    st = cli.wait_point("e2e-aws-vs", 1, timeout=300)
    assert st["last_sync"]["kind"] == "full" and st["last_sync"]["bytes_read"] == 7 * block
    p1 = st["last_point"]
    cli.run("lab", "write", vol0, str(2 * MiB), "--pattern", "51", "--length", "4096")
    cli.run("lab", "write", vol1, str(500 * MiB), "--pattern", "68", "--length", "4096")
    r = cli.json("job", "sync-now", "e2e-aws-vs", "--wait", timeout=300)
    assert r["kind"] == "incremental" and r["bytes_read"] == 2 * block

    def expect(point: int) -> tuple[bytearray, bytearray]:
        a, b = bytearray(1 << 30), bytearray(1 << 30)
        a[: 3 * MiB] = b"\x11" * (3 * MiB)
        b[100 * MiB + 5 : 100 * MiB + 1005] = b"\x22" * 1000
        if point == 2:
            a[2 * MiB : 2 * MiB + 4096] = b"\x33" * 4096
            b[500 * MiB : 500 * MiB + 4096] = b"\x44" * 4096
        return a, b

    for n, point in ((1, p1), (2, r["point_id"])):
        files = export_raw(cli, "e2e-aws-vs", point, tmp_path / f"x-{point}")
        a, b = expect(n)
        assert files[dev0].read_bytes() == a and files[dev1].read_bytes() == b
    cli.json("job", "delete", "e2e-aws-vs", "--purge")
    assert vlab_has_no("sendense-e2e-aws-vs", vs_stack[2])


def vlab_has_no(vm_name: str, vlab: VsphereLab) -> bool:
    return vlab.si().RetrieveContent().searchIndex.FindByInventoryPath(f"DC0/vm/{vm_name}") is None


def _vm_names(vlab: VsphereLab, prefix: str) -> list[str]:
    from pyVmomi import vim

    content = vlab.si().RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return sorted(v.name for v in view.view if v.name.startswith(prefix))
    finally:
        view.Destroy()


def test_kvm_to_vmware_drill_failover_and_failback_with_the_guest_on_the_vmware_target(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    """The bootable guest replicated from KVM into a vSphere placeholder. A drill boots a linked clone of
    the point's snapshot on an isolated portgroup (serial console read through /folder, VMware Tools
    heartbeat green) and removes it; a failover reverts the placeholder to the point and boots it; the
    point never changes. Failback brings what the VM wrote home (CBT since the point), and the job
    replicates again with an incremental whose point equals the source."""
    from sendense.platforms import target_for, vms_for
    from tests.e2e.test_failback_e2e import _job_spec

    cli, lab, vlab = vs_stack
    job = "e2e-vs-dr"
    disk = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(build_guest()), str(disk)], check=True)
    spec_doc = {
        "name": job,
        "source": {"platform": "kvm", "disks": [str(disk)]},
        "target": lab["target"],
        "schedule": {"interval": "1h"},
        "recovery": {
            "memory_mib": 256,
            "boot_check": {"console_contains": READY, "timeout": "4m", "guest_agent": True},
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_doc))
    cli.json("job", "create", "-f", str(tmp_path / "job.yaml"))
    spec = None
    try:
        st = cli.wait_point(job, timeout=300)
        before = export_raw(cli, job, st["last_point"], tmp_path / "x0")["disk0"].read_bytes()
        r = cli.json("drill", "run", job, timeout=600)
        assert r["error"] is None and r["point_id"] == st["last_point"], r
        assert r["boot"]["ok"] and READY in r["boot"]["evidence"], r["boot"]
        assert "VMware Tools running, heartbeat green" in r["boot"]["evidence"], r["boot"]
        assert r["cleaned"] and r["left_behind"] == [], r
        assert _vm_names(vlab, f"sendense-{job}") == [f"sendense-{job}"]  # the clone went
        [after] = cli.json("point", "list", job)
        assert after["holds"] == []

        fo = cli.json("failover", job, timeout=600)
        assert fo["error"] is None and fo["boot"]["ok"] and READY in fo["boot"]["evidence"], fo
        assert fo["vm"]["mode"] == "production" and fo["rto_seconds"] > 0
        ph = vlab.si().RetrieveContent().searchIndex.FindByInventoryPath(f"DC0/vm/sendense-{job}")
        assert ph is not None and ph.runtime.powerState == "poweredOn"  # the placeholder runs the guest
        assert cli.json("job", "status", job)["state"] == "failed-over"
        again = export_raw(cli, job, st["last_point"], tmp_path / "x1")["disk0"].read_bytes()
        assert again == before  # neither VM changed the point

        # failback: what the VM on the placeholder wrote (the guest's boot) comes home to the qcow2
        fb = cli.json("failback", job, timeout=900)
        print("failback from vSphere:", {k: fb[k] for k in ("syncs", "bytes_read", "bytes_written")})
        assert fb["error"] is None and fb["reverse_syncs"][-1]["cutover"], fb
        assert all(s["compared_whole"] == [] for s in fb["reverse_syncs"]), fb  # CBT since the point
        assert fb["bytes_read"] < 64 * MiB, fb  # what the VM changed, not the whole disk
        assert ph.runtime.powerState == "poweredOff"
        st2 = cli.wait_point(job, count=2, timeout=300)  # replicating again, at once
        assert st2["state"] == "idle" and st2["last_sync"]["kind"] == "incremental", st2
        newest = export_raw(cli, job, st2["last_point"], tmp_path / "x2")["disk0"]
        home = subprocess.run(["qemu-img", "compare", "-q", str(disk), str(newest)])
        assert home.returncode == 0, "the new point differs from the failed-back source"
        snaps = [n.name for n in ph.snapshot.rootSnapshotList[0].childSnapshotList or []]
        assert not any(n.startswith("sendense-failback-") for n in snaps), snaps
        spec = asyncio.run(_job_spec(job))
    finally:
        if spec is None:
            spec = asyncio.run(_job_spec(job))
        vms_for(spec).destroy_vm(job)
        for p in target_for(spec).list_points():
            for h in p.holds:
                target_for(spec).release(p.point_id, h)
        cli.run("job", "delete", job, "--purge", check=False)
    assert _vm_names(vlab, f"sendense-{job}") == []
