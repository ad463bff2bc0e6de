"""Failback from the CloudStack target with real QEMU under the lab's libvirtds (root): a failover's VM
made from a point (CloudStackVms: flat copies imported, deployed, ROOT swapped) runs on a lab host;
the test writes its disk through the VM's own virtio backend (HMP qemu-io, as its guest would: the
point's disk boots nothing, so nothing else writes) and keeps a raw shadow of what the disk holds.
What `CloudStackVmChanges` lists is exactly what was written (64 KiB granularity), what it reads is
the shadow at the snapshot, running (libvirt pull backup from the flat copy's point bitmap, adopted as
a checkpoint) and stopped (at rest); an agent of another host refuses in one line; `forget` leaves
only the point's bitmap."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cs_target_rig import api, guest_disk, job_spec, point
from helpers_cloudstack import agent_on, lab_hosts

from connectors.cloudstack.api import disk_key
from connectors.cloudstack.vm_changes import CloudStackVmChanges
from connectors.cloudstack.vms import CloudStackVms, point_bitmap, tracker
from labs.cloudstack.server import LabServer
from labs.cloudstack.state import LabConfig
from labs.kvm.libvirtd import device_alias, hmp
from sendense import platforms
from sendense.errors import ChangeTrackingLost, NotWhileRunning, SnapshotInconsistent
from sendense.models import SnapshotRef, VmPlan
from sendense.protocols import VmChanges, point_base
from tools.qemu import image_info, qcow2_bitmaps

pytestmark = [pytest.mark.root, pytest.mark.slow]

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB  # the flat copies' bitmap granularity (their cluster size)
SIZE = 16 * MiB
VM = "fo"
KEY = "disk0"


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabServer]:
    cache = getattr(request.config, "cache", None)
    caps = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    caps = caps or Path.home() / ".cache" / "sendense" / "libvirt-qemu-caps"
    root = Path(tempfile.mkdtemp(prefix="csvc-", dir="/tmp"))  # short: libvirt socket paths
    server = LabServer(root, LabConfig(pool_capacity_gib=8, libvirt_cache=str(caps), stop_timeout=2)).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


class Failover:
    """The failed-over VM, its shadow (a raw copy of what its disk holds now) and its changes."""

    def __init__(self, lab: LabServer, tmp: Path, monkeypatch: pytest.MonkeyPatch, disks: int = 1) -> None:
        self.lab, self.tmp, self.mp = lab, tmp, monkeypatch
        srcs = [guest_disk(tmp / "src.qcow2", "16M", writes=((0x11, 0, 3 * MiB), (0x12, 8 * MiB, 2 * MiB)))]
        srcs += [
            guest_disk(tmp / f"src{i}.qcow2", "16M", writes=((0x20 + i, 0, MiB),)) for i in range(1, disks)
        ]
        self.spec = job_spec(lab, srcs)
        point(self.spec, tmp / "work")
        self.vms = CloudStackVms(self.spec.name, self.spec.target, self.spec.job_id)  # type: ignore[arg-type]
        self.vms.poll = 0.05
        self.vms.api.poll_interval = 0.05
        self.changes = CloudStackVmChanges(self.spec.name, self.spec.target, self.spec.job_id, vms=self.vms)  # type: ignore[arg-type]
        self.vms.create_vm(VmPlan(name=VM, point_id="p1", memory_mib=128))
        self.shadows = {f"disk{i}": tmp / f"shadow{i}.raw" for i in range(disks)}
        for src, shadow in zip(srcs, self.shadows.values(), strict=True):
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(shadow)], check=True)
        self.shadow = self.shadows[KEY]

    def vm(self) -> dict[str, object]:
        [vm] = api(self.lab).list("listVirtualMachines", "virtualmachine", id=self.vms._read(VM)["vm_id"])  # type: ignore[index]
        return vm

    def be_agent_of(self, host_id: str) -> None:
        agent_on(self.mp, self.lab, host_id)

    def start(self) -> str:
        """Start the VM and become the agent of its host; the host's id."""
        self.vms.power_on(VM)
        host = str(self.vm()["hostid"])
        self.be_agent_of(host)
        return host

    def flat(self, key: str = KEY) -> Path:
        return self.vms.target.directory() / self.vms._read(VM)["files"][key]  # type: ignore[index]

    def write(self, offset: int, length: int, byte: int, key: str = KEY) -> None:
        """What the guest would write: through the VM's virtio backend, and into the shadow."""
        vm = self.vm()
        conn = self.lab.cloud.hosts[str(vm["hostid"])].libvirtd.connect()
        try:
            dom = conn.lookupByName(str(vm["instancename"]))
            target = disk_key(int(key.removeprefix("disk")))  # (attached in order, by device id)
            qdev = f"/machine/peripheral/{device_alias(dom, target)}/virtio-backend"
            out = hmp(dom, f'qemu-io -d {qdev} "write -P 0x{byte:02x} {offset} {length}"').strip()
            assert not out, out
        finally:
            conn.close()
        with self.shadows[key].open("r+b") as f:
            f.seek(offset)
            f.write(bytes([byte]) * length)

    def checkpoints(self) -> list[str]:
        vm = self.vm()
        conn = self.lab.cloud.hosts[str(vm["hostid"])].libvirtd.connect()
        try:
            dom = conn.lookupByName(str(vm["instancename"]))
            return sorted(c.getName() for c in dom.listAllCheckpoints(0))
        finally:
            conn.close()

    def reads_as(self, snap: SnapshotRef, expected: bytes, key: str = KEY) -> None:
        with self.changes.open_disk(snap, key) as disk:
            c = disk.connect()
            try:
                got = b"".join(c.read(o, min(4 * MiB, SIZE - o)) for o in range(0, SIZE, 4 * MiB))
            finally:
                c.close()
        assert got == expected


