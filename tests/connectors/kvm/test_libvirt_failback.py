"""Failback into a libvirt domain's disks (KvmFailbackSink on the `source.libvirt` form), against a
real private libvirtd and real QEMU (TCG), as test_libvirt_source.py runs the libvirt source.

The source is a libvirt domain with one qcow2 disk, replicated by the libvirt source into two points on
the KVM target (p1 full, p2 incremental: checkpoint sendense.<job>.p2 is the job's base). The domain
writes on after p2 (an unplanned failover) and is shut off; the failed-over VM is made from p2 by the
KVM provisioner (bare QEMU) and written through its own block backend (HMP qemu-io), as the guest
would. The reverse syncs copy the VM's changes plus where the domain diverged into the domain's image
in place; then the domain runs again and the job's next forward sync, from the p2 checkpoint, is an
incremental listing exactly the clusters failback wrote.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest
from helpers_kvm import CLUSTER, KiB, MiB, fast_tuning, make_qcow2, run, same_content, sync_point
from helpers_vms import JOB, plan

from connectors.kvm.failback_sink import KvmFailbackSink
from connectors.kvm.libvirt_source import LibvirtSource
from connectors.kvm.spec import KvmSource, LibvirtDomain
from connectors.kvm.target import KvmTarget
from connectors.kvm.vm_changes import KvmVmChanges
from connectors.kvm.vms import KvmVms
from labs.kvm.libvirtd import LabLibvirtd, define_lab_domain, guest_write, remove_lab_domain, start_libvirtd
from sendense.datapath.extents import Extent, coalesce
from sendense.datapath.reverse import WithDiverged
from sendense.datapath.sync import copy_disk
from sendense.errors import ChangeTrackingLost, InvalidSpec, NotWhileRunning, TargetError
from sendense.models import DiskCopyResult, SnapshotRef
from sendense.protocols import point_base
from tools.qmp import QmpClient

# slow tier (CI runs it); the lab libvirtd runs as root; a missing libvirtd fails, never skips
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.usefixtures("no_vm_leaks")]

log = logging.getLogger(__name__)

SIZE = 64 * MiB
VM = "fo"
KEY = "vda"  # the libvirt source's disk key (the domain's disk target), also the point's
DEVICE = "/machine/peripheral/dev0/virtio-backend"  # vm_qemu: the VM's first disk is device dev0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LabLibvirtd]:
    cache = getattr(request.config, "cache", None)
    cache_dir = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    lab = start_libvirtd(tmp_path_factory.mktemp("lvfb"), cache_dir=cache_dir)
    log.warning("lab libvirtd ready, first call took %.1f s", lab.first_call_seconds or 0)
    with lab:
        yield lab


@dataclass
class Site:
    image: Path  # the domain's disk
    dom: libvirt.virDomain
    src: LibvirtSource
    tgt: KvmTarget
    vms: KvmVms
    changes: KvmVmChanges
    sink: KvmFailbackSink
    p1_base: str
    p2_base: str  # the job's change id at the failover point: checkpoint sendense.<job>.p2@identity
    guest: list[str] = field(default_factory=list)

    def overlay(self) -> Path:
        return self.vms.files(VM).state / f"{KEY}.qcow2"

    def vm_write(self, *cmds: str) -> None:
        """Write the running VM's disk through its own block backend (as its guest would)."""
        with QmpClient(self.vms.files(VM).qmp).connect() as c:
            for cmd in cmds:
                out = c.execute("human-monitor-command", **{"command-line": f'qemu-io -d {DEVICE} "{cmd}"'})
                assert not out.strip(), out


@pytest.fixture
def site(lab: LabLibvirtd, tmp_path: Path) -> Iterator[Site]:
    conn = lab.connect()
    image = make_qcow2(tmp_path / "vda.qcow2", SIZE)
    dom = define_lab_domain(conn, f"t-{uuid.uuid4().hex[:10]}", [image])
    rundir = Path(tempfile.mkdtemp(prefix="sdlf-"))  # short: unix socket paths
    vms = KvmVms(JOB, tmp_path / "replicas", "j1", runtime_dir=rundir)
    try:
        work = tmp_path / "work"
        work.mkdir()
        src = LibvirtSource(JOB, lab.uri, dom.name(), work, uuid=dom.UUIDString())
        tgt = KvmTarget(JOB, tmp_path / "replicas", job_id="j1")
        guest_write(dom, KEY, 0, 8 * MiB, 0x11)
        guest_write(dom, KEY, 20 * MiB, 4 * MiB, 0x12)
        p1 = sync_point(src, tgt, "p1", tuning=fast_tuning())
        guest_write(dom, KEY, 6 * MiB, 4 * MiB, 0x13)
        p2 = sync_point(src, tgt, "p2", p1.base, tuning=fast_tuning())
        assert p2.results[KEY].kind == "incremental"
        domain = LibvirtDomain(uri=lab.uri, domain=dom.name(), uuid=dom.UUIDString())
        spec = KvmSource(platform="kvm", libvirt=domain)
        yield Site(
            image, dom, src, tgt, vms, KvmVmChanges(JOB, tmp_path / "replicas", "j1", vms=vms),
            KvmFailbackSink(JOB, spec, work), p1.snap.disk(KEY).change_id, p2.snap.disk(KEY).change_id,
        )  # fmt: skip
    finally:
        vms.destroy_vm(VM)
        shutil.rmtree(rundir, ignore_errors=True)
        remove_lab_domain(dom)
        conn.close()


