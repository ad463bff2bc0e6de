"""QmpSource (a running VM over QMP) replicating into KvmTarget, against a real QEMU lab VM.

The lab VM keeps a shadow of every write; the shadow is copied inside `vm.frozen()` around
create_snapshot, so it is exactly what the guest had written at the snapshot instant.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_kvm import (
    CLUSTER,
    SHRINK_MARKER,
    KiB,
    MiB,
    Synced,
    bitmap_names,
    fast_tuning,
    same_content,
    sync_point,
)

from connectors.kvm.live import QmpSource
from connectors.kvm.live_qemu import nbd_socket
from connectors.kvm.offline import disk_tag
from connectors.kvm.target import KvmTarget
from labs.kvm.vm import LabVm, Workload
from sendense.datapath.extents import coalesce
from sendense.datapath.nbd import NbdConnection, unix_uri
from sendense.datapath.sync import copy_disk
from sendense.errors import (
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    SnapshotInconsistent,
)
from sendense.models import DiskInfo, PointDisk, PointInfo, SnapshotRef
from sendense.protocols import SourceConnector
from tools.qemu import qemu_img, qemu_nbd
from tools.qmp import QmpClient, QmpError, VmNotRunning

JOB = "j1"


def bm(snapshot_id: str, image: Path, key: str = "disk0", job: str = JOB) -> str:
    """The checkpoint of snapshot `snapshot_id` on disk `key` with `image` behind it."""
    return f"sendense.{job}.{snapshot_id}.{disk_tag(key, str(image))}"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must be < 108 bytes: pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="sdl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def without_markers(bitmaps: dict[str, Any]) -> dict[str, Any]:
    """Bitmaps but the shrink markers; every job checkpoint has its two, and no marker is left over."""
    markers = {n for n in bitmaps if n.startswith(SHRINK_MARKER)}
    plain = {n: b for n, b in bitmaps.items() if n not in markers}
    ours = [SHRINK_MARKER + n[len("sendense.") :] for n in plain if n.startswith("sendense.")]
    assert markers == {f"{m}.{kind}" for m in ours for kind in ("span", "tail")}, sorted(bitmaps)
    return plain


class Rig:
    """A lab VM, a QmpSource on its QMP socket, a KvmTarget, and shadows taken at each snapshot."""

    def __init__(
        self, base: Path, sizes: list[int], *, job: str = JOB, vm: LabVm | None = None, **vm_kw: Any
    ) -> None:
        self.base = base
        self.vm = vm or LabVm(base / "vm", sizes, shadow=True, **vm_kw)
        tail = "" if job == JOB else f"-{job}"
        self.work = base / f"work{tail}"
        self.src = QmpSource(job, self.vm.qmp_path, self.work)
        self.tgt = KvmTarget(job, base / f"replicas{tail}")
        self.job = job
        self.shadows: dict[tuple[str, str], Path] = {}

    # a SourceConnector whose create_snapshot also records the shadows at the snapshot instant
    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        with self.vm.frozen():
            snap = self.src.create_snapshot(snapshot_id, base)
            for d in snap.disks:
                dest = self.base / f"{self.job}-{snapshot_id}-{d.key}.raw"
                device = int(re.search(r"\d+$", d.key).group())  # type: ignore[union-attr]
                self.shadows[(snapshot_id, d.key)] = self.vm.snapshot_shadow(device, dest)
        return snap

    def __getattr__(self, name: str) -> Any:  # validate, discover, open_disk, release_snapshot
        return getattr(self.src, name)

    def sync(self, sync_id: str, base: dict[str, str | None] | None = None, **kw: Any) -> Synced:
        return sync_point(self, self.tgt, sync_id, base, **kw)

    def assert_point_exact(self, sync_id: str) -> None:
        keys = [k for (sid, k) in self.shadows if sid == sync_id]
        assert keys
        for key in keys:
            point = self.tgt.point_path(sync_id, key)
            assert same_content(point, self.shadows[(sync_id, key)]), f"point {sync_id} disk {key} differs"

    def bm(self, snapshot_id: str, disk: int = 0) -> str:
        key = f"virtio{disk}" if self.vm.drive else f"disk{disk}"
        return bm(snapshot_id, self.vm.image_of(disk), key, self.job)

    def qmp(self) -> QmpClient:
        return QmpClient(self.vm.qmp_path)

    def bitmaps(self, node: str = "disk0") -> dict[str, dict[str, Any]]:
        """The node's bitmaps but shrink markers, each job checkpoint's two markers checked first."""
        with self.qmp() as c:
            nodes = {n["node-name"]: n for n in c.execute("query-named-block-nodes", flat=True)}
        return without_markers({b["name"]: b for b in nodes[node].get("dirty-bitmaps", []) if b.get("name")})

    def assert_clean(self) -> None:
        """Nothing of a snapshot is left in QEMU or in work_dir."""
        with self.qmp() as c:
            assert c.execute("query-block-exports") == []
            assert c.execute("query-jobs") == []
            nodes = {n["node-name"]: n for n in c.execute("query-named-block-nodes", flat=True)}
            assert not [n for n in nodes if not n.startswith("#" if self.vm.drive else "disk")], nodes
            every = [
                b["name"] for n in nodes.values() for b in n.get("dirty-bitmaps", []) or [] if b.get("name")
            ]
        assert not [b for b in every if not b.startswith(("sendense.", SHRINK_MARKER))], every
        assert not list((self.work / "fleece").glob("*/*")), "fleece files left"
        assert not nbd_socket(self.vm.qmp_path).exists(), "NBD server left running"


@pytest.fixture
def rig_factory(short_dir: Path) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(sizes: list[int], **vm_kw: Any) -> Rig:
        r = Rig(short_dir / f"r{len(rigs)}", sizes, **vm_kw)
        rigs.append(r)
        r.vm.start()
        return r

    yield make
    for r in rigs:  # never leak a QEMU, even when the test failed
        try:
            r.vm.stop(timeout=10)
        finally:
            r.vm.kill()


def extents(
    src: SourceConnector, snap: SnapshotRef, key: str, since: str | None
) -> list[tuple[int, int, bool]]:
    with src.open_disk(snap, key) as disk:
        return [(e.offset, e.length, e.zero) for e in coalesce(disk.extents(since))]


def data_ranges(ext: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    return [(o, n) for o, n, z in ext if not z]


def read_export(snap: SnapshotRef, key: str) -> bytes:
    h = snap.disk(key).handle
    with NbdConnection(unix_uri(h["socket"], h["export"])) as c:
        return b"".join(c.read(off, min(4 * MiB, c.size - off)) for off in range(0, c.size, 4 * MiB))


# ------------------------------------------------------------------------- validate, discover


def test_validate_and_discover(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB, 48 * MiB])
    assert isinstance(rig.src, SourceConnector)
    rig.src.validate()
    vm = rig.src.discover()
    assert vm.name == "labvm" and vm.platform == "kvm"
    assert [(d.key, d.size, d.ref) for d in vm.disks] == [
        ("disk0", 32 * MiB, str(rig.vm.disk_path(0))),
        ("disk1", 48 * MiB, str(rig.vm.disk_path(1))),
    ]


def test_missing_or_dead_socket_is_a_one_line_error_naming_it(short_dir: Path) -> None:
    sock = short_dir / "gone.sock"
    with pytest.raises(ResourceNotFound, match=f"QMP socket {sock}: not found"):
        QmpSource(JOB, sock, short_dir).validate()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))  # a socket file nobody listens on: what a crashed QEMU leaves
    s.close()
    with pytest.raises(VmNotRunning, match=f"QMP socket {sock}: connection refused") as ei:
        QmpSource(JOB, sock, short_dir).discover()
    assert "\n" not in str(ei.value)


def test_qmp_errors_carry_qemus_description(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    with rig.qmp() as c:
        with pytest.raises(QmpError, match="Dirty bitmap 'nope' not found") as ei:
            c.execute("block-dirty-bitmap-remove", node="disk0", name="nope")
        assert ei.value.error_class == "GenericError"
        assert c.execute("query-status")["status"] == "prelaunch"  # still usable after an error


# --------------------------------------------------------------------------------- extents


def test_incremental_extents_are_exact_at_bitmap_granularity(rig_factory: Any) -> None:
    rig = rig_factory([64 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    vm.write(0, 4 * MiB, 0x22, 128 * KiB)
    seen: list[list[tuple[int, int, bool]]] = []
    modes: list[tuple[int, int]] = []

    def before(snap: Any) -> None:
        seen.append(extents(rig.src, snap, "disk0", None))
        sock = nbd_socket(vm.qmp_path)  # QEMU's NBD server serves the disks: nobody else may reach it
        modes.append((sock.parent.stat().st_mode & 0o777, sock.stat().st_mode & 0o777))

    p1 = rig.sync("p1", before_copy=before)
    assert data_ranges(seen[0]) == [(0, 1 * MiB), (4 * MiB, 128 * KiB)]
    assert modes == [(0o700, 0o600)]
    assert p1.results["disk0"].kind == "full" and p1.results["disk0"].stats.bytes_read == 1 * MiB + 128 * KiB

    vm.write(0, 8 * MiB, 0x33, CLUSTER)  # one granule of data
    vm.write_zeroes(0, 4 * MiB, CLUSTER)  # zero write over data
    vm.write(0, 16 * MiB, 0x44, CLUSTER)  # two adjacent writes: one extent
    vm.write(0, 16 * MiB + CLUSTER, 0x55, CLUSTER)
    vm.write(0, 20 * MiB + 4 * KiB, 0x66, 4 * KiB)  # a small write dirties its whole granule
    vm.write_zeroes(0, 24 * MiB, CLUSTER)  # a zero write where nothing was
    vm.write(0, 64 * MiB - CLUSTER, 0x77, CLUSTER)  # the last granule

    snap = rig.create_snapshot("p2", p1.base)
    d = snap.disk("disk0")
    assert (d.base_change_id, d.change_id, d.tracking_lost) == (rig.bm("p1"), rig.bm("p2"), None)
    assert extents(rig.src, snap, "disk0", rig.bm("p1")) == [
        (4 * MiB, CLUSTER, True),
        (8 * MiB, CLUSTER, False),
        (16 * MiB, 2 * CLUSTER, False),
        (20 * MiB, CLUSTER, False),
        (24 * MiB, CLUSTER, True),
        (64 * MiB - CLUSTER, CLUSTER, False),
    ]
    rig.src.release_snapshot(snap, committed=True)
    bitmaps = rig.bitmaps()
    assert set(bitmaps) == {rig.bm("p2")} and bitmaps[rig.bm("p2")]["recording"]
    rig.assert_clean()


def test_writes_after_the_snapshot_do_not_leak_and_the_next_sync_gets_them(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 2 * MiB)
    p1 = rig.sync("p1")
    vm.write(0, 4 * MiB, 0x22, 256 * KiB)

    def write_during_backup(snap: SnapshotRef) -> None:
        # after the snapshot instant: over the changed range, over clean data, into a hole, a zero write
        vm.write(0, 4 * MiB, 0x99, 64 * KiB)
        vm.write(0, 1 * MiB, 0x98, 64 * KiB)
        vm.write(0, 10 * MiB, 0x97, 1 * MiB)
        vm.write_zeroes(0, 0, 64 * KiB)
        assert read_export(snap, "disk0") == rig.shadows[("p2", "disk0")].read_bytes()
        assert extents(rig.src, snap, "disk0", rig.bm("p1")) == [(4 * MiB, 256 * KiB, False)]
        assert data_ranges(extents(rig.src, snap, "disk0", None)) == [(0, 2 * MiB), (4 * MiB, 256 * KiB)]

    p2 = rig.sync("p2", p1.base, before_copy=write_during_backup)
    assert p2.results["disk0"].kind == "incremental"
    assert p2.results["disk0"].stats.bytes_read == 256 * KiB
    rig.assert_point_exact("p2")

    seen: list[list[tuple[int, int, bool]]] = []
    p3 = rig.sync(
        "p3", p2.base, before_copy=lambda snap: seen.append(extents(rig.src, snap, "disk0", rig.bm("p2")))
    )
    assert seen[0] == [
        (0, 64 * KiB, True),
        (1 * MiB, 64 * KiB, False),
        (4 * MiB, 64 * KiB, False),
        (10 * MiB, 1 * MiB, False),
    ]
    assert p3.results["disk0"].kind == "incremental"
    rig.assert_point_exact("p3")
    rig.assert_clean()


# ------------------------------------------------------------------------------- replication


def test_full_and_incrementals_of_two_disks_are_bit_exact_under_load(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB, 48 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 3 * MiB)
    vm.write(1, 40 * MiB, 0x22, 1 * MiB)
    vm.write_zeroes(1, 41 * MiB, 64 * KiB)
    with Workload(vm, rate=200, block_size=64 * KiB, zero_fraction=0.1, seed=1) as load:
        p1 = rig.sync("p1")
        p2 = rig.sync("p2", p1.base)
        p3 = rig.sync("p3", p2.base)
    assert load.bytes_written > 0
    assert [p.results["disk0"].kind for p in (p1, p2, p3)] == ["full", "incremental", "incremental"]
    assert [p.results["disk1"].kind for p in (p1, p2, p3)] == ["full", "incremental", "incremental"]
    for p in ("p1", "p2", "p3"):
        rig.assert_point_exact(p)
    # both disks' checkpoints come from one transaction: same names, one chain per disk
    assert set(rig.bitmaps("disk0")) == {rig.bm("p3")} and set(rig.bitmaps("disk1")) == {rig.bm("p3", 1)}
    rig.assert_clean()


def test_an_aborted_sync_then_a_good_one_loses_no_write(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    p1 = rig.sync("p1")
    vm.write(0, 2 * MiB, 0x22, 64 * KiB)  # before the failed snapshot
    snap = rig.create_snapshot("p2", p1.base)
    vm.write(0, 3 * MiB, 0x33, 64 * KiB)  # while it exists
    assert set(rig.bitmaps()) >= {rig.bm("p1"), rig.bm("p2")}
    rig.tgt.prepare("p2", [DiskInfo(key="disk0", size=32 * MiB)])
    rig.tgt.abort("p2")
    rig.src.release_snapshot(snap, committed=False)
    rig.src.release_snapshot(snap, committed=False)  # idempotent
    bitmaps = rig.bitmaps()
    assert set(bitmaps) == {rig.bm("p1")} and bitmaps[rig.bm("p1")]["recording"]
    rig.assert_clean()
    vm.write(0, 4 * MiB, 0x44, 64 * KiB)  # after it

    seen: list[list[tuple[int, int, bool]]] = []
    p3 = rig.sync(
        "p3", p1.base, before_copy=lambda snap: seen.append(extents(rig.src, snap, "disk0", rig.bm("p1")))
    )
    assert seen[0] == [(2 * MiB, 64 * KiB, False), (3 * MiB, 64 * KiB, False), (4 * MiB, 64 * KiB, False)]
    assert p3.results["disk0"].kind == "incremental"
    rig.assert_point_exact("p3")


def test_lost_bitmap_sets_tracking_lost_and_resyncs_bit_exact(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 2 * MiB)
    p1 = rig.sync("p1")
    with rig.qmp() as c:
        c.execute("block-dirty-bitmap-remove", node="disk0", name=rig.bm("p1"))
    vm.write(0, 1 * MiB, 0x22, 64 * KiB)
    vm.write(0, 8 * MiB, 0x33, 64 * KiB)

    p2 = rig.sync("p2", p1.base)
    d = p2.snap.disk("disk0")
    assert d.tracking_lost == f"dirty bitmap {rig.bm('p1')} is missing from node disk0"
    assert p2.results["disk0"].kind == "resync"
    rig.assert_point_exact("p2")

    vm.write(0, 9 * MiB, 0x44, 64 * KiB)
    p3 = rig.sync("p3", p2.base)
    assert p3.results["disk0"].kind == "incremental"
    assert p3.results["disk0"].stats.bytes_read == 64 * KiB
    rig.assert_point_exact("p3")


def test_restart_keeps_tracking_and_a_crash_loses_it(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    p1 = rig.sync("p1")
    vm.stop()  # a clean shutdown stores the persistent checkpoint in the image
    vm.start()
    assert rig.bitmaps()[rig.bm("p1")]["recording"]
    vm.write(0, 2 * MiB, 0x22, 64 * KiB)
    p2 = rig.sync("p2", p1.base)
    assert p2.results["disk0"].kind == "incremental" and p2.results["disk0"].stats.bytes_read == 64 * KiB
    rig.assert_point_exact("p2")

    vm.stop()
    vm.start()  # p2 is loaded from the image, which marks it in use until the next clean close
    vm.write(0, 3 * MiB, 0x33, 64 * KiB)
    snap = rig.create_snapshot("p3", p2.base)
    vm.flush(0)
    vm.kill()  # crash with a snapshot open
    rig.src.release_snapshot(snap, committed=False)  # VM down: only local files go, no error
    assert not list((rig.work / "fleece").glob("*/*"))
    vm.start()
    with pytest.raises(SnapshotInconsistent, match="is gone"):
        with rig.src.open_disk(snap, "disk0"):
            pass
    rig.src.release_snapshot(snap, committed=False)  # after the restart: no error either
    bitmaps = rig.bitmaps()
    assert (
        bitmaps[rig.bm("p2")].get("inconsistent") and rig.bm("p3") not in bitmaps
    )  # p3 never reached the image

    p4 = rig.sync("p4", p2.base)
    lost = p4.snap.disk("disk0").tracking_lost or ""
    assert lost.startswith(f"dirty bitmap {rig.bm('p2')} in node disk0 is inconsistent"), lost
    assert p4.results["disk0"].kind == "resync"
    rig.assert_point_exact("p4")
    assert set(rig.bitmaps()) == {rig.bm("p4")}
    rig.assert_clean()


def test_a_disk_grown_between_syncs_is_replicated(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    p1 = rig.sync("p1")
    vm.resize(0, 64 * MiB)
    vm.write(0, 512 * KiB, 0x22, 64 * KiB)
    vm.write(0, 60 * MiB, 0x33, 1 * MiB)
    p2 = rig.sync("p2", p1.base)
    d = p2.snap.disk("disk0")
    assert d.size == 64 * MiB and p2.results["disk0"].kind == "incremental"
    rig.assert_point_exact("p2")
    vm.write(0, 40 * MiB, 0x44, 64 * KiB)
    p3 = rig.sync("p3", p2.base)
    rig.assert_point_exact("p3")
    assert p3.results["disk0"].stats.bytes_read == 64 * KiB


def test_a_disk_shrunk_and_grown_back_while_running_is_copied_from_the_shrunk_size(rig_factory: Any) -> None:
    """block_resize truncates the bitmaps on a shrink and extends them clean on a grow: the regrown
    area read zeros but no checkpoint called it changed, and the point kept the old bytes there."""
    rig = rig_factory([8 * MiB, 8 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 8 * MiB)
    vm.write(1, 0, 0x22, 8 * MiB)
    p1 = rig.sync("p1")
    vm.resize(0, 3 * MiB)  # cluster-aligned: QEMU 7.2 keeps old bytes in a partial last cluster it regrows
    vm.resize(0, 8 * MiB)
    vm.write(1, 1 * MiB, 0x33, 64 * KiB)
    p2 = rig.sync("p2", p1.base)
    # disk0 from one granule before the shrunk size on: 64 KiB read (equal, skipped), 5 MiB zeroed
    assert {k: (r.kind, r.stats.bytes_read, r.stats.bytes_zeroed) for k, r in p2.results.items()} == {
        "disk0": ("incremental", 64 * KiB, 5 * MiB),
        "disk1": ("incremental", 64 * KiB, 0),
    }
    assert p2.snap.disk("disk0").tracking_lost is None
    rig.assert_point_exact("p2")
    vm.write(0, 4 * MiB, 0x44, 64 * KiB)
    p3 = rig.sync("p3", p2.base)
    assert {k: (r.kind, r.stats.bytes_written) for k, r in p3.results.items()} == {
        "disk0": ("incremental", 64 * KiB),  # no shrink since p2: its checkpoint alone
        "disk1": ("incremental", 0),
    }
    rig.assert_point_exact("p3")
    rig.assert_clean()


def test_another_worker_reopens_the_export_from_the_snapshot_ref(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB, 32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    vm.write(1, 1 * MiB, 0x22, 1 * MiB)
    p1 = rig.sync("p1")
    vm.write(1, 5 * MiB, 0x33, 64 * KiB)
    snap = rig.create_snapshot("p2", p1.base)
    wire = snap.model_dump_json()
    del snap

    other = QmpSource(JOB, rig.vm.qmp_path, rig.work)  # a fresh process knows only the spec and the ref
    snap2 = SnapshotRef.model_validate_json(wire)
    assert json.loads(wire)["disks"][1]["handle"]["export"].startswith("sde-")
    assert extents(other, snap2, "disk1", rig.bm("p1", 1)) == [(5 * MiB, 64 * KiB, False)]
    assert extents(other, snap2, "disk0", rig.bm("p1")) == []
    rig.tgt.prepare("p2", [DiskInfo(key=d.key, size=d.size) for d in snap2.disks])
    for d in snap2.disks:
        with other.open_disk(snap2, d.key) as sd, rig.tgt.open_disk("p2", d.key) as td:
            assert copy_disk(sd, td, d, fast_tuning()).kind == "incremental"
    other.release_snapshot(snap2, committed=True)
    with pytest.raises(SnapshotInconsistent, match="snapshot p2 of disk disk0 is gone"):
        with other.open_disk(snap2, "disk0"):
            pass
    other.release_snapshot(snap2, committed=True)
    rig.assert_clean()


def test_a_crashed_sync_is_cleaned_up_by_the_next_snapshot(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    p1 = rig.sync("p1")
    vm.write(0, 2 * MiB, 0x22, 64 * KiB)
    abandoned = rig.src.create_snapshot("p2", p1.base)  # the worker dies: never released
    vm.write(0, 3 * MiB, 0x33, 64 * KiB)
    # the retried activity creates the same snapshot again, from a new process
    rig.src = QmpSource(JOB, rig.vm.qmp_path, rig.work)
    p2 = rig.sync("p2", p1.base)
    assert p2.results["disk0"].kind == "incremental"
    rig.assert_point_exact("p2")
    assert set(rig.bitmaps()) == {rig.bm("p2")}
    rig.assert_clean()
    # a late release of the abandoned attempt touches nothing of the current one
    vm.write(0, 5 * MiB, 0x55, 64 * KiB)
    rig.src.release_snapshot(abandoned, committed=False)
    p3 = rig.sync("p3", p2.base)
    assert p3.results["disk0"].kind == "incremental"
    rig.assert_point_exact("p3")


def test_a_late_release_of_an_abandoned_attempt_spares_the_current_export(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    p1 = rig.sync("p1")
    vm.write(0, 2 * MiB, 0x22, 64 * KiB)
    abandoned = rig.src.create_snapshot("p2", p1.base)
    snap = rig.create_snapshot("p2", p1.base)  # the retry
    rig.src.release_snapshot(abandoned, committed=False)  # the first worker wakes up
    assert extents(rig.src, snap, "disk0", rig.bm("p1")) == [(2 * MiB, 64 * KiB, False)]
    assert read_export(snap, "disk0") == rig.shadows[("p2", "disk0")].read_bytes()
    rig.src.release_snapshot(snap, committed=True)
    rig.assert_clean()
    vm.write(0, 3 * MiB, 0x33, 64 * KiB)
    p3 = rig.sync("p3", {"disk0": rig.bm("p2")})  # whatever the late rollback did, nothing is lost
    assert p3.results["disk0"].kind in ("incremental", "resync")  # never a silent full copy
    rig.assert_point_exact("p3")


def test_a_vm_without_disks_is_invalid(short_dir: Path) -> None:
    vm = LabVm(short_dir / "vm", [])
    try:
        vm.start()
        with pytest.raises(InvalidSpec, match="has no writable disk"):
            QmpSource(JOB, vm.qmp_path, short_dir / "work").validate()
    finally:
        vm.kill()


def test_a_new_snapshot_after_an_unreleased_one_still_covers_every_write(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    p1 = rig.sync("p1")
    vm.write(0, 2 * MiB, 0x22, 64 * KiB)
    rig.src.create_snapshot("p2", p1.base)  # crashed sync: p2 stays the recording checkpoint
    vm.write(0, 3 * MiB, 0x33, 64 * KiB)
    seen: list[list[tuple[int, int, bool]]] = []
    p3 = rig.sync(
        "p3", p1.base, before_copy=lambda snap: seen.append(extents(rig.src, snap, "disk0", rig.bm("p1")))
    )
    assert seen[0] == [(2 * MiB, 64 * KiB, False), (3 * MiB, 64 * KiB, False)]
    assert p3.results["disk0"].kind == "incremental"
    rig.assert_point_exact("p3")
    assert set(rig.bitmaps()) == {rig.bm("p3")}
    rig.assert_clean()


def test_disks_open_concurrently_as_parallel_activities_would(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB, 32 * MiB, 32 * MiB])
    for i in range(3):
        rig.vm.write(i, i * MiB, 0x10 + i, 1 * MiB)
    snap = rig.create_snapshot("p1", {})
    rig.tgt.prepare("p1", [DiskInfo(key=d.key, size=d.size) for d in snap.disks])
    errors: list[BaseException] = []

    def copy(key: str) -> None:
        try:
            with QmpSource(JOB, rig.vm.qmp_path, rig.work).open_disk(snap, key) as sd:
                with rig.tgt.open_disk("p1", key) as td:
                    copy_disk(sd, td, snap.disk(key), fast_tuning())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=copy, args=(d.key,)) for d in snap.disks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rig.src.release_snapshot(snap, committed=True)
    for d in snap.disks:
        pending = rig.tgt.dir / "disks" / d.key / "p1.pending.qcow2"  # copied, never committed here
        assert same_content(pending, rig.shadows[("p1", d.key)])
    rig.assert_clean()


# ------------------------------------------------------------------------------------ forget


def all_bitmaps(rig: Rig) -> dict[str, set[str]]:
    """Bitmap names (but shrink markers, checked) on every named node that has any."""
    with rig.qmp() as c:
        nodes = c.execute("query-named-block-nodes", flat=True)
    out = {
        n["node-name"]: set(
            without_markers({b["name"]: b for b in n.get("dirty-bitmaps", []) or [] if b.get("name")})
        )
        for n in nodes
    }
    return {k: v for k, v in out.items() if v}


def test_forget_removes_the_jobs_checkpoints_from_every_node_and_spares_other_jobs(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB, 32 * MiB])
    vm = rig.vm
    other = QmpSource("j1-x", vm.qmp_path, rig.base / "work-x")  # its prefix sendense.j1-x. starts like ours
    other_tgt = KvmTarget("j1-x", rig.base / "replicas-x")
    o1 = sync_point(other, other_tgt, "o1")
    vm.write(0, 0, 0x11, 1 * MiB)
    vm.write(1, 0, 0x12, 1 * MiB)
    p1 = rig.sync("p1")
    vm.write(0, 2 * MiB, 0x21, 64 * KiB)
    p2 = rig.sync("p2", p1.base)
    rig.src.create_snapshot("p3", p2.base)  # a crashed sync: export, backup job, fleece node and file left
    with rig.qmp() as c:
        assert c.execute("query-block-exports") and c.execute("query-jobs")
    theirs = {bm("o1", vm.disk_path(0), job="j1-x")}
    assert all_bitmaps(rig)["disk0"] >= {rig.bm("p2"), rig.bm("p3")} | theirs

    rig.src.forget()
    theirs1 = {bm("o1", vm.disk_path(1), "disk1", job="j1-x")}
    assert all_bitmaps(rig) == {"disk0": theirs, "disk1": theirs1}
    rig.assert_clean()
    assert not (rig.work / "fleece" / JOB).exists()
    rig.src.forget()  # idempotent
    assert all_bitmaps(rig) == {"disk0": theirs, "disk1": theirs1}

    # the other job's change tracking is intact: its next sync is incremental
    vm.write(1, 8 * MiB, 0x31, 64 * KiB)
    o2 = sync_point(other, other_tgt, "o2", o1.base)
    assert {r.kind for r in o2.results.values()} == {"incremental"}
    # every write since o1, including those made while job j1 existed
    assert {k: r.stats.bytes_read for k, r in o2.results.items()} == {
        "disk0": 1 * MiB + 64 * KiB,
        "disk1": 1 * MiB + 64 * KiB,
    }


def test_forget_with_the_vm_stopped_is_no_error(rig_factory: Any) -> None:
    rig = rig_factory([32 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 1 * MiB)
    p1 = rig.sync("p1")
    rig.src.create_snapshot("p2", p1.base)  # left behind by a crashed sync
    assert list((rig.work / "fleece" / JOB).glob("*.qcow2"))
    vm.stop()
    rig.src.forget()  # nothing to do on QEMU's side; the local fleece files go
    assert not (rig.work / "fleece" / JOB).exists()
    rig.src.forget()
    vm.kill()
    sock = rig.base / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))  # a socket file nobody listens on: what a crashed QEMU leaves
    s.close()
    QmpSource(JOB, sock, rig.work).forget()


# ------------------------------------------------------------------------- disks of every kind


def test_a_raw_disk_between_qcow2_disks_is_replicated_and_a_restart_resyncs_it_with_the_reason(
    rig_factory: Any,
) -> None:
    """A VM with qcow2, raw, qcow2 disks used to get points of two disks and no word anywhere."""
    rig = rig_factory([16 * MiB, 16 * MiB, 16 * MiB], formats=["qcow2", "raw", "qcow2"])
    vm = rig.vm
    for i in range(3):
        vm.write(i, i * MiB, 0x11 + i, 1 * MiB)
    assert [d.key for d in rig.src.discover().disks] == ["disk0", "disk1", "disk2"]
    p1 = rig.sync("p1")
    assert {k: r.kind for k, r in p1.results.items()} == {"disk0": "full", "disk1": "full", "disk2": "full"}
    rig.assert_point_exact("p1")

    vm.write(1, 5 * MiB, 0x44, 64 * KiB)
    vm.write(0, 6 * MiB, 0x55, 64 * KiB)
    p2 = rig.sync("p2", p1.base)
    assert {k: (r.kind, r.stats.bytes_written) for k, r in p2.results.items()} == {
        "disk0": ("incremental", 64 * KiB),
        "disk1": ("incremental", 64 * KiB),
        "disk2": ("incremental", 0),
    }
    rig.assert_point_exact("p2")

    vm.stop()  # a raw disk's bitmap lives in QEMU only
    vm.start()
    vm.write(1, 7 * MiB, 0x66, 64 * KiB)
    vm.write(2, 8 * MiB, 0x77, 64 * KiB)
    p3 = rig.sync("p3", p2.base)
    assert p3.snap.disk("disk1").tracking_lost == (
        f"disk disk1 ({vm.image_of(1)}) is raw: QEMU tracks its changes only while the VM runs, and "
        f"checkpoint {rig.bm('p2', 1)} is gone (VM restarted)"
    )
    assert {k: r.kind for k, r in p3.results.items()} == {
        "disk0": "incremental",
        "disk1": "resync",
        "disk2": "incremental",
    }
    assert p3.results["disk1"].stats.bytes_written == 64 * KiB
    rig.assert_point_exact("p3")
    rig.assert_clean()


def test_a_vm_started_with_drive_if_virtio_syncs_and_keeps_its_keys_across_a_restart(
    rig_factory: Any,
) -> None:
    """`-drive file=IMG,if=virtio` gives automatic node names (`#block113`): they went into the NBD
    export name, which libnbd could not parse, and the job never synced."""
    rig = rig_factory([16 * MiB, 8 * MiB], drive=True)
    vm = rig.vm
    with rig.qmp() as c:
        assert all(d["inserted"]["node-name"].startswith("#") for d in c.execute("query-block"))
    vm.write(0, 0, 0x11, 1 * MiB)
    vm.write(1, 2 * MiB, 0x22, 1 * MiB)
    p1 = rig.sync("p1")
    assert sorted(p1.results) == ["virtio0", "virtio1"]
    rig.assert_point_exact("p1")
    vm.write(0, 4 * MiB, 0x33, 64 * KiB)
    p2 = rig.sync("p2", p1.base)
    assert {k: (r.kind, r.stats.bytes_written) for k, r in p2.results.items()} == {
        "virtio0": ("incremental", 64 * KiB),
        "virtio1": ("incremental", 0),
    }
    rig.assert_point_exact("p2")

    vm.stop()  # new automatic node names after the restart; the keys stay
    vm.start()
    vm.write(1, 6 * MiB, 0x44, 64 * KiB)
    p3 = rig.sync("p3", p2.base)
    assert {k: (r.kind, r.stats.bytes_written) for k, r in p3.results.items()} == {
        "virtio0": ("incremental", 0),
        "virtio1": ("incremental", 64 * KiB),
    }
    rig.assert_point_exact("p3")
    rig.assert_clean()


def test_disks_swapped_behind_node_names_after_a_restart_resync_with_the_reason(rig_factory: Any) -> None:
    """Both disks' bitmaps had one name: after a restart with node disk0 on disk1's image, the sync ran
    incremental against the other disk's bitmap and both replicas were wrong."""
    rig = rig_factory([16 * MiB, 16 * MiB])
    vm = rig.vm
    vm.write(0, 0, 0x11, 4 * MiB)
    vm.write(1, 8 * MiB, 0x22, 4 * MiB)
    p1 = rig.sync("p1")
    vm.write(0, 1 * MiB, 0x33, 64 * KiB)
    vm.write(1, 9 * MiB, 0x44, 64 * KiB)
    vm.stop()
    vm.swap(0, 1)
    vm.start()
    p2 = rig.sync("p2", p1.base)
    for i, key in enumerate(("disk0", "disk1")):
        assert p2.snap.disk(key).tracking_lost == (
            f"disk {key} is now image {vm.image_of(i)}, not the image its change tracking belongs to "
            "(image replaced, moved or disks reordered)"
        )
        assert p2.results[key].kind == "resync"
    rig.assert_point_exact("p2")
    vm.write(0, 2 * MiB, 0x55, 64 * KiB)
    p3 = rig.sync("p3", p2.base)
    assert {k: (r.kind, r.stats.bytes_written) for k, r in p3.results.items()} == {
        "disk0": ("incremental", 64 * KiB),
        "disk1": ("incremental", 0),
    }
    rig.assert_point_exact("p3")
    assert set(rig.bitmaps("disk0")) == {rig.bm("p3")} and set(rig.bitmaps("disk1")) == {rig.bm("p3", 1)}


