"""LibvirtSource against a real, private libvirtd and real QEMU (TCG): pull backups with checkpoints.

Every guest write goes through the VM's own virtio-blk backend (HMP qemu-io) and is also applied to a
raw "shadow" file per disk; a copy of the shadow taken at the snapshot instant is the reference each
recovery point must equal, bit for bit (`qemu-img compare`).

One libvirtd per module (it costs ~8 s with a cold QEMU capabilities cache, well under 1 s warm: the
cache is kept in pytest's cache dir). Each test gets its own domain.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest
from helpers_kvm import Synced, sync_point

from connectors.kvm.libvirt_source import LibvirtSource
from connectors.kvm.spec import KvmSource
from connectors.kvm.target import KvmTarget
from labs.kvm.libvirtd import (
    LabLibvirtd,
    define_lab_domain,
    device_alias,
    guest_write,
    guest_write_zeroes,
    remove_lab_domain,
    start_libvirtd,
)
from sendense.datapath.extents import Extent, coalesce
from sendense.datapath.sync import copy_disk
from sendense.errors import (
    DataPathError,
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    SnapshotInconsistent,
)
from sendense.models import SnapshotRef, Tuning
from sendense.protocols import SourceConnector

# slow tier (CI runs it); the lab libvirtd runs as root; a missing libvirtd fails, never skips
pytestmark = [pytest.mark.slow, pytest.mark.root]

log = logging.getLogger(__name__)

KiB, MiB = 1 << 10, 1 << 20
CLUSTER = 64 * KiB  # qcow2 cluster size = dirty bitmap granularity
TUNING = Tuning(chunk_size=1 * MiB, connections=2, checkpoint_bytes=1 * MiB)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LabLibvirtd]:
    cache = getattr(request.config, "cache", None)
    cache_dir = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    lab = start_libvirtd(tmp_path_factory.mktemp("lv"), cache_dir=cache_dir)
    log.warning("lab libvirtd ready, first call took %.1f s", lab.first_call_seconds or 0)
    try:
        yield lab
    finally:
        for t in _CLOSING:
            t.join(60)
        _CLOSING.clear()
        lab.stop()


# Tearing a domain down takes libvirt over a second: tests hand their domains to background threads,
# joined before the module's libvirtd stops.
_CLOSING: list[threading.Thread] = []


class Guest:
    """A running lab domain plus a raw shadow of each disk that receives the same writes."""

    def __init__(self, lab: LabLibvirtd, root: Path, sizes: list[int]) -> None:
        self.root = root
        self.name = f"t-{uuid.uuid4().hex[:10]}"
        self.conn = lab.connect()
        self.images = {}
        self.shadows = {}
        for i, size in enumerate(sizes):
            key = "vd" + chr(ord("a") + i)
            img = root / f"{key}.qcow2"
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    f"cluster_size={CLUSTER}",
                    str(img),
                    str(size),
                ],
                check=True,
            )
            shadow = root / f"{key}.shadow.raw"
            with open(shadow, "wb") as f:
                f.truncate(size)
            self.images[key], self.shadows[key] = img, shadow
        self.dom = define_lab_domain(self.conn, self.name, list(self.images.values()))
        self.refs = 0

    def write(self, key: str, offset: int, length: int, pattern: int) -> None:
        guest_write(self.dom, key, offset, length, pattern)
        with open(self.shadows[key], "r+b") as f:
            f.seek(offset)
            f.write(bytes([pattern]) * length)

    def zero(self, key: str, offset: int, length: int) -> None:
        guest_write_zeroes(self.dom, key, offset, length)
        with open(self.shadows[key], "r+b") as f:
            f.seek(offset)
            f.write(bytes(length))

    def freeze(self) -> dict[str, Path]:
        """Copies of the shadows: what every disk holds right now."""
        self.refs += 1
        out = {}
        for key, shadow in self.shadows.items():
            ref = self.root / f"{key}.ref{self.refs}.raw"
            subprocess.run(["cp", "--sparse=always", str(shadow), str(ref)], check=True)
            out[key] = ref
        return out

    def checkpoints(self) -> list[str]:
        return sorted(c.getName() for c in self.dom.listAllCheckpoints(0))

    def close(self) -> None:
        remove_lab_domain(self.dom)
        self.conn.close()


@pytest.fixture
def make_guest(lab: LabLibvirtd, tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    guests: list[Guest] = []

    def make(*sizes: int) -> Guest:
        root = tmp_path / f"vm{len(guests)}"
        root.mkdir()
        g = Guest(lab, root, list(sizes) or [64 * MiB])
        guests.append(g)
        return g

    yield make
    for g in guests:
        t = threading.Thread(target=g.close, daemon=True, name=f"close-{g.name}")
        t.start()
        _CLOSING.append(t)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def source(lab: LabLibvirtd, g: Guest, work: Path, job: str = "job1") -> LibvirtSource:
    return LibvirtSource(job, lab.uri, g.name, work)


# ------------------------------------------------------------------------------------------ helpers


def sync(
    src: SourceConnector,
    tgt: KvmTarget,
    sync_id: str,
    base: dict[str, str | None] | None = None,
    *,
    before_copy: Callable[[SnapshotRef], Any] | None = None,
) -> Synced:
    """One sync as the workflow runs it: snapshot, copy every disk, commit, release."""
    return sync_point(src, tgt, sync_id, base, tuning=TUNING, before_copy=before_copy)


def same(point: Path, ref: Path) -> bool:
    p = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(point), str(ref)],
        capture_output=True,
        text=True,
    )
    assert p.returncode in (0, 1), p.stderr
    return p.returncode == 0


def assert_point(tgt: KvmTarget, point_id: str, refs: dict[str, Path]) -> None:
    for key, ref in refs.items():
        assert same(tgt.point_path(point_id, key), ref), f"point {point_id} disk {key} differs from the guest"


def hmp_json(dom: libvirt.virDomain, cmd: str, **args: Any) -> Any:
    out = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": cmd, "arguments": args}), 0)
    return json.loads(out)["return"]


def format_node(dom: libvirt.virDomain, key: str) -> str:
    qdev = f"/machine/peripheral/{device_alias(dom, key)}/virtio-backend"
    for b in hmp_json(dom, "query-block"):
        if b.get("qdev") == qdev:
            return str(b["inserted"]["node-name"])
    raise KeyError(key)


def no_leftovers(work: Path) -> None:
    assert not list(work.glob("*.scratch")), list(work.iterdir())


# ------------------------------------------------------------------------------------------ tests


def test_discover_and_errors(lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path) -> None:
    g = make_guest(64 * MiB, 32 * MiB)
    src = source(lab, g, work)
    assert isinstance(src, SourceConnector)
    src.validate()
    info = src.discover()
    assert info.name == g.name and info.platform == "kvm"
    assert [(d.key, d.size, d.ref) for d in info.disks] == [
        ("vda", 64 * MiB, str(g.images["vda"])),
        ("vdb", 32 * MiB, str(g.images["vdb"])),
    ]

    with pytest.raises(ResourceNotFound, match="libvirt domain nope-nope not found"):
        LibvirtSource("job1", lab.uri, "nope-nope", work).validate()

    bad = "qemu:///system?socket=/nonexistent/libvirt-sock"
    with pytest.raises(ResourceUnavailable) as ei:
        LibvirtSource("job1", bad, g.name, work).discover()
    assert bad in str(ei.value) and "\n" not in str(ei.value)

    g.dom.destroy()
    with pytest.raises(ResourceUnavailable, match="is not running"):
        src.validate()


def test_full_then_incremental_bit_exact(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 2 * MiB, 0x11)
    g.write("vda", 30 * MiB, 3 * MiB + 64 * KiB, 0x22)
    g.write("vda", 63 * MiB, 1 * MiB, 0x33)
    ref1 = g.freeze()

    s1 = sync(src, tgt, "p1")
    r = s1.results["vda"]
    assert r.kind == "full"
    assert r.stats.bytes_read == 6 * MiB + 64 * KiB
    assert_point(tgt, "p1", ref1)
    assert s1.snap.disks[0].change_id.startswith("sendense.job1.p1@")
    assert g.checkpoints() == ["sendense.job1.p1"]
    no_leftovers(work)

    g.write("vda", 1 * MiB, 2 * MiB, 0x44)  # overlaps old data and fresh space
    g.write("vda", 40 * MiB, 64 * KiB, 0x55)
    g.zero("vda", 31 * MiB, 1 * MiB)  # data -> zero
    ref2 = g.freeze()

    s2 = sync(src, tgt, "p2", s1.base)
    r = s2.results["vda"]
    assert r.kind == "incremental"
    assert r.stats.bytes_read == 2 * MiB + 64 * KiB
    assert r.stats.bytes_zeroed == 1 * MiB
    assert_point(tgt, "p2", ref2)
    assert_point(tgt, "p1", ref1)  # older point untouched
    assert g.checkpoints() == ["sendense.job1.p2"]  # committed: the older one is gone

    s3 = sync(src, tgt, "p3", s2.base)  # nothing changed
    assert s3.results["vda"].kind == "incremental"
    assert s3.results["vda"].stats.bytes_read == 0
    assert_point(tgt, "p3", ref2)
    no_leftovers(work)


def test_incremental_extents_are_exact(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 20 * MiB, 2 * MiB, 0x01)
    s1 = sync(src, tgt, "p1")

    g.write("vda", 4 * MiB, 1 * MiB, 0x02)
    g.write("vda", 10 * MiB + 4 * KiB, 4 * KiB, 0x03)  # dirties one 64 KiB granule
    g.zero("vda", 20 * MiB, 1 * MiB)
    g.write("vda", 64 * MiB - 64 * KiB, 64 * KiB, 0x04)  # the very end
    snap = src.create_snapshot("p2", s1.base)
    try:
        d = snap.disk("vda")
        assert d.base_change_id == s1.base["vda"] and d.tracking_lost is None
        assert d.handle["bitmap"] == "backup-vda" and d.handle["export"] == "vda"
        sock = Path(d.handle["socket"])  # the backup's NBD server serves the disk: nobody else may reach it
        assert (sock.parent.stat().st_mode & 0o777, sock.stat().st_mode & 0o777) == (0o700, 0o600)
        with src.open_disk(snap, "vda") as sd:
            got = list(coalesce(sd.extents(d.base_change_id)))
            everything = list(coalesce(sd.extents(None)))
    finally:
        src.release_snapshot(snap, committed=False)
    assert got == [
        Extent(4 * MiB, 1 * MiB),
        Extent(10 * MiB, 64 * KiB),
        Extent(20 * MiB, 1 * MiB, zero=True),
        Extent(64 * MiB - 64 * KiB, 64 * KiB),
    ]
    assert sum(e.length for e in everything) == 64 * MiB
    assert g.checkpoints() == ["sendense.job1.p1"]  # not committed: the new checkpoint is gone


def test_writes_during_backup_do_not_leak(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB, 32 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 4 * MiB, 0x10)
    g.write("vdb", 8 * MiB, 1 * MiB, 0x20)
    refs: list[dict[str, Path]] = []

    def meanwhile(snap: SnapshotRef) -> None:
        refs.append(g.freeze())  # the guest's state at the snapshot instant
        g.write("vda", 1 * MiB, 2 * MiB, 0xE1)  # over data the backup must still read as 0x10
        g.write("vda", 50 * MiB, 1 * MiB, 0xE2)  # over never-written space
        g.zero("vda", 3 * MiB, 1 * MiB)
        g.write("vdb", 8 * MiB, 64 * KiB, 0xE3)
        g.write("vdb", 31 * MiB, 1 * MiB, 0xE4)

    s1 = sync(src, tgt, "p1", before_copy=meanwhile)
    assert_point(tgt, "p1", refs[0])

    # The writes made during the backup are in the next incremental.
    ref2 = g.freeze()
    s2 = sync(src, tgt, "p2", s1.base, before_copy=meanwhile)
    assert {r.kind for r in s2.results.values()} == {"incremental"}
    assert_point(tgt, "p2", ref2)
    sync(src, tgt, "p3", s2.base)
    assert_point(tgt, "p3", g.freeze())
    no_leftovers(work)


def test_aborted_sync_then_good_one_loses_nothing(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 8 * MiB, 0x01)
    s1 = sync(src, tgt, "p1")

    g.write("vda", 2 * MiB, 1 * MiB, 0x02)  # before the aborted snapshot
    snap = src.create_snapshot("p2", s1.base)
    assert "sendense.job1.p2" in g.checkpoints()
    tgt.prepare("p2", src.discover().disks)
    g.write("vda", 20 * MiB, 1 * MiB, 0x03)  # during the aborted sync
    with pytest.raises(DataPathError, match="cancelled"):
        with src.open_disk(snap, "vda") as sd, tgt.open_disk("p2", "vda") as td:
            assert sd.connect().read(2 * MiB, 4096) == b"\x02" * 4096
            copy_disk(sd, td, snap.disk("vda"), TUNING, cancelled=lambda: True)
    tgt.abort("p2")
    src.release_snapshot(snap, committed=False)
    src.release_snapshot(snap, committed=False)  # idempotent
    assert g.checkpoints() == ["sendense.job1.p1"]
    with pytest.raises(SnapshotInconsistent, match="gone"):
        with src.open_disk(snap, "vda"):
            pass

    g.write("vda", 40 * MiB, 1 * MiB, 0x04)  # after
    ref = g.freeze()
    s3 = sync(src, tgt, "p3", s1.base)
    assert s3.results["vda"].kind == "incremental"
    assert s3.results["vda"].stats.bytes_read == 3 * MiB
    assert_point(tgt, "p3", ref)
    assert g.checkpoints() == ["sendense.job1.p3"]
    no_leftovers(work)


def test_deleted_checkpoint_means_tracking_lost_then_resync(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 4 * MiB, 0x01)
    s1 = sync(src, tgt, "p1")

    g.dom.checkpointLookupByName("sendense.job1.p1", 0).delete(0)
    g.write("vda", 1 * MiB, 1 * MiB, 0x02)
    g.write("vda", 30 * MiB, 1 * MiB, 0x03)
    ref2 = g.freeze()
    s2 = sync(src, tgt, "p2", s1.base)
    d = s2.snap.disk("vda")
    assert d.tracking_lost and "sendense.job1.p1" in d.tracking_lost and "missing" in d.tracking_lost
    assert "\n" not in d.tracking_lost
    assert "bitmap" not in d.handle  # a full export, read entirely and compared
    r = s2.results["vda"]
    assert r.kind == "resync"
    assert r.stats.bytes_written == 2 * MiB  # only the blocks that differ
    assert_point(tgt, "p2", ref2)

    g.write("vda", 50 * MiB, 64 * KiB, 0x04)  # tracking is back from p2 on
    s3 = sync(src, tgt, "p3", s2.base)
    assert s3.results["vda"].kind == "incremental"
    assert s3.results["vda"].stats.bytes_read == 64 * KiB
    assert_point(tgt, "p3", g.freeze())


def test_multi_disk_and_broken_bitmap_on_one_disk(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB, 32 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 2 * MiB, 0x0A)
    g.write("vdb", 16 * MiB, 2 * MiB, 0x0B)
    s1 = sync(src, tgt, "p1")
    assert {k: r.kind for k, r in s1.results.items()} == {"vda": "full", "vdb": "full"}
    assert_point(tgt, "p1", g.freeze())

    g.write("vda", 10 * MiB, 1 * MiB, 0x1A)
    g.write("vdb", 0, 1 * MiB, 0x1B)
    ref2 = g.freeze()
    s2 = sync(src, tgt, "p2", s1.base)
    assert {k: r.kind for k, r in s2.results.items()} == {"vda": "incremental", "vdb": "incremental"}
    assert {k: r.stats.bytes_read for k, r in s2.results.items()} == {"vda": 1 * MiB, "vdb": 1 * MiB}
    assert_point(tgt, "p2", ref2)

    # vdb's bitmap vanishes behind libvirt's back: vdb is resynced, vda stays incremental.
    hmp_json(g.dom, "block-dirty-bitmap-remove", node=format_node(g.dom, "vdb"), name="sendense.job1.p2")
    g.write("vda", 12 * MiB, 64 * KiB, 0x2A)
    g.write("vdb", 20 * MiB, 64 * KiB, 0x2B)
    ref3 = g.freeze()
    s3 = sync(src, tgt, "p3", s2.base)
    assert s3.snap.disk("vda").tracking_lost is None
    lost = s3.snap.disk("vdb").tracking_lost
    assert lost and "vdb" in lost and "sendense.job1.p2" in lost
    assert {k: r.kind for k, r in s3.results.items()} == {"vda": "incremental", "vdb": "resync"}
    assert s3.results["vda"].stats.bytes_read == 64 * KiB
    assert s3.results["vdb"].stats.bytes_written == 64 * KiB
    assert_point(tgt, "p3", ref3)

    g.write("vdb", 21 * MiB, 64 * KiB, 0x3B)
    s4 = sync(src, tgt, "p4", s3.base)
    assert {k: r.kind for k, r in s4.results.items()} == {"vda": "incremental", "vdb": "incremental"}
    assert_point(tgt, "p4", g.freeze())
    assert g.checkpoints() == ["sendense.job1.p4"]
    no_leftovers(work)


def test_reopen_from_ref_alone_and_stale_leftovers(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB)
    work = work / ("w" * 120)  # too long for a unix socket path: the socket goes to the temp dir
    src = source(lab, g, work)
    g.write("vda", 0, 1 * MiB, 0x01)
    snap = src.create_snapshot("p1", {})
    assert len(snap.disk("vda").handle["socket"]) < 108
    assert Path(snap.disk("vda").handle["scratch"]).parent == work

    # Another process (another worker) reads the export from the serialized ref alone.
    ref = SnapshotRef.model_validate_json(snap.model_dump_json())
    other = LibvirtSource("job1", lab.uri, g.name, tmp_path / "elsewhere")
    with other.open_disk(ref, "vda") as sd:
        assert sd.size == 64 * MiB
        c = sd.connect()
        try:
            assert c.read(0, 4096) == b"\x01" * 4096
        finally:
            c.close()

    # The worker died without releasing: the retried snapshot clears the leftover job and checkpoint.
    g.write("vda", 1 * MiB, 1 * MiB, 0x02)
    snap2 = src.create_snapshot("p1", {})
    assert g.checkpoints() == ["sendense.job1.p1"]
    with src.open_disk(snap2, "vda") as sd:
        c = sd.connect()
        try:
            assert c.read(1 * MiB, 4096) == b"\x02" * 4096
        finally:
            c.close()
    src.release_snapshot(snap2, committed=True)
    src.release_snapshot(snap2, committed=True)  # idempotent
    assert g.checkpoints() == ["sendense.job1.p1"]
    with pytest.raises(SnapshotInconsistent, match="gone"):
        with other.open_disk(ref, "vda"):
            pass
    no_leftovers(work)

    # A backup job that is not ours is left alone.
    foreign = (
        "<domainbackup mode='pull'>"
        f"<server transport='unix' socket='{tmp_path}/foreign.sock'/>"
        "<disks><disk name='vda' backup='yes' type='file'>"
        f"<scratch file='{tmp_path}/foreign.scratch'/></disk></disks></domainbackup>"
    )
    g.dom.backupBegin(foreign, None, 0)
    try:
        src.busy_wait = 0.5
        with pytest.raises(
            ResourceUnavailable, match="a backup job not of job job1 .* still runs after 0.5s"
        ):
            src.create_snapshot("p2", {"vda": snap2.disks[0].change_id})
        src.release_snapshot(snap2, committed=True)
        assert g.dom.backupGetXMLDesc(0)  # still running
    finally:
        g.dom.abortJob()
    assert g.checkpoints() == ["sendense.job1.p1"]


def test_restart_keeps_tracking_and_crash_loses_it(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 2 * MiB, 0x01)
    s1 = sync(src, tgt, "p1")

    # A clean stop (libvirt's destroy sends SIGTERM first: QEMU stores the persistent bitmaps).
    g.write("vda", 8 * MiB, 1 * MiB, 0x02)
    g.dom.destroy()
    with pytest.raises(ResourceUnavailable, match="not running"):
        src.create_snapshot("p2", s1.base)
    g.dom.create()
    g.write("vda", 9 * MiB, 1 * MiB, 0x03)
    s2 = sync(src, tgt, "p2", s1.base)
    assert s2.results["vda"].kind == "incremental"
    assert s2.results["vda"].stats.bytes_read == 2 * MiB
    assert_point(tgt, "p2", g.freeze())

    # A crash (SIGKILL): the bitmaps were never stored; tracking is lost, the resync is exact.
    g.write("vda", 20 * MiB, 1 * MiB, 0x04)
    pid = int((lab.base / "run" / "qemu" / f"{g.name}.pid").read_text())
    os.kill(pid, 9)
    deadline = time.monotonic() + 30
    while g.dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.05)
    g.dom.create()
    ref3 = g.freeze()
    s3 = sync(src, tgt, "p3", s2.base)
    lost = s3.snap.disk("vda").tracking_lost
    assert lost and "sendense.job1.p2" in lost
    assert s3.results["vda"].kind == "resync"
    assert s3.results["vda"].stats.bytes_written == 1 * MiB
    assert_point(tgt, "p3", ref3)
    assert g.checkpoints() == ["sendense.job1.p3"]  # the broken one's metadata went too


def test_qcow2_v2_image_is_a_spec_error(lab: LabLibvirtd, tmp_path: Path, work: Path) -> None:
    img = tmp_path / "v2.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(img), "32M"], check=True
    )
    conn = lab.connect()
    dom = define_lab_domain(conn, f"v2-{uuid.uuid4().hex[:8]}", [img])
    try:
        src = LibvirtSource("job1", lab.uri, dom.name(), work)
        with pytest.raises(InvalidSpec) as ei:  # refused at create, not at every sync
            src.validate()
        assert str(ei.value) == (
            f"libvirt domain {dom.name()} on {lab.uri}: disk vda ({img}) is qcow2 v2 (compat=0.10), which "
            f"cannot hold checkpoints: shut the domain off and upgrade it: qemu-img amend -o compat=1.1 {img}"
        )
        with pytest.raises(InvalidSpec, match="compat=1.1"):
            src.create_snapshot("p1", {})
        assert dom.listAllCheckpoints(0) == []
        no_leftovers(work)
    finally:
        remove_lab_domain(dom)
        conn.close()


def test_a_zero_byte_disk_is_refused_at_validate(lab: LabLibvirtd, tmp_path: Path, work: Path) -> None:
    good, empty = tmp_path / "good.qcow2", tmp_path / "empty.qcow2"
    for img, size in ((good, "32M"), (empty, "0")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), size], check=True)
    conn = lab.connect()
    dom = define_lab_domain(conn, f"z-{uuid.uuid4().hex[:8]}", [good, empty])
    try:
        with pytest.raises(InvalidSpec) as ei:
            LibvirtSource("job1", lab.uri, dom.name(), work).validate()
        assert str(ei.value) == (
            f"libvirt domain {dom.name()} on {lab.uri}: disk vdb ({empty}) has a size of 0 bytes: detach it "
            "or give it a size"
        )
    finally:
        remove_lab_domain(dom)
        conn.close()


def test_one_incremental_for_all_disks_on_old_libvirt(
    lab: LabLibvirtd,
    make_guest: Callable[..., Guest],
    work: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libvirt < 7.6 has only <incremental> for the whole backup: one lost disk makes all full."""
    import connectors.kvm.libvirt_source as mod

    monkeypatch.setattr(mod, "PER_DISK_INCREMENTAL", 1 << 40)
    g = make_guest(32 * MiB, 32 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 1 * MiB, 0x01)
    g.write("vdb", 0, 1 * MiB, 0x02)
    s1 = sync(src, tgt, "p1")
    g.write("vda", 4 * MiB, 64 * KiB, 0x03)
    g.write("vdb", 4 * MiB, 64 * KiB, 0x04)
    s2 = sync(src, tgt, "p2", s1.base)
    assert {k: r.kind for k, r in s2.results.items()} == {"vda": "incremental", "vdb": "incremental"}
    assert_point(tgt, "p2", g.freeze())

    hmp_json(g.dom, "block-dirty-bitmap-remove", node=format_node(g.dom, "vdb"), name="sendense.job1.p2")
    g.write("vda", 8 * MiB, 64 * KiB, 0x05)
    g.write("vdb", 8 * MiB, 64 * KiB, 0x06)
    ref3 = g.freeze()
    s3 = sync(src, tgt, "p3", s2.base)
    assert "libvirt < 7.6" in (s3.snap.disk("vda").tracking_lost or "")
    assert "vdb" in (s3.snap.disk("vdb").tracking_lost or "")
    assert {k: r.kind for k, r in s3.results.items()} == {"vda": "resync", "vdb": "resync"}
    assert_point(tgt, "p3", ref3)
    s4 = sync(src, tgt, "p4", s3.base)
    assert {k: r.kind for k, r in s4.results.items()} == {"vda": "incremental", "vdb": "incremental"}
    assert_point(tgt, "p4", g.freeze())