@contextmanager
def failover(lab: LabServer, tmp: Path, monkeypatch: pytest.MonkeyPatch, disks: int) -> Iterator[Failover]:
    """The agent's keys and a home of its own (short: the pull backup's socket); the VM destroyed after."""
    monkeypatch.setenv("SENDENSE_CLOUDSTACK_API_KEY", lab.info["api_key"])
    monkeypatch.setenv("SENDENSE_CLOUDSTACK_SECRET_KEY", lab.info["secret_key"])
    home = Path(tempfile.mkdtemp(prefix="csvh-", dir="/tmp"))
    monkeypatch.setenv("SENDENSE_HOME", str(home))
    f = Failover(lab, tmp, monkeypatch, disks)
    try:
        yield f
    finally:
        f.vms.destroy_vm(VM)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def fo(lab: LabServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Failover]:
    with failover(lab, tmp_path, monkeypatch, 1) as f:
        yield f


@pytest.fixture
def fo2(lab: LabServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Failover]:
    """A failover's VM of two disks."""
    with failover(lab, tmp_path, monkeypatch, 2) as f:
        yield f


def test_protocol_and_registry() -> None:
    cs = platforms.get("cloudstack")
    assert cs is not None and cs.vm_changes is not None


def test_running_then_stopped_changes_are_exactly_the_writes_and_read_as_written(fo: Failover) -> None:
    host = fo.start()
    pb = point_bitmap(fo.spec.name, "p1")
    assert pb.startswith(f"sendense.{tracker(fo.spec.name)}.")  # the tracker's: libvirt adopts it
    fo.write(1 * MiB, 128 * KiB, 0xA1)  # over the point's data
    fo.write(5000 * KiB, 4 * KiB, 0xA2)  # 4 KiB: its 64 KiB granule
    fo.write(12 * MiB, G, 0xA3)  # where the point reads zero

    t = time.monotonic()
    r1 = fo.changes.snapshot_vm(VM, "r1")
    print(f"\nFIGURE running snapshot from the point (adopted): {time.monotonic() - t:.2f}s")
    d1 = r1.disk(KEY)
    assert d1.base_change_id == point_base("p1") and d1.tracking_lost is None
    at_r1 = fo.shadow.read_bytes()
    fo.write(1 * MiB, G, 0xEE)  # after the snapshot: not what it reads
    first = [(1 * MiB, 128 * KiB), (5000 * KiB // G * G, G), (12 * MiB, G)]
    assert spans(fo.changes.changed_since_point(r1, KEY)) == first
    fo.reads_as(r1, at_r1)
    with fo.changes.open_disk(r1, KEY) as disk:  # the copy engine's view: extents of its base
        assert spans(disk.extents(d1.base_change_id)) == first
    fo.changes.release(r1, committed=True)
    assert fo.checkpoints() == sorted([pb, f"sendense.{tracker(fo.spec.name)}.r1"])

    # another host's agent: refused in one line naming the VM and where it runs
    other = next(h for h in lab_hosts(fo.lab) if h != host)
    fo.be_agent_of(other)
    with pytest.raises(NotWhileRunning) as e:  # (a failback then cuts over at once)
        fo.changes.snapshot_vm(VM, "r2", {KEY: d1.change_id})
    msg = e.value.message
    assert "\n" not in msg and f"VM {VM} of job {fo.spec.name} runs on CloudStack host" in msg, msg
    assert not e.value.retryable and "/" not in msg and fo.lab.info["secret_key"] not in msg
    fo.be_agent_of(host)

    fo.write(9 * MiB, G, 0xB1)
    t = time.monotonic()
    r2 = fo.changes.snapshot_vm(VM, "r2", {KEY: d1.change_id})
    print(f"FIGURE running snapshot from r1: {time.monotonic() - t:.2f}s")
    d2 = r2.disk(KEY)
    assert d2.base_change_id == d1.change_id and d2.tracking_lost is None
    with fo.changes.open_disk(r2, KEY) as disk:  # only what was written since r1
        assert spans(disk.extents(d1.change_id)) == [(1 * MiB, G), (9 * MiB, G)]
    fo.reads_as(r2, fo.shadow.read_bytes())
    # since the point, though taken from r1: a backup from the point just before, with r2's own changes
    since_point = [(1 * MiB, 128 * KiB), (5000 * KiB // G * G, G), (9 * MiB, G), (12 * MiB, G)]
    assert spans(fo.changes.changed_since_point(r2, KEY)) == since_point
    fo.changes.release(r2, committed=True)
    with pytest.raises(ChangeTrackingLost, match="does not know what disk disk0 changed since point p1"):
        list(fo.changes.changed_since_point(r2, KEY))  # released: what it knew went
    assert fo.checkpoints() == sorted([pb, f"sendense.{tracker(fo.spec.name)}.r2"])  # r1 gone, point kept

    # stopped (a failback's cutover): read at rest, the chain goes on from the running VM's r2
    fo.write(14 * MiB, G, 0xC1)
    fo.vms.power_off(VM)
    assert fo.vm()["state"] == "Stopped"
    t = time.monotonic()
    r3 = fo.changes.snapshot_vm(VM, "r3", {KEY: d2.change_id})
    print(f"FIGURE stopped snapshot from r2 (at rest): {time.monotonic() - t:.2f}s")
    d3 = r3.disk(KEY)
    assert d3.base_change_id == d2.change_id and d3.tracking_lost is None, d3.tracking_lost
    with fo.changes.open_disk(r3, KEY) as disk:
        assert spans(disk.extents(d2.change_id)) == [(14 * MiB, G)]
    everything = [(1 * MiB, 128 * KiB), (5000 * KiB // G * G, G), (9 * MiB, G), (12 * MiB, G), (14 * MiB, G)]
    assert spans(fo.changes.changed_since_point(r3, KEY)) == everything
    fo.reads_as(r3, fo.shadow.read_bytes())
    r3p = fo.changes.snapshot_vm(VM, "r3p")  # at rest from the point: the same as running from it
    assert r3p.disk(KEY).base_change_id == point_base("p1")
    assert spans(fo.changes.changed_since_point(r3p, KEY)) == everything
    fo.changes.release(r3p, committed=False)
    fo.changes.release(r3, committed=True)
    names = set(qcow2_bitmaps(image_info(fo.flat())))
    assert names == {pb, f"sendense.{tracker(fo.spec.name)}.r3"}

    # started again (a failback given up goes on running): r3's bitmap came with the file, adopted
    fo.start()
    fo.write(2 * MiB, G, 0xD1)
    r4 = fo.changes.snapshot_vm(VM, "r4", {KEY: r3.disk(KEY).change_id})
    d4 = r4.disk(KEY)
    assert d4.base_change_id == r3.disk(KEY).change_id and d4.tracking_lost is None, d4.tracking_lost
    with fo.changes.open_disk(r4, KEY) as disk:
        assert spans(disk.extents(d4.base_change_id)) == [(2 * MiB, G)]
    fo.reads_as(r4, fo.shadow.read_bytes())
    fo.changes.release(r4, committed=False)

    fo.changes.forget(VM)  # every reverse checkpoint goes; the point's stays (the failover's)
    assert fo.checkpoints() == [pb]
    fo.changes.forget(VM)  # idempotent
    fo.vms.power_off(VM)
    assert set(qcow2_bitmaps(image_info(fo.flat()))) == {pb}
    fo.changes.forget(VM)  # stopped: nothing of failback's left to remove
    fo.vms.destroy_vm(VM)
    fo.changes.forget(VM)  # gone: no error
    fo.changes.release(r4, committed=True)  # gone: no error


def test_a_stopped_vm_never_started_reads_nothing_changed_and_forget_keeps_the_point(fo: Failover) -> None:
    assert isinstance(fo.changes, VmChanges)
    r = fo.changes.snapshot_vm(VM, "s1")
    assert r.disk(KEY).base_change_id == point_base("p1")
    assert list(fo.changes.changed_since_point(r, KEY)) == []
    fo.reads_as(r, fo.shadow.read_bytes())
    fo.changes.release(r, committed=True)
    fo.changes.forget(VM)
    assert set(qcow2_bitmaps(image_info(fo.flat()))) == {point_bitmap(fo.spec.name, "p1")}


def spans(extents: object) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in extents]  # type: ignore[attr-defined]


def test_a_lost_base_falls_back_to_the_point_and_each_disk_has_its_own_changes(fo2: Failover) -> None:
    fo = fo2
    fo.start()
    fo.write(1 * MiB, G, 0xA1)
    fo.write(3 * MiB, G, 0xB1, key="disk1")
    r1 = fo.changes.snapshot_vm(VM, "r1")
    assert spans(fo.changes.changed_since_point(r1, "disk0")) == [(1 * MiB, G)]
    assert spans(fo.changes.changed_since_point(r1, "disk1")) == [(3 * MiB, G)]
    for key, shadow in fo.shadows.items():
        fo.reads_as(r1, shadow.read_bytes(), key)
    fo.changes.release(r1, committed=True)
    fo.changes.forget(VM)  # r1's checkpoint and bitmaps go: a base that cannot be used any more
    fo.write(4 * MiB, G, 0xB2, key="disk1")
    r2 = fo.changes.snapshot_vm(VM, "r2", {k: d.change_id for k in ("disk0", "disk1") if (d := r1.disk(k))})
    for key in ("disk0", "disk1"):  # from the point, never a full read
        assert r2.disk(key).base_change_id == point_base("p1") and r2.disk(key).tracking_lost is None
    assert spans(fo.changes.changed_since_point(r2, "disk1")) == [(3 * MiB, G), (4 * MiB, G)]
    assert spans(fo.changes.changed_since_point(r2, "disk0")) == [(1 * MiB, G)]
    fo.reads_as(r2, fo.shadows["disk1"].read_bytes(), "disk1")
    fo.changes.release(r2, committed=False)
    assert fo.checkpoints() == [point_bitmap(fo.spec.name, "p1")]


def test_a_vm_live_migrated_between_reverse_syncs_goes_on_from_the_bitmaps_it_brought(fo2: Failover) -> None:
    fo = fo2
    host = fo.start()
    fo.write(1 * MiB, G, 0xA1, key="disk1")
    r1 = fo.changes.snapshot_vm(VM, "r1")
    assert spans(fo.changes.changed_since_point(r1, "disk1")) == [(1 * MiB, G)]
    fo.changes.release(r1, committed=True)
    fo.write(2 * MiB, G, 0xA2, key="disk1")  # before the migration, on the old host
    other = next(h for h in lab_hosts(fo.lab) if h != host)
    api(fo.lab).job("migrateVirtualMachine", virtualmachineid=fo.vm()["id"], hostid=other)
    assert fo.vm()["hostid"] == other
    fo.be_agent_of(other)
    fo.write(6 * MiB, G, 0xA3, key="disk1")  # after it, on the new host
    base = {k: r1.disk(k).change_id for k in ("disk0", "disk1")}
    r2 = fo.changes.snapshot_vm(VM, "r2", base)
    for key in ("disk0", "disk1"):  # incremental from r1, whose bitmap came with the files
        assert r2.disk(key).base_change_id == base[key] and r2.disk(key).tracking_lost is None
    with fo.changes.open_disk(r2, "disk1") as disk:
        assert spans(disk.extents(base["disk1"])) == [(2 * MiB, G), (6 * MiB, G)]
    with fo.changes.open_disk(r2, "disk0") as disk:
        assert spans(disk.extents(base["disk0"])) == []
    fo.reads_as(r2, fo.shadows["disk1"].read_bytes(), "disk1")
    assert spans(fo.changes.changed_since_point(r2, "disk1")) == [(1 * MiB, G), (2 * MiB, G), (6 * MiB, G)]
    assert spans(fo.changes.changed_since_point(r2, "disk0")) == []
    fo.changes.release(r2, committed=True)
    pb = point_bitmap(fo.spec.name, "p1")
    assert fo.checkpoints() == sorted([pb, f"sendense.{tracker(fo.spec.name)}.r2"])  # the point came too
    fo.changes.release(r2, committed=True)  # released already: no error


def qemu_of(flat: Path) -> int:
    """The pid of the QEMU whose disk is `flat` (a uuid-named file: this test's VM, no other)."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu" in cmd.split(b"\0")[0] and str(flat).encode() in cmd:
                return int(p.name)
    raise AssertionError(f"no QEMU runs {flat}")


def test_a_vm_whose_qemu_was_killed_lost_its_point_bitmap_and_is_read_whole_saying_why(fo: Failover) -> None:
    fo.start()
    fo.write(1 * MiB, G, 0xA1)
    os.kill(qemu_of(fo.flat()), signal.SIGKILL)  # a host crash: QEMU never stores its bitmaps
    deadline = time.monotonic() + 30
    while fo.vm()["state"] != "Stopped":  # (CloudStack's power state sync)
        assert time.monotonic() < deadline, fo.vm()["state"]
        time.sleep(0.2)
    r = fo.changes.snapshot_vm(VM, "r1")
    d = r.disk(KEY)
    assert d.base_change_id is None and d.tracking_lost and "\n" not in d.tracking_lost
    assert "not stored cleanly" in d.tracking_lost, d.tracking_lost
    with fo.changes.open_disk(r, KEY) as disk:  # everything, for the sink to compare
        assert sum(e.length for e in disk.extents(None)) >= 3 * MiB
    fo.reads_as(r, fo.shadow.read_bytes())
    fo.changes.release(r, committed=False)


def test_a_retried_snapshot_starts_afresh_and_one_whose_vm_stopped_is_inconsistent(fo: Failover) -> None:
    fo.start()
    fo.write(1 * MiB, G, 0xA1)
    fo.changes.snapshot_vm(VM, "r1")
    fo.write(2 * MiB, G, 0xA2)
    r1 = fo.changes.snapshot_vm(VM, "r1")  # retried: the first attempt's backup job and checkpoint go
    assert fo.checkpoints() == sorted(
        [point_bitmap(fo.spec.name, "p1"), f"sendense.{tracker(fo.spec.name)}.r1"]
    )
    assert spans(fo.changes.changed_since_point(r1, KEY)) == [(1 * MiB, G), (2 * MiB, G)]
    fo.reads_as(r1, fo.shadow.read_bytes())
    fo.vms.power_off(VM)
    with pytest.raises(SnapshotInconsistent) as e:  # its pull backup ended with its QEMU
        with fo.changes.open_disk(r1, KEY):
            pass
    assert (
        e.value.message
        == f"VM {VM} of job {fo.spec.name} is Stopped now, not as at its reverse snapshot: take another"
    )
    fo.changes.release(r1, committed=True)  # nothing to release: no error
    r2 = fo.changes.snapshot_vm(VM, "r2", {KEY: r1.disk(KEY).change_id})  # QEMU stored r1's bitmap
    assert r2.disk(KEY).base_change_id == r1.disk(KEY).change_id and r2.disk(KEY).tracking_lost is None
    with fo.changes.open_disk(r2, KEY) as disk:
        assert spans(disk.extents(r1.disk(KEY).change_id)) == []
    fo.changes.release(r2, committed=False)
