"""Failback's building blocks on KVM with real QEMU: a failed-over VM's changes since its point
(connectors.kvm.vm_changes) copied by the copy engine into the original source image in place
(connectors.kvm.failback_sink), then the source's change tracking rebased.

The source is a stopped VM's qcow2 image with two points on the KVM target (p1 full, p2 incremental);
the failed-over VM is made from p2 by the KVM provisioner and runs (a bare QEMU; its disk has no OS,
so SeaBIOS idles, and the test writes the disk as the guest would, through QEMU's own block backend
with HMP `qemu-io`).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_kvm import CLUSTER, KiB, MiB, fast_tuning, make_qcow2, qemu_io, run, same_content, sync_point
from helpers_vms import JOB, assert_gone, plan

from connectors.kvm import handles
from connectors.kvm.failback_sink import KvmFailbackSink
from connectors.kvm.offline import OfflineQcow2Source
from connectors.kvm.spec import KvmSource
from connectors.kvm.target import KvmTarget
from connectors.kvm.vm_changes import KvmVmChanges
from connectors.kvm.vms import KvmVms
from sendense import platforms
from sendense.datapath.extents import Extent, coalesce
from sendense.datapath.reverse import WithDiverged
from sendense.datapath.sync import copy_disk
from sendense.errors import TargetError
from sendense.models import DiskCopyResult, SnapshotRef
from sendense.protocols import FailbackSink, VmChanges, point_base
from tools.qemu import qemu_nbd
from tools.qmp import QmpClient

SIZE = 64 * MiB
VM = "fo"
DISK = "disk0"


@dataclass
class Site:
    tmp: Path
    image: Path  # the original source disk
    src: OfflineQcow2Source
    tgt: KvmTarget
    vms: KvmVms
    changes: KvmVmChanges
    sink: KvmFailbackSink
    p2_base: str  # the job's change id at the failover point

    def overlay(self) -> Path:
        return self.vms.files(VM).state / f"{DISK}.qcow2"

    def vm_write(self, *cmds: str) -> None:
        """Write the running VM's disk through its own block backend (as its guest would)."""
        with QmpClient(self.vms.files(VM).qmp).connect() as c:
            for cmd in cmds:
                out = c.execute("human-monitor-command", **{"command-line": f'qemu-io -d {DEVICE} "{cmd}"'})
                assert not out.strip(), out  # (what qemu-io says goes to QEMU's stdout; errors come here)


DEVICE = "/machine/peripheral/dev0/virtio-backend"  # vm_qemu: the first disk is device dev0


@pytest.fixture
def site(tmp_path: Path, no_vm_leaks: None) -> Iterator[Site]:
    image = make_qcow2(tmp_path / "source.qcow2", SIZE)
    qemu_io(image, "write -P 0x11 0 8M", "write -P 0x12 20M 4M")
    src = OfflineQcow2Source(JOB, [image])
    tgt = KvmTarget(JOB, tmp_path / "replicas", job_id="j1")
    p1 = sync_point(src, tgt, "p1")
    qemu_io(image, "write -P 0x13 6M 4M")
    p2 = sync_point(src, tgt, "p2", p1.base)  # p2 is an overlay on p1: the VM's disk is 3 layers deep
    run = Path(tempfile.mkdtemp(prefix="sdfb-"))  # short: unix socket paths
    vms = KvmVms(JOB, tmp_path / "replicas", "j1", runtime_dir=run)
    spec = KvmSource(platform="kvm", disks=[image])
    s = Site(tmp_path, image, src, tgt, vms, KvmVmChanges(JOB, tmp_path / "replicas", "j1", vms=vms),
             KvmFailbackSink(JOB, spec, tmp_path / "work"), p2.snap.disk(DISK).change_id)  # fmt: skip
    vms.create_vm(plan(VM, "p2", memory_mib=128))
    vms.power_on(VM)
    try:
        yield s
        vms.destroy_vm(VM)
        assert_gone(vms, VM)  # the failback tracker's state went with the VM
    finally:
        vms.destroy_vm(VM)
        shutil.rmtree(run, ignore_errors=True)


