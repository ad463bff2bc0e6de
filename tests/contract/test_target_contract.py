"""The target contract (sendense.protocols.TargetConnector), the same for every platform.

A point's bytes never change after its commit, whatever later syncs and prunes do; prune keeps the
newest points and every held one, whatever the retention; abort leaves nothing of its sync; prepare
after a half-written attempt starts afresh from the newest point; destroy removes everything of the
job, and refuses while a hold stands. Every point is compared byte for byte with the shadow of the
source at its snapshot instant (the source is a memory VM: rigs.py).
"""

from __future__ import annotations

import pytest
from contract.rigs import Rig
from contract.shadow import Shadow
from helpers_kvm import MiB, fast_tuning

from sendense.datapath.sync import copy_disk
from sendense.errors import InvalidSpec, ResourceNotFound, TargetError
from sendense.models import DiskInfo, SnapshotRef
from sendense.protocols import SourceConnector, TargetConnector
from tools.qemu import qemu_img

KiB = 1 << 10


def assert_points(rig: Rig, expected: dict[str, dict[str, Shadow]]) -> None:
    """The target lists exactly these points, newest first, each reading exactly its shadows."""
    listed = [p.point_id for p in rig.target().list_points()]
    assert listed == sorted(expected, reverse=True)  # (point ids sort in commit order here)
    for pid, shadows in expected.items():
        assert rig.differs(pid, shadows) == [], pid


def begin(
    rig: Rig, sync_id: str, base: dict[str, str | None]
) -> tuple[SourceConnector, TargetConnector, SnapshotRef]:
    """A sync's first steps: snapshot and prepare (the copy is the test's)."""
    src, tgt = rig.source(), rig.target()
    snap = src.create_snapshot(sync_id, base)
    tgt.prepare(sync_id, [DiskInfo(key=d.key, size=d.size) for d in snap.disks])
    return src, tgt, snap


def scribble(rig: Rig, tgt: TargetConnector, sync_id: str, key: str, offset: int) -> None:
    """An attempt writes into the sync's replica and dies: one block of 0xEE (whole target blocks)."""
    n = max(rig.replicas.block, 64 * KiB)
    assert offset % n == 0
    with tgt.open_disk(sync_id, key) as td:
        w = td.connect()
        try:
            w.write(offset, b"\xee" * n)
            w.flush()
        finally:
            w.close()


def test_points_are_immutable_across_later_syncs_and_prunes(target_rig: Rig) -> None:
    rig = target_rig
    k0, k1 = rig.keys
    rig.target().validate()
    rig.write(k0, 0, 1 * MiB, 0x11)
    rig.write(k1, 100 * KiB, 10, 0x12)
    s1, at1 = rig.sync("p1")
    assert s1.point.kind == "full"
    points = {"p1": at1}

    rig.write(k0, 256 * KiB, 64 * KiB, 0x22)  # over p1's data
    rig.zero(k0, 512 * KiB, 512 * KiB)  # a zero write over p1's data
    rig.write(k1, rig.shadows[k1].size - 100, 100, 0x23)  # the very end of the disk
    s2, points["p2"] = rig.sync("p2", s1.base)
    assert s2.point.kind == "incremental"
    assert_points(rig, points)

    rig.write(k0, 2 * MiB, 4 * KiB, 0x33)
    rig.zero(k0, 0, 64 * KiB)
    s3, points["p3"] = rig.sync("p3", s2.base)
    assert_points(rig, points)

    assert rig.target().prune(2) == ["p1"]
    del points["p1"]
    assert_points(rig, points)

    rig.write(k0, 256 * KiB, 4 * KiB, 0x44)
    s4, points["p4"] = rig.sync("p4", s3.base)
    assert rig.target().prune(2) == ["p2"]
    del points["p2"]
    assert_points(rig, points)


def test_prune_keeps_held_points_whatever_the_retention(target_rig: Rig) -> None:
    rig = target_rig
    k0, _ = rig.keys
    points: dict[str, dict[str, Shadow]] = {}
    base: dict[str, str | None] = {}
    for n in range(1, 5):
        rig.write(k0, n * 512 * KiB, 4 * KiB, 0x10 + n)
        s, points[f"p{n}"] = rig.sync(f"p{n}", base)
        base = s.base
    tgt = rig.target()
    with pytest.raises(ResourceNotFound, match="no recovery point nope"):
        tgt.hold("nope", "drill-1", "a drill")
    with pytest.raises(InvalidSpec, match="hold id"):
        tgt.hold("p2", "Not A Hold Id", "a drill")
    tgt.hold("p2", "drill-1", "a drill runs on it")
    tgt.hold("p2", "drill-1", "a drill runs on it")  # idempotent by id
    assert {p.point_id: p.holds for p in tgt.list_points()} == {
        "p4": [],
        "p3": [],
        "p2": ["drill-1"],
        "p1": [],
    }

    kept = {"p2", "p4"}
    if rig.replicas.keeps_point_before_held:
        kept.add("p1")  # (declared by the platform's rig, with why)
    assert sorted(tgt.prune(1)) == sorted(set(points) - kept)
    assert sorted(tgt.prune(1)) == []  # again: nothing more goes while the hold stands
    assert_points(rig, {p: points[p] for p in kept})

    tgt.release("p2", "drill-1")
    tgt.release("p2", "drill-1")  # gone already: no error
    assert sorted(tgt.prune(1)) == sorted(kept - {"p4"})
    assert_points(rig, {"p4": points["p4"]})