def reverse_sync(
    s: Site, snap: SnapshotRef, changes: KvmVmChanges | None = None
) -> tuple[DiskCopyResult, list[Extent]]:
    """One reverse sync as the workflow runs it: diverged first (before the sink's disk is open for
    writing, which marks the image's bitmaps in use), then the copy."""
    diverged = list(s.sink.diverged(KEY, s.p2_base))
    with (changes or s.changes).open_disk(snap, KEY) as vm_disk, s.sink.open_disk(KEY) as original:
        res = copy_disk(WithDiverged(vm_disk, diverged), original, snap.disk(KEY), fast_tuning())
    return res, diverged


def written(r: DiskCopyResult) -> int:
    return r.stats.bytes_written + r.stats.bytes_zeroed


def one_line(e: pytest.ExceptionInfo[Exception]) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_failback_into_a_shut_off_domain_and_the_next_sync_is_incremental_from_the_old_base(
    site: Site,
) -> None:
    s = site
    # unplanned failover: the domain wrote on after p2 (its checkpoint's bitmap recorded it), then
    # stopped cleanly (libvirt's destroy: SIGTERM, QEMU stores the persistent bitmaps)
    guest_write(s.dom, KEY, 50 * MiB, 64 * KiB, 0x55)
    guest_write(s.dom, KEY, 7 * MiB, 64 * KiB, 0x56)
    s.dom.destroy()
    inode = s.image.stat().st_ino
    assert [(d.key, d.size, d.ref) for d in s.sink.disks()] == [(KEY, SIZE, str(s.image))]

    s.vms.create_vm(plan(VM, "p2", memory_mib=128))
    s.vms.power_on(VM)
    s.vm_write(
        "write -P 0xa1 1M 128k",  # over the point's data
        "write -z 2M 64k",  # zeroed where the point has data
        "write -P 0xa2 5000k 4k",  # a 4 KiB write: its 64 KiB cluster
        "write -P 0xa3 40M 64k",  # where the point reads zero
    )
    r1 = s.changes.snapshot_vm(VM, "r1")
    assert r1.disk(KEY).base_change_id == point_base("p2")
    res, diverged = reverse_sync(s, r1)
    assert diverged == [Extent(7 * MiB, CLUSTER), Extent(50 * MiB, CLUSTER)]
    guest_bytes = 128 * KiB + CLUSTER + 4 * KiB + CLUSTER  # what the VM wrote, all of it differing
    # the VM's writes, and the two diverged clusters put back to the VM's (the point's) content
    assert res.kind == "incremental" and written(res) == guest_bytes + 2 * CLUSTER
    print(f"\nlibvirt failback r1: VM wrote {guest_bytes} B, diverged {2 * CLUSTER} B; read "
          f"{res.stats.bytes_read} B, written {written(res)} B")  # fmt: skip
    s.changes.release(r1, committed=True)

    # cutover: the VM stops, its last writes go in the final reverse sync (read from its overlay)
    s.vm_write("write -P 0xc1 60M 128k")
    s.vms.power_off(VM)
    r2 = s.changes.snapshot_vm(VM, "r2", {KEY: r1.disk(KEY).change_id})
    res, diverged = reverse_sync(s, r2)
    # diverged now also lists what r1 wrote (the p2 bitmap recorded the reverse writes); compare mode
    # writes only what the VM wrote since r1
    assert diverged == [
        Extent(1 * MiB, 128 * KiB),
        Extent(2 * MiB, CLUSTER, zero=True),
        Extent(5000 * KiB // CLUSTER * CLUSTER, CLUSTER),
        Extent(7 * MiB, CLUSTER),
        Extent(40 * MiB, CLUSTER),
        Extent(50 * MiB, CLUSTER, zero=True),
    ]
    assert written(res) == 128 * KiB
    s.changes.release(r2, committed=True)
    run("qemu-img", "compare", s.image, s.overlay())  # the domain's disk is the failed-over VM's
    assert s.image.stat().st_ino == inode  # written in place: the libvirt source's identity holds

    # a change id the domain no longer tracks (p1's checkpoint went when p2 committed): a resync
    with pytest.raises(ChangeTrackingLost, match="checkpoint sendense.vmjob.p1 of domain .* is missing"):
        list(s.sink.diverged(KEY, s.p1_base))

    # the domain runs again; the job's next sync, from the failover point's checkpoint, is an
    # incremental of exactly the clusters failback wrote, and makes a point equal to the domain's disk
    s.dom.create()
    seen: list[Extent] = []

    def look(snap: SnapshotRef) -> None:
        d = snap.disk(KEY)
        assert d.base_change_id == s.p2_base and d.tracking_lost is None
        with s.src.open_disk(snap, KEY) as sd:
            seen.extend(coalesce(sd.extents(s.p2_base)))

    p3 = sync_point(s.src, s.tgt, "p3", {KEY: s.p2_base}, tuning=fast_tuning(), before_copy=look)
    assert seen == [
        Extent(1 * MiB, 128 * KiB),
        Extent(2 * MiB, CLUSTER, zero=True),
        Extent(5000 * KiB // CLUSTER * CLUSTER, CLUSTER),
        Extent(7 * MiB, CLUSTER),
        Extent(40 * MiB, CLUSTER),
        Extent(50 * MiB, CLUSTER, zero=True),
        Extent(60 * MiB, 128 * KiB),
    ]
    assert p3.results[KEY].kind == "incremental"
    assert [c.getName() for c in s.dom.listAllCheckpoints(0)] == [f"sendense.{JOB}.p3"]
    print(f"forward p3 from the p2 checkpoint: read {p3.results[KEY].stats.bytes_read} B")
    assert same_content(s.tgt.point_path("p3", KEY), s.image)
    assert same_content(s.tgt.point_path("p3", KEY), s.overlay())

    # a running domain's disks are never written, nor its bitmaps read
    with pytest.raises(TargetError) as e:
        with s.sink.open_disk(KEY):
            pass
    assert (
        one_line(e) == f"source VM of job {JOB} is running: power it off before a failback writes its disks"
    )
    with pytest.raises(TargetError, match="is running: power it off"):
        list(s.sink.diverged(KEY, p3.snap.disk(KEY).change_id))


def test_what_a_libvirt_sink_refuses(site: Site, lab: LabLibvirtd) -> None:
    s = site
    s.dom.destroy()
    with pytest.raises(InvalidSpec) as e:
        s.sink.rebase("fb1")
    assert "libvirt makes checkpoints only in a running domain's backup job" in one_line(e)
    remote = KvmSource(
        platform="kvm", libvirt=LibvirtDomain(uri="qemu+ssh://kvm1.example/system", domain="x")
    )
    with pytest.raises(InvalidSpec) as e:
        KvmFailbackSink(JOB, remote, s.image.parent).disks()
    assert "on host kvm1.example" in one_line(e)
    # the image swapped behind the domain's disk (same path, another file): not the job's base
    copy = s.image.with_suffix(".copy")
    shutil.copyfile(s.image, copy)
    copy.rename(s.image)
    with pytest.raises(ChangeTrackingLost, match=r"is not the file it was at checkpoint .*\(replaced\)"):
        list(s.sink.diverged(KEY, s.p2_base))


def test_a_failed_over_vm_run_by_libvirt_is_read_stopped_into_the_domain(
    site: Site, lab: LabLibvirtd
) -> None:
    """libvirt on both sides: the failed-over VM is a libvirt domain (`KvmTarget.libvirt`), whose changes
    are read only while it is stopped (NotWhileRunning while it runs: the failback cuts over at once)."""
    s = site
    s.dom.destroy()
    vms = KvmVms(JOB, s.tgt.root, "j1", runtime_dir=s.vms.runtime_base, libvirt_uri=lab.uri, stop_timeout=2)
    changes = KvmVmChanges(JOB, s.tgt.root, "j1", vms=vms)
    conn = lab.connect()
    try:
        vms.create_vm(plan(VM, "p2", memory_mib=128))
        vms.power_on(VM)
        vm = conn.lookupByName(f"sendense-{JOB}-{VM}")
        target = ET.fromstring(vm.XMLDesc(0)).find("./devices/disk/target")
        assert target is not None
        dev = str(target.get("dev"))
        guest_write(vm, dev, 1 * MiB, 128 * KiB, 0xA1)
        guest_write(vm, dev, 40 * MiB, 64 * KiB, 0xA3)
        with pytest.raises(NotWhileRunning) as e:
            changes.snapshot_vm(VM, "r1")
        assert "runs under libvirt" in one_line(e)

        vms.power_off(VM)  # libvirt's destroy: QEMU stores the overlay's bitmaps
        r1 = changes.snapshot_vm(VM, "r1")
        assert r1.disk(KEY).base_change_id == point_base("p2")
        res, diverged = reverse_sync(s, r1, changes)
        assert diverged == []
        assert res.kind == "incremental" and written(res) == 128 * KiB + 64 * KiB
        changes.release(r1, committed=True)
        run("qemu-img", "compare", s.image, s.overlay())
    finally:
        vms.destroy_vm(VM)
        conn.close()