def reverse_sync(s: Site, snap: SnapshotRef, diverged: list[Extent] | None = None) -> DiskCopyResult:
    d = snap.disk(DISK)
    with s.changes.open_disk(snap, DISK) as vm_disk, s.sink.open_disk(DISK) as original:
        src = WithDiverged(vm_disk, diverged) if diverged else vm_disk
        return copy_disk(src, original, d, fast_tuning())


def written(r: DiskCopyResult) -> int:
    return r.stats.bytes_written + r.stats.bytes_zeroed


def test_protocols() -> None:
    kvm = platforms.get("kvm")
    assert kvm is not None and kvm.vm_changes is not None and kvm.failback_sink is not None
    assert isinstance(KvmVmChanges(JOB, Path("/nonexistent")), VmChanges)
    assert isinstance(
        KvmFailbackSink(JOB, KvmSource(platform="kvm", disks=[Path("/x.qcow2")]), Path()), FailbackSink
    )


def test_changes_since_point_copied_back_in_place(site: Site) -> None:
    s = site
    s.vm_write(
        "write -P 0xa1 1M 128k",  # over the point's data
        "write -z 2M 64k",  # zeroed where the point has data
        "write -P 0xa2 5000k 4k",  # a 4 KiB write: its 64 KiB cluster
        "write -P 0xa3 40M 64k",  # where the point reads zero
    )
    snap = s.changes.snapshot_vm(VM, "r1")
    d = snap.disk(DISK)
    assert d.base_change_id == point_base("p2") and d.tracking_lost is None

    changed = list(s.changes.changed_since_point(snap, DISK))
    assert changed == [
        Extent(1 * MiB, 128 * KiB),
        Extent(2 * MiB, CLUSTER, zero=True),
        Extent(5000 * KiB // CLUSTER * CLUSTER, CLUSTER),
        Extent(40 * MiB, CLUSTER),
    ]
    s.vm_write("write -P 0xee 1M 64k")  # after the snapshot: not in what it copies
    with pytest.raises(TargetError, match="power it off"):  # the original runs? never written
        with qemu_nbd(s.image, readonly=False):  # holds the image for writing, as a running VM does
            with s.sink.open_disk(DISK):
                pass

    r = reverse_sync(s, snap)
    changed_bytes = sum(e.length for e in changed)
    assert r.kind == "incremental"
    guest_bytes = 128 * KiB + CLUSTER + 4 * KiB + CLUSTER  # what the VM wrote, all of it differing
    # compared block by block (4 KiB): the rest of the 4 KiB write's cluster is read, not written
    assert written(r) == guest_bytes and r.stats.bytes_read == changed_bytes - CLUSTER  # (zeroes: no read)
    print(f"\nfailback r1: VM wrote {guest_bytes} B in {changed_bytes} B of clusters; read "
          f"{r.stats.bytes_read} B, written {written(r)} B ({written(r) / guest_bytes:.2f}x)")  # fmt: skip
    run("qemu-img", "compare", "-U", s.image, _export_uri(snap))  # the original reads the VM at the snapshot
    s.changes.release(snap, committed=True)


def _export_uri(snap: SnapshotRef) -> str:
    inner = handles.QmpDisk.parse(handles.VmChangesDisk.parse(snap.disk(DISK).handle).inner)
    return f"nbd+unix:///{inner.export}?socket={inner.socket}"


def test_repeated_reverse_syncs_cutover_and_rebase(site: Site) -> None:
    s = site
    # unplanned failover: the source wrote after its last point; the job's p2 bitmap recorded it
    qemu_io(s.image, "write -P 0x55 50M 64k", "write -P 0x56 7M 64k")
    diverged = list(s.sink.diverged(DISK, s.p2_base))
    assert diverged == [Extent(7 * MiB, CLUSTER), Extent(50 * MiB, CLUSTER)]

    s.vm_write("write -P 0xa1 1M 128k", "write -P 0xa3 40M 64k")
    r1 = s.changes.snapshot_vm(VM, "r1")
    res = reverse_sync(s, r1, diverged)
    # the VM's writes, and the diverged clusters put back to the VM's (the point's) content
    assert written(res) == 128 * KiB + CLUSTER + 2 * CLUSTER
    s.changes.release(r1, committed=True)

    # the VM writes on; the next reverse sync copies only that (its bitmap since r1)
    s.vm_write("write -P 0xb1 30M 64k", "write -P 0xb2 1M 4k")
    r2 = s.changes.snapshot_vm(VM, "r2", {DISK: r1.disk(DISK).change_id})
    assert r2.disk(DISK).base_change_id == r1.disk(DISK).change_id
    with s.changes.open_disk(r2, DISK) as d:
        assert list(coalesce(d.extents(r1.disk(DISK).change_id))) == [
            Extent(1 * MiB, CLUSTER),
            Extent(30 * MiB, CLUSTER),
        ]
    res = reverse_sync(s, r2, list(s.sink.diverged(DISK, s.p2_base)))
    assert written(res) == CLUSTER + 4 * KiB  # the diverged ranges hold the VM's content already
    s.changes.release(r2, committed=True)

    # cutover: the VM stops (QEMU stores its bitmaps), its last writes go in the final reverse sync,
    # read from its overlay at rest
    s.vm_write("write -P 0xc1 60M 128k")
    s.vms.power_off(VM)
    r3 = s.changes.snapshot_vm(VM, "r3", {DISK: r2.disk(DISK).change_id})
    assert handles.VmChangesSnapshot.parse(r3.handle).form == "stopped"
    assert r3.disk(DISK).base_change_id == r2.disk(DISK).change_id
    assert list(s.changes.changed_since_point(r3, DISK)) == [
        Extent(1 * MiB, 128 * KiB),
        Extent(30 * MiB, CLUSTER),
        Extent(40 * MiB, CLUSTER),
        Extent(60 * MiB, 128 * KiB),
    ]
    res = reverse_sync(s, r3, list(s.sink.diverged(DISK, s.p2_base)))
    assert written(res) == 128 * KiB
    s.changes.release(r3, committed=True)
    assert same_content(s.image, s.overlay())  # the original is the failed-over VM's disk

    # rebase: the job's next forward sync is an incremental from there
    base = s.sink.rebase("fb1")
    new = base.disk(DISK).change_id
    assert new.startswith(f"sendense.{JOB}.fb1.")
    qemu_io(s.image, "write -P 0xd1 12M 64k")  # the original VM runs again
    snap = s.src.create_snapshot("p3", {DISK: new})
    assert snap.disk(DISK).base_change_id == new and snap.disk(DISK).tracking_lost is None
    with s.src.open_disk(snap, DISK) as d:
        assert list(coalesce(d.extents(new))) == [Extent(12 * MiB, CLUSTER)]
    s.src.release_snapshot(snap, committed=False)

    # the failover point's base still covers everything since p2: a forward sync from it onto the
    # target (whose newest point is p2) makes a point equal to the original, without a full copy
    fwd = sync_point(s.src, s.tgt, "p3", {DISK: s.p2_base})
    assert fwd.results[DISK].kind == "incremental"
    assert same_content(s.image, s.tgt.point_path("p3", DISK))
    print(f"\nforward after failback from the p2 base: read {fwd.results[DISK].stats.bytes_read} B")


def test_vm_killed_falls_back_to_the_point(site: Site) -> None:
    """A VM killed with its bitmaps in use: the next reverse snapshot's base is the point (what the
    overlay holds), never a full read, and the copy still makes the original equal to the VM."""
    s = site
    s.vm_write("write -P 0xa1 1M 64k")
    r1 = s.changes.snapshot_vm(VM, "r1")
    reverse_sync(s, r1)
    s.changes.release(r1, committed=True)
    s.vm_write("write -P 0xa2 9M 64k")
    pid = int(s.vms.files(VM).pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    r2 = s.changes.snapshot_vm(VM, "r2", {DISK: r1.disk(DISK).change_id})
    assert r2.disk(DISK).base_change_id == point_base("p2") and r2.disk(DISK).tracking_lost is None
    res = reverse_sync(s, r2)
    assert res.kind == "incremental" and written(res) == CLUSTER  # 1M was copied back already
    s.changes.release(r2, committed=True)
    assert same_content(s.image, s.overlay())


def _wait_gone(pid: int) -> None:
    for _ in range(3000):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    raise AssertionError(f"QEMU {pid} did not exit after SIGKILL")