def test_qcow2_v2_and_zero_byte_disks_are_refused_at_validate_naming_them(short_dir: Path) -> None:
    vm = LabVm(short_dir / "vm", [16 * MiB, 16 * MiB, 0])
    vm.dir.mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(vm.disk_path(1)), str(16 * MiB))
    try:
        vm.start()
        src = QmpSource(JOB, vm.qmp_path, short_dir / "work")
        with pytest.raises(InvalidSpec) as ei:
            src.validate()
        assert str(ei.value) == (
            f"source.qmp: the VM behind {vm.qmp_path}: disk disk1 ({vm.disk_path(1)}) is qcow2 v2 "
            f"(compat=0.10), which cannot hold dirty bitmaps: stop the VM and upgrade it: qemu-img amend "
            f"-o compat=1.1 {vm.disk_path(1)}; disk disk2 ({vm.disk_path(2)}) has a size of 0 bytes: detach "
            "it from the VM or give it a size"
        )
        with pytest.raises(InvalidSpec):
            src.create_snapshot("p1", {})
    finally:
        vm.kill()


# ------------------------------------------------------------------------- two jobs on one VM


def test_two_jobs_on_one_running_vm_interleaved_and_overlapping_are_both_bit_exact(rig_factory: Any) -> None:
    """Job j1-1 (its name extends j1's) on the same VM: its snapshot used to fail because QEMU's one NBD
    server had been started under j1's work dir, with advice (nbd-server-stop) that would end j1's sync."""
    a = rig_factory([16 * MiB, 16 * MiB])
    b = Rig(a.base, [], job="j1-1", vm=a.vm)
    vm = a.vm
    vm.write(0, 0, 0x11, 2 * MiB)
    vm.write(1, 4 * MiB, 0x22, 2 * MiB)
    with Workload(vm, rate=40, seed=7):
        # interleaved: both snapshots, copies alternating, a's release while b still reads
        sa, sb = a.create_snapshot("s1", {}), b.create_snapshot("s1", {})
        for r, s in ((a, sa), (b, sb)):
            r.tgt.prepare("s1", [DiskInfo(key=d.key, size=d.size) for d in s.disks])
        results: dict[tuple[str, str], Any] = {}
        for r, s, key in ((a, sa, "disk0"), (b, sb, "disk0"), (a, sa, "disk1")):
            with r.src.open_disk(s, key) as sd, r.tgt.open_disk("s1", key) as td:
                results[(r.job, key)] = copy_disk(sd, td, s.disk(key), fast_tuning())
        commit(a, sa, results)
        a.src.release_snapshot(sa, committed=True)
        with b.src.open_disk(sb, "disk1") as sd, b.tgt.open_disk("s1", "disk1") as td:
            results[("j1-1", "disk1")] = copy_disk(sd, td, sb.disk("disk1"), fast_tuning())
        commit(b, sb, results)
        b.src.release_snapshot(sb, committed=True)

        # overlapping: two whole syncs at once, in two threads
        done: dict[str, Synced] = {}
        errors: list[BaseException] = []

        def run(r: Rig, base: dict[str, str | None]) -> None:
            try:
                done[r.job] = r.sync("s2", base)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [
            threading.Thread(target=run, args=(r, {d.key: d.change_id for d in s.disks}))
            for r, s in ((a, sa), (b, sb))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    for r in (a, b):
        r.assert_point_exact("s1")
        r.assert_point_exact("s2")
        assert {res.kind for res in done[r.job].results.values()} == {"incremental"}
    for i in (0, 1):
        assert set(a.bitmaps(f"disk{i}")) == {a.bm("s2", i), b.bm("s2", i)}
    a.assert_clean()


def test_an_idle_nbd_server_left_in_the_jobs_work_dir_by_an_older_version_is_replaced(
    rig_factory: Any,
) -> None:
    """Before the server was shared it was started under the job's work dir; one left running there
    made every snapshot fail ("already runs an NBD server") until the VM restarted."""
    rig = rig_factory([16 * MiB])
    legacy = rig.work / "nbd" / nbd_socket(rig.vm.qmp_path).name
    legacy.parent.mkdir(parents=True)
    with rig.qmp() as c:
        c.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(legacy)}})
    rig.vm.write(0, 0, 0x11, 1 * MiB)
    rig.sync("p1")
    rig.assert_point_exact("p1")
    assert not legacy.exists()
    rig.assert_clean()