def image_bitmaps(img: Path) -> list[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(img)], capture_output=True, text=True, check=True
    ).stdout
    return sorted(
        b["name"] for b in json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps", [])
    )


def test_forget_deletes_the_jobs_checkpoints_and_spares_other_jobs(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    g = make_guest(64 * MiB, 32 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    other = source(lab, g, tmp_path / "work2", job="job1-x")  # its prefix starts like ours
    other_tgt = KvmTarget("job1-x", tmp_path / "replicas2")
    g.write("vda", 0, 2 * MiB, 0x01)
    s1 = sync(src, tgt, "p1")
    o1 = sync(other, other_tgt, "o1")
    g.write("vda", 4 * MiB, 1 * MiB, 0x02)
    s2 = sync(src, tgt, "p2", s1.base)
    src.create_snapshot("p3", s2.base)  # a crashed sync: its backup job and scratch files are left
    assert g.dom.backupGetXMLDesc(0)
    assert list(work.glob("*.scratch"))
    assert g.checkpoints() == ["sendense.job1-x.o1", "sendense.job1.p2", "sendense.job1.p3"]

    src.forget()
    assert g.checkpoints() == ["sendense.job1-x.o1"]
    with pytest.raises(libvirt.libvirtError):
        g.dom.backupGetXMLDesc(0)  # no backup job left
    no_leftovers(work)
    assert not list(work.glob("sendense.job1.*"))
    src.forget()  # idempotent
    assert g.checkpoints() == ["sendense.job1-x.o1"]

    # the other job's change tracking is intact: every write since o1 is in its next incremental
    g.write("vdb", 8 * MiB, 64 * KiB, 0x03)
    ref = g.freeze()
    o2 = sync(other, other_tgt, "o2", o1.base)
    assert {k: r.kind for k, r in o2.results.items()} == {"vda": "incremental", "vdb": "incremental"}
    assert {k: r.stats.bytes_read for k, r in o2.results.items()} == {"vda": 1 * MiB, "vdb": 64 * KiB}
    assert_point(other_tgt, "o2", ref)

    # a shut-off domain: the bitmaps go from the images, the checkpoints' metadata from libvirt ...
    sync(src, tgt, "p4")
    g.dom.destroy()
    assert image_bitmaps(g.images["vda"]) == ["sendense.job1-x.o2", "sendense.job1.p4"]
    # ... unless another checkpoint's bitmap is disabled: it would need the merge only libvirt does
    subprocess.run(
        ["qemu-img", "bitmap", "--disable", str(g.images["vdb"]), "sendense.job1-x.o2"], check=True
    )
    with pytest.raises(ResourceUnavailable, match="start the domain") as ei:
        src.forget()
    assert "\n" not in str(ei.value)
    assert g.checkpoints() == ["sendense.job1-x.o2", "sendense.job1.p4"]
    subprocess.run(["qemu-img", "bitmap", "--enable", str(g.images["vdb"]), "sendense.job1-x.o2"], check=True)
    src.forget()
    assert g.checkpoints() == ["sendense.job1-x.o2"]
    assert image_bitmaps(g.images["vda"]) == image_bitmaps(g.images["vdb"]) == ["sendense.job1-x.o2"]
    other.forget()
    assert g.checkpoints() == []
    assert image_bitmaps(g.images["vda"]) == image_bitmaps(g.images["vdb"]) == []
    other.forget()  # idempotent

    # a domain that is gone: nothing to do
    LibvirtSource("job1", lab.uri, "nope-nope", work).forget()


def test_disks_swapped_behind_their_paths_resync_with_the_reason_and_both_points_are_exact(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    """Both images held the checkpoint's bitmap (one name on every disk): after the image files were
    swapped, the sync ran incremental against the other disk's changes and both replicas were wrong."""
    g = make_guest(32 * MiB, 32 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 4 * MiB, 0x11)
    g.write("vdb", 8 * MiB, 4 * MiB, 0x22)
    s1 = sync(src, tgt, "p1")
    g.write("vda", 1 * MiB, 64 * KiB, 0x33)
    g.write("vdb", 9 * MiB, 64 * KiB, 0x44)
    g.dom.destroy()  # a clean stop: QEMU stores the bitmaps
    a, b = g.images["vda"], g.images["vdb"]
    swap = a.with_suffix(".swap")
    a.rename(swap)
    b.rename(a)
    swap.rename(b)
    g.shadows["vda"], g.shadows["vdb"] = g.shadows["vdb"], g.shadows["vda"]
    g.dom.create()
    ref2 = g.freeze()
    s2 = sync(src, tgt, "p2", s1.base)
    for key in ("vda", "vdb"):
        assert s2.snap.disk(key).tracking_lost == (
            f"image {g.images[key]} of disk {key} is not the file it was at checkpoint sendense.job1.p1 "
            "(replaced)"
        )
        assert s2.results[key].kind == "resync"
    assert_point(tgt, "p2", ref2)
    g.write("vda", 2 * MiB, 64 * KiB, 0x55)
    s3 = sync(src, tgt, "p3", s2.base)
    assert {k: (r.kind, r.stats.bytes_read) for k, r in s3.results.items()} == {
        "vda": ("incremental", 64 * KiB),
        "vdb": ("incremental", 0),
    }
    assert_point(tgt, "p3", g.freeze())


def test_two_jobs_on_one_domain_wait_for_each_other_and_both_points_are_exact(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    """libvirt runs one backup job per domain: the second job's snapshot waits for the first job's
    sync to end instead of failing; job1-1's name extends job1's."""
    g = make_guest(32 * MiB)
    a, b = source(lab, g, work), source(lab, g, tmp_path / "work2", job="job1-1")
    ta, tb = KvmTarget("job1", tmp_path / "ra"), KvmTarget("job1-1", tmp_path / "rb")
    g.write("vda", 0, 2 * MiB, 0x11)
    ref1 = g.freeze()
    done: dict[str, Synced] = {}
    errors: list[BaseException] = []

    def other() -> None:
        try:
            done["b"] = sync(b, tb, "s1")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=other)

    def overlap(_snap: SnapshotRef) -> None:  # a's backup runs: b's whole sync starts now
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and not errors

    s1 = sync(a, ta, "s1", before_copy=overlap)
    t.join(120)
    assert not errors and "b" in done
    assert_point(ta, "s1", ref1)
    assert_point(tb, "s1", ref1)

    g.write("vda", 4 * MiB, 64 * KiB, 0x22)
    ref2 = g.freeze()
    b2 = sync(b, tb, "s2", done["b"].base)
    a2 = sync(a, ta, "s2", s1.base)
    for r in (a2, b2):
        assert (r.results["vda"].kind, r.results["vda"].stats.bytes_read) == ("incremental", 64 * KiB)
    assert_point(ta, "s2", ref2)
    assert_point(tb, "s2", ref2)
    assert g.checkpoints() == ["sendense.job1-1.s2", "sendense.job1.s2"]

    b.busy_wait = 0.3  # bounded: then a retryable one-line error
    snap = a.create_snapshot("s3", a2.base)
    try:
        with pytest.raises(ResourceUnavailable) as ei:
            b.create_snapshot("s3", b2.base)
        assert "still runs after 0.3s; job job1-1 retries" in str(ei.value) and ei.value.retryable
    finally:
        a.release_snapshot(snap, committed=False)


def test_a_domain_redefined_under_the_same_name_resyncs_with_the_reason(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    """The domain is found by name: one redefined under it (a new UUID) is another VM as far as the
    job's checkpoints go, and the reason says so."""
    g = make_guest(32 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 2 * MiB, 0x11)
    s1 = sync(src, tgt, "p1")
    old_uuid = g.dom.UUIDString()
    remove_lab_domain(g.dom)
    g.dom = define_lab_domain(g.conn, g.name, [g.images["vda"]])
    assert g.dom.UUIDString() != old_uuid
    g.write("vda", 4 * MiB, 64 * KiB, 0x22)
    ref = g.freeze()
    s2 = sync(src, tgt, "p2", s1.base)
    assert s2.snap.disk("vda").tracking_lost == (
        f"domain {g.name} was redefined (its UUID changed) since checkpoint sendense.job1.p1"
    )
    assert s2.results["vda"].kind == "resync"
    assert_point(tgt, "p2", ref)


def test_a_job_pinned_to_a_domain_refuses_another_vm_under_its_name(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    """Issue 11, finding 4: the job records the domain's UUID when it is created (discover's vm_id, the
    workflow pins the spec with it); a different VM defined under the old name fails the sync in one
    line and nothing of it is read."""
    g = make_guest(32 * MiB)
    vm = source(lab, g, work).discover()
    assert vm.vm_id == g.dom.UUIDString()
    spec = KvmSource(platform="kvm", libvirt={"uri": lab.uri, "domain": g.name}).pinned(vm.vm_id)
    assert spec.libvirt is not None and spec.libvirt.uuid == vm.vm_id
    src = LibvirtSource("job1", lab.uri, g.name, work, uuid=spec.libvirt.uuid)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 2 * MiB, 0x11)
    s1 = sync(src, tgt, "p1")
    remove_lab_domain(g.dom)
    g.dom = define_lab_domain(g.conn, g.name, [g.images["vda"]])
    with pytest.raises(ResourceNotFound) as e:
        src.create_snapshot("p2", s1.base)
    assert e.value.message == (
        f"libvirt domain {g.name} on {lab.uri} is another VM now (UUID {g.dom.UUIDString()}; the job "
        f"replicates {vm.vm_id}): delete the job and create it again to replicate the new one"
    )
    assert g.checkpoints() == []  # the new VM was not touched


def test_a_raw_disk_is_refused_at_validate_saying_what_to_do(
    lab: LabLibvirtd, tmp_path: Path, work: Path
) -> None:
    """libvirt checkpoints need qcow2: a raw disk is refused at create, never skipped."""
    raw = tmp_path / "data.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    conn = lab.connect()
    dom = define_lab_domain(conn, f"raw-{uuid.uuid4().hex[:8]}", [raw], fmt="raw")
    try:
        with pytest.raises(InvalidSpec) as ei:
            LibvirtSource("job1", lab.uri, dom.name(), work).validate()
        assert str(ei.value) == (
            f"libvirt domain {dom.name()} on {lab.uri}: disk vda (file/raw) cannot be replicated: only qcow2 "
            "file disks have checkpoints (convert it with the domain shut off: qemu-img convert -O qcow2)"
        )
    finally:
        remove_lab_domain(dom)
        conn.close()


def test_a_domain_moved_to_another_libvirt_continues_from_the_bitmaps_its_images_carry(
    lab: LabLibvirtd, make_guest: Callable[..., Guest], work: Path, tmp_path: Path
) -> None:
    """A VM moved to another host (live migration, or stopped there and started here over the same
    images) brings the job's persistent bitmap in its qcow2 files, not libvirt's checkpoint record: the
    libvirt it runs under now adopts the bitmap as a checkpoint (validated) and the next sync is
    incremental, holding the writes made before the move and after it. A carried bitmap that stopped
    recording is never a base: that sync resyncs, exact. Either way nothing of the job stays behind."""
    g = make_guest(64 * MiB)
    src = source(lab, g, work)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    g.write("vda", 0, 2 * MiB, 0x11)
    s1 = sync(src, tgt, "p1")
    uuid_ = g.dom.UUIDString()

    def move() -> None:  # off under "libvirt A" (its checkpoint records go), on under "libvirt B"
        xml = g.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        remove_lab_domain(g.dom)
        g.dom = g.conn.defineXML(xml)
        g.dom.create()
        assert g.dom.UUIDString() == uuid_ and g.checkpoints() == []

    g.write("vda", 8 * MiB, 1 * MiB, 0x12)  # before the move
    move()
    g.write("vda", 9 * MiB, 64 * KiB, 0x13)  # after it
    s2 = sync(src, tgt, "p2", s1.base)
    assert s2.snap.disk("vda").tracking_lost is None
    assert s2.results["vda"].kind == "incremental"
    assert s2.results["vda"].stats.bytes_read == 1 * MiB + 64 * KiB
    assert_point(tgt, "p2", g.freeze())
    assert g.checkpoints() == ["sendense.job1.p2"]  # the adopted p1 went with the commit

    # a carried bitmap that is not recording (disabled while the VM was off) missed writes
    g.write("vda", 20 * MiB, 64 * KiB, 0x14)
    g.dom.destroy()
    from tools.qemu import image_info, qcow2_bitmaps

    subprocess.run(["qemu-img", "bitmap", "--disable", str(g.images["vda"]), "sendense.job1.p2"], check=True)
    assert qcow2_bitmaps(image_info(g.images["vda"]))["sendense.job1.p2"] == []  # not "auto"
    xml = g.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    remove_lab_domain(g.dom)
    g.dom = g.conn.defineXML(xml)
    g.dom.create()
    g.write("vda", 30 * MiB, 64 * KiB, 0x15)
    ref3 = g.freeze()
    s3 = sync(src, tgt, "p3", s2.base)
    lost = s3.snap.disk("vda").tracking_lost
    assert lost and "sendense.job1.p2" in lost
    assert s3.results["vda"].kind == "resync"
    assert s3.results["vda"].stats.bytes_written == 128 * KiB
    assert_point(tgt, "p3", ref3)
    assert g.checkpoints() == ["sendense.job1.p3"]

    src.forget()
    g.dom.destroy()  # (stored: what a running QEMU keeps is in the images once it lets go)
    assert not [b for b in qcow2_bitmaps(image_info(g.images["vda"])) if b.startswith("sendense.job1.")]