def test_abort_leaves_nothing_of_its_sync(target_rig: Rig) -> None:
    rig = target_rig
    k0, k1 = rig.keys
    rig.write(k0, 0, 1 * MiB, 0x11)
    s1, at1 = rig.sync("p1")
    before = rig.replicas.leftovers(rig.job)

    rig.write(k0, 2 * MiB, 64 * KiB, 0x21)
    rig.write(k1, 0, 64 * KiB, 0x22)
    src, tgt, snap = begin(rig, "s2", s1.base)
    with src.open_disk(snap, k0) as sd, tgt.open_disk("s2", k0) as td:  # one disk copied, then it dies
        copy_disk(sd, td, snap.disk(k0), fast_tuning())
    scribble(rig, tgt, "s2", k1, 1 * MiB)
    tgt.abort("s2")
    src.release_snapshot(snap, committed=False)
    assert rig.replicas.leftovers(rig.job) == before
    for key in rig.keys:  # nothing of the sync is left to write into
        with pytest.raises(ResourceNotFound), tgt.open_disk("s2", key):
            pass
    assert_points(rig, {"p1": at1})
    tgt.abort("s2")  # again: no error
    tgt.abort("p1")  # a committed point's sync: nothing of the point goes
    assert_points(rig, {"p1": at1})

    s3, at3 = rig.sync("p3", s1.base)  # the next sync is an incremental from p1
    assert s3.point.kind == "incremental"
    assert_points(rig, {"p1": at1, "p3": at3})


def test_prepare_after_a_half_written_attempt_starts_afresh(target_rig: Rig) -> None:
    rig = target_rig
    k0, k1 = rig.keys
    rig.write(k0, 0, 256 * KiB, 0x11)
    rig.write(k1, 0, 4 * KiB, 0x12)
    # A full sync's first attempt wrote where the source reads zero (a full copy writes data ranges
    # only, so only a fresh replica reads zero there), then died.
    src, tgt, snap = begin(rig, "p1", {})
    scribble(rig, tgt, "p1", k0, 1 * MiB)
    src.release_snapshot(snap, committed=False)
    s1, at1 = rig.sync("p1")  # the retried sync: a new snapshot under the same id, prepared again
    assert s1.point.kind == "full"
    assert_points(rig, {"p1": at1})

    # An incremental's attempt wrote where the next attempt copies, and where it does not (unchanged
    # since p1: only a replica started afresh from p1 reads p1's bytes there).
    rig.write(k0, 2 * MiB, 64 * KiB, 0x21)
    src, tgt, snap = begin(rig, "p2", s1.base)
    scribble(rig, tgt, "p2", k0, 2 * MiB)
    scribble(rig, tgt, "p2", k0, 0)
    scribble(rig, tgt, "p2", k1, 0)
    src.release_snapshot(snap, committed=False)
    s2, at2 = rig.sync("p2", s1.base)
    assert s2.point.kind == "incremental"
    assert_points(rig, {"p1": at1, "p2": at2})


def test_destroy_removes_everything_and_refuses_while_a_hold_stands(target_rig: Rig) -> None:
    rig = target_rig
    k0, _ = rig.keys
    rig.write(k0, 0, 512 * KiB, 0x11)
    s1, at1 = rig.sync("p1")
    rig.write(k0, 1 * MiB, 4 * KiB, 0x21)
    s2, at2 = rig.sync("p2", s1.base)
    rig.write(k0, 2 * MiB, 4 * KiB, 0x31)
    src, tgt, snap = begin(rig, "s3", s2.base)  # a sync in progress, half written
    scribble(rig, tgt, "s3", k0, 0)
    src.release_snapshot(snap, committed=False)
    tgt.hold("p1", "failover-1", "the failover VM runs on it")

    with pytest.raises(TargetError, match="failover-1") as ei:
        tgt.destroy()
    assert "\n" not in str(ei.value)
    assert_points(rig, {"p1": at1, "p2": at2})  # nothing was deleted

    tgt.release("p1", "failover-1")
    tgt.destroy()
    assert rig.replicas.leftovers(rig.job) == []
    assert rig.target().list_points() == []
    rig.target().destroy()  # again: no error
    assert rig.replicas.leftovers(rig.job) == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_never_writes_through_files_planted_in_its_output_directory(target_rig: Rig, fmt: str) -> None:
    """Issue 11, finding 8: the output directory may be shared (/tmp). Symlinks another user planted at
    every name an export could write (`<export>`, `<export>.part`, `<export>.raw.part`) point at a
    victim file: the victim keeps its bytes, the export is the point, 0600."""
    rig = target_rig
    k0, _ = rig.keys
    rig.write(k0, 0, 1 * MiB, 0x5A)
    _, at = rig.sync("p1")
    out = rig.tmp / f"shared-{fmt}"
    out.mkdir(mode=0o777)
    victim = rig.tmp / "victim"
    victim.write_bytes(b"victim's data\n")
    names = [f.name for _, f in rig.target().export("p1", fmt, rig.tmp / f"probe-{fmt}")]
    for name in names:
        for planted in (name, f"{name}.part", f"{name}.raw.part", f"{name}.converted"):
            (out / planted).symlink_to(victim)
    files = dict(rig.target().export("p1", fmt, out))
    assert victim.read_bytes() == b"victim's data\n"
    for key, f in files.items():
        assert not f.is_symlink() and f.stat().st_mode & 0o777 == 0o600
        raw = f if fmt == "raw" else rig.tmp / f"{f.name}.raw"
        if fmt != "raw":
            qemu_img("convert", "-f", "qcow2", "-O", "raw", str(f), str(raw))
        assert at[key].differs(raw) is None, key
    assert not [p for p in out.iterdir() if p.name.startswith(".sendense-export-")]  # no staging left
