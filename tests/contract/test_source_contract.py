"""The source contract (sendense.protocols.SourceConnector), the same for every platform.

A snapshot reads the disks as they were at its instant, whatever the guest writes right after it; an
incremental lists exactly the granules written since its base (data, zero writes, discards), zero
ranges reading zero; a base the source lost is `tracking_lost` with a reason, and the sync a resync,
never a silent full or incremental; `forget` is idempotent, leaves none of the job's tracking and
spares other jobs'. Every point is compared byte for byte with the shadow of its instant.
"""

from __future__ import annotations

import shutil

import pytest
from contract.conftest import DISCARDING_SOURCES, RESIZABLE_SOURCES
from contract.rigs import Rig

from sendense.datapath.extents import Extent, coalesce
from sendense.errors import ChangeTrackingLost, SnapshotInconsistent
from sendense.models import SnapshotRef
from sendense.protocols import SourceConnector


def listed(src: SourceConnector, snap: SnapshotRef, key: str, granule: int) -> tuple[set[int], set[int]]:
    """(granules the disk's incremental lists, granules it lists wholly as zero). Together its ranges
    must make whole granules (the last may end at the disk's end), and its zero ranges must read zero;
    inside a granule a source may say finer where it reads zero (a host file's holes in a qcow2 cluster)."""
    d = snap.disk(key)
    with src.open_disk(snap, key) as disk:
        ext = list(coalesce(disk.extents(d.base_change_id)))
        reader = disk.connect()
        try:
            for e in ext:
                if e.zero:
                    assert reader.read(e.offset, e.length) == bytes(e.length), (
                        f"{key}: {e} does not read zero"
                    )
        finally:
            reader.close()
    for u in coalesce(Extent(e.offset, e.length) for e in ext):  # data and zero alike
        assert u.offset % granule == 0 and (u.end % granule == 0 or u.end == d.size), (key, u)
    every = {i for e in ext for i in range(e.offset // granule, (e.end - 1) // granule + 1)}

    def zero_bytes(i: int) -> int:
        lo, hi = i * granule, min((i + 1) * granule, d.size)
        return sum(max(0, min(hi, e.end) - max(lo, e.offset)) for e in ext if e.zero)

    return every, {i for i in every if zero_bytes(i) == min((i + 1) * granule, d.size) - i * granule}


def test_a_snapshot_reads_the_disks_as_they_were_at_the_instant(source_rig: Rig) -> None:
    rig, g = source_rig, source_rig.vm.granule
    k0, k1 = rig.keys
    size1 = rig.shadows[k1].size
    rig.write(k0, 0, 3 * g + 100, 0x11)
    rig.write(k0, 6 * g, g, 0x22)
    rig.write(k1, size1 - 4096, 4096, 0x33)

    def guest_writes_on(snap: SnapshotRef) -> None:  # after the instant: the snapshot must not see them
        rig.write(k0, g, 2 * g, 0x99)  # over data
        rig.write(k0, 10 * g, 100, 0x98)  # into a hole
        rig.zero(k0, 6 * g, g)  # a zero write over data
        rig.write(k1, size1 - 4096, 10, 0x97)  # the other disk

    if rig.vm.refuses_writes_after_snapshot:  # never the wrong bytes: no point, and a new snapshot
        with pytest.raises(SnapshotInconsistent, match="written after snapshot s1"):
            rig.sync("s1", after_snapshot=guest_writes_on)
        assert rig.target().list_points() == []
        s1, at1 = rig.sync("s1")
    else:
        s1, at1 = rig.sync("s1", after_snapshot=guest_writes_on)
        assert rig.differs("s1", at1) == []
        assert rig.differs("s1", rig.now()) != []  # (the writes after the instant did change the disks)
    assert {k: r.kind for k, r in s1.results.items()} == {k0: "full", k1: "full"}
    assert rig.differs("s1", at1) == []

    rig.write(k0, 12 * g, 10, 0x96)
    s2, at2 = rig.sync("s2", s1.base)  # ... and the next sync has them
    assert {k: r.kind for k, r in s2.results.items()} == {k0: "incremental", k1: "incremental"}
    assert rig.differs("s2", at2) == []
    assert rig.differs("s1", at1) == []


def test_incremental_extents_are_exact_for_writes_and_zero_writes(source_rig: Rig) -> None:
    rig, g = source_rig, source_rig.vm.granule
    k0, k1 = rig.keys
    size1 = rig.shadows[k1].size
    rig.write(k0, 0, 4 * g, 0x11)
    rig.write(k0, 8 * g, g, 0x12)
    s1, _ = rig.sync("s1")

    rig.write(k0, 2 * g + 10, 100, 0x21)  # a small write: its whole granule
    rig.write(k0, 6 * g - 10, 20, 0x22)  # across a granule boundary: both granules
    rig.write(k0, 0, g, 0x11)  # the same bytes again: still written
    rig.zero(k0, 8 * g, g)  # a zero write over data
    rig.zero(k0, 12 * g, 2 * g)  # a zero write where nothing was
    rig.write(k1, size1 - 10, 10, 0x23)  # the last bytes of the other disk
    expected = {k0: {0, 2, 5, 6, 8, 12, 13}, k1: {(size1 - 1) // g}}
    zeros = {k0: {8, 12, 13}, k1: set()}

    src = rig.source()
    snap = src.create_snapshot("s2", s1.base)
    try:
        for key in rig.keys:
            assert snap.disk(key).tracking_lost is None
            every, zero = listed(src, snap, key, g)
            assert every == expected[key], key
            if rig.vm.zero_writes_listed_as_zero:
                assert zero == zeros[key], key
            else:
                assert zero <= zeros[key], key
    finally:
        src.release_snapshot(snap, committed=False)  # the base stays usable

    s2, at2 = rig.sync("s2", s1.base)
    assert {k: r.kind for k, r in s2.results.items()} == {k0: "incremental", k1: "incremental"}
    assert rig.differs("s2", at2) == []


@pytest.mark.parametrize("source_rig", DISCARDING_SOURCES, indirect=True)
def test_incremental_extents_are_exact_for_discards(source_rig: Rig) -> None:
    rig, g = source_rig, source_rig.vm.granule
    k0, k1 = rig.keys
    rig.write(k0, 0, 6 * g, 0x11)
    s1, _ = rig.sync("s1")

    rig.discard(k0, 2 * g, 2 * g)  # over data
    rig.discard(k1, 4 * g, g)  # where nothing was
    src = rig.source()
    snap = src.create_snapshot("s2", s1.base)
    try:
        assert listed(src, snap, k0, g) == ({2, 3}, {2, 3})
        assert listed(src, snap, k1, g) == ({4}, {4})
    finally:
        src.release_snapshot(snap, committed=False)
    s2, at2 = rig.sync("s2", s1.base)
    assert rig.differs("s2", at2) == []


def test_a_lost_base_is_tracking_lost_and_a_resync_never_a_silent_full(source_rig: Rig) -> None:
    rig, g = source_rig, source_rig.vm.granule
    k0, k1 = rig.keys
    rig.write(k0, 0, 4 * g, 0x11)
    rig.write(k1, 0, g, 0x12)
    s1, _ = rig.sync("s1")
    rig.write(k0, 3 * g, g, 0x21)
    rig.zero(k0, 0, g)
    rig.write(k1, g, 10, 0x22)
    rig.vm.lose_tracking(k0, s1.base[k0])  # type: ignore[arg-type]

    src = rig.source()
    snap = src.create_snapshot("s2", s1.base)
    try:
        d0, d1 = snap.disk(k0), snap.disk(k1)
        assert d0.base_change_id == s1.base[k0]
        assert d0.tracking_lost and "\n" not in d0.tracking_lost
        assert d1.tracking_lost is None
    finally:
        src.release_snapshot(snap, committed=False)

    s2, at2 = rig.sync("s2", s1.base)
    assert {k: r.kind for k, r in s2.results.items()} == {k0: "resync", k1: "incremental"}
    assert s2.point.kind == "resync"
    assert rig.differs("s2", at2) == []
    rig.write(k0, 5 * g, 10, 0x31)  # tracking records again from the resync's point
    s3, at3 = rig.sync("s3", s2.base)
    assert {k: r.kind for k, r in s3.results.items()} == {k0: "incremental", k1: "incremental"}
    assert rig.differs("s3", at3) == []


def test_extents_since_a_lost_base_raise_change_tracking_lost(
    source_rig: Rig, request: pytest.FixtureRequest
) -> None:
    """SourceDisk.extents: "Raises ChangeTrackingLost if the change id cannot be used": a copy that asks
    for changes since a base the snapshot reported lost, or since a change id that is not the disk's,
    must not get a listing, nor fail as anything else."""
    rig, g = source_rig, source_rig.vm.granule
    k0, _ = rig.keys
    rig.write(k0, 0, g, 0x11)
    s1, _ = rig.sync("s1")
    rig.vm.lose_tracking(k0, s1.base[k0])  # type: ignore[arg-type]
    src = rig.source()
    snap = src.create_snapshot("s2", s1.base)
    try:
        assert snap.disk(k0).tracking_lost
        with src.open_disk(snap, k0) as disk, pytest.raises(ChangeTrackingLost):
            list(disk.extents(s1.base[k0]))
        with src.open_disk(snap, k0) as disk, pytest.raises(ChangeTrackingLost):
            list(disk.extents("not-a-change-id-of-this-disk"))
    finally:
        src.release_snapshot(snap, committed=False)


def test_forget_is_idempotent_leaves_no_tracking_and_spares_other_jobs(source_rig: Rig) -> None:
    rig, g = source_rig, source_rig.vm.granule
    k0, _ = rig.keys
    other = f"{rig.job}-other"
    rig.write(k0, 0, 2 * g, 0x11)
    s1, _ = rig.sync("s1")
    o1, _ = rig.sync("o1", job=other)
    src = rig.source()
    src.create_snapshot("s2", s1.base)  # a sync that died: its snapshot was never released
    assert rig.vm.tracking_state(rig.job) != []

    src.forget()
    assert rig.vm.tracking_state(rig.job) == []
    src.forget()
    shutil.rmtree(rig.work, ignore_errors=True)  # forget_source removes the job's work files
    rig.source(fresh=True).forget()  # (a new activity, another worker)
    assert rig.vm.tracking_state(rig.job) == []

    snap = rig.source().create_snapshot("s3", s1.base)  # never an incremental from a forgotten base
    try:
        assert all(d.tracking_lost for d in snap.disks), [d.tracking_lost for d in snap.disks]
    finally:
        rig.source().release_snapshot(snap, committed=False)
        rig.source().forget()
    assert rig.vm.tracking_state(rig.job) == []

    assert rig.vm.tracking_state(other) != []  # the other job's tracking stayed, and works
    rig.write(k0, 3 * g, 10, 0x21)
    o2, at = rig.sync("o2", o1.base, job=other)
    assert {r.kind for r in o2.results.values()} == {"incremental"}
    assert rig.differs("o2", at, job=other) == []


@pytest.mark.parametrize("source_rig", RESIZABLE_SOURCES, indirect=True)
def test_a_resized_disk_is_copied_exactly(source_rig: Rig) -> None:
    rig, g = source_rig, source_rig.vm.granule
    k0, k1 = rig.keys
    size0, size1 = rig.shadows[k0].size, rig.shadows[k1].size
    rig.write(k0, 0, 2 * g, 0x11)
    rig.write(k1, size1 - 2 * g, 2 * g, 0x12)
    s1, _ = rig.sync("s1")

    rig.resize(k0, size0 + 16 * g)  # grown: zeros, then written
    rig.write(k0, size0 + 3 * g, 100, 0x21)
    rig.resize(k1, size1 - 4 * g)  # shrunk and grown back: the old tail must read zero
    rig.resize(k1, size1)
    s2, at2 = rig.sync("s2", s1.base)
    assert [d.size for d in s2.snap.disks] == [size0 + 16 * g, size1]
    assert rig.differs("s2", at2) == []