def commit(r: Rig, snap: SnapshotRef, results: dict[tuple[str, str], Any]) -> None:
    kinds = {results[(r.job, d.key)].kind for d in snap.disks}
    r.tgt.commit(
        snap.snapshot_id,
        PointInfo(
            point_id=snap.snapshot_id,
            job=r.job,
            created_at=snap.created_at,
            committed_at=snap.created_at,
            kind="full" if kinds == {"full"} else "incremental",
            disks=[PointDisk(key=d.key, size=d.size, change_id=d.change_id) for d in snap.disks],
        ),
    )


# -------------------------------------------------------------------------- forget, VM stopped


def test_forget_with_the_vm_stopped_removes_the_jobs_bitmaps_from_the_images(rig_factory: Any) -> None:
    """It used to say "deleted" and leave the job's bitmaps in the images (which then block
    `qemu-img snapshot -a`)."""
    rig = rig_factory([16 * MiB, 16 * MiB])
    vm = rig.vm
    other = QmpSource("j1-x", vm.qmp_path, rig.base / "work-x")
    sync_point(other, KvmTarget("j1-x", rig.base / "replicas-x"), "o1")
    vm.write(0, 0, 0x11, 1 * MiB)
    p1 = rig.sync("p1")
    rig.src.create_snapshot("p2", p1.base)  # a crashed sync left its checkpoint too
    vm.stop()  # the persistent bitmaps go into the images
    img0, img1 = vm.disk_path(0), vm.disk_path(1)
    assert bitmap_names(img0) == sorted([rig.bm("p1"), rig.bm("p2"), bm("o1", img0, job="j1-x")])

    with qemu_nbd(img1, readonly=False):  # someone else holds one image
        with pytest.raises(ResourceUnavailable) as ei:
            rig.src.forget()
    assert str(ei.value) == (
        f"QMP socket {vm.qmp_path}: the VM is not running but image {img1} is in use by another process: "
        f"the dirty bitmaps sendense.{JOB}.* of job {JOB} stay in it"
    )
    rig.src.forget()
    assert bitmap_names(img0) == [bm("o1", img0, job="j1-x")]
    assert bitmap_names(img1) == [bm("o1", img1, "disk1", job="j1-x")]
    rig.src.forget()  # idempotent

    # a job that never recorded its images says what stays
    with pytest.raises(SendenseError) as ei:
        QmpSource("j2", vm.qmp_path, rig.base / "work-j2").forget()
    assert str(ei.value) == (
        f"QMP socket {vm.qmp_path}: the VM is not running and job j2 has no record of its images: the "
        "dirty bitmaps sendense.j2.* stay in them (qemu-img bitmap --remove IMG NAME)"
    )
