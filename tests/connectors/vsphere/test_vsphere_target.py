"""The vSphere target against the lab, beyond the contract suite: what a user gets wrong (one line, no
placeholder half made), a VM of the placeholder's name that is not the job's (never written), points as
snapshots whose bytes later syncs and prunes never change, a disk added between syncs."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from helpers_kvm import MiB
from helpers_vsphere import name, snapshot_names, target_spec
from pyVmomi import vim

from connectors.vsphere.target import POINT_PREFIX, VsphereTargetConnector
from labs.vsphere import VsphereLab
from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.models import DiskInfo, PointDisk, PointInfo


def point(pid: str, disks: list[DiskInfo]) -> PointInfo:
    now = datetime.now(UTC)
    return PointInfo(
        point_id=pid,
        job="j",
        created_at=now,
        committed_at=now,
        kind="full",
        disks=[PointDisk(key=d.key, size=d.size, change_id="c") for d in disks],
    )


def find(lab: VsphereLab, vm_name: str) -> object | None:
    return lab.si().RetrieveContent().searchIndex.FindByInventoryPath(f"DC0/vm/{vm_name}")


def test_bad_places_are_one_line_and_nothing_is_made(vlab: VsphereLab) -> None:
    job = name("j")
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"datastore": "nope"}, ResourceNotFound, "target.datastore nope: no such datastore in DC0"),
        ({"datacenter": "DC9"}, ResourceNotFound, "target.datacenter DC9: no such datacenter"),
        ({"folder": "no/such"}, ResourceNotFound, "target.folder no/such: no such VM folder in DC0"),
        ({"cluster": "nope"}, ResourceNotFound, "target.cluster nope: no such cluster in DC0"),
        ({"esx_host": "esx-nope"}, ResourceNotFound, "target.esx_host esx-nope: no such host in DC0"),
    ]
    for over, kind, text in cases:
        t = VsphereTargetConnector(job, target_spec(vlab, **over), "id-1")
        with pytest.raises(kind, match=text) as ei:
            t.validate()
        assert "\n" not in str(ei.value)
        with pytest.raises(kind, match=text):
            t.prepare("s1", [DiskInfo(key="vda", size=4 * MiB)])
    assert find(vlab, f"sendense-{job}") is None


def test_a_vm_of_the_placeholders_name_that_is_not_the_jobs_is_never_written(vlab: VsphereLab) -> None:
    job = name("j")
    vlab.make_vm(f"sendense-{job}", [4 * MiB])  # someone's VM under the name the job would use
    t = VsphereTargetConnector(job, target_spec(vlab), "id-1")
    with pytest.raises(InvalidSpec, match=f"target.vm_name sendense-{job}: a VM of that name exists"):
        t.validate()
    with pytest.raises(InvalidSpec, match="is not this job's placeholder"):
        t.prepare("s1", [DiskInfo(key="vda", size=4 * MiB)])
    with pytest.raises(InvalidSpec):
        t.destroy()  # (never removed either)
    assert find(vlab, f"sendense-{job}") is not None
    other = VsphereTargetConnector(job, target_spec(vlab), "id-2")  # the same name, another job id
    with pytest.raises(InvalidSpec):
        other.list_points()


def test_a_disk_added_between_syncs_joins_the_placeholder_and_older_points_keep_theirs(
    vlab: VsphereLab,
) -> None:
    job = name("j")
    t = VsphereTargetConnector(job, target_spec(vlab, vm_name=f"r-{job}"), "id-1")
    one = [DiskInfo(key="vda", size=4 * MiB)]
    t.prepare("s1", one)
    t.commit("s1", point("p1", one))
    two = [*one, DiskInfo(key="vdb", size=2 * MiB + 512)]  # (not a whole KiB: the next one)
    t.prepare("s2", two)
    with t.open_disk("s2", "vdb") as d:
        assert d.size == 2 * MiB + 1024 and not d.has_base  # (new in this sync: nothing under it)
        w = d.connect()
        w.write(0, b"\x42" * 4096)
        w.flush()
    t.commit("s2", point("p2", two))
    pts = {p.point_id: [d.key for d in p.disks] for p in t.list_points()}
    assert pts == {"p2": ["vda", "vdb"], "p1": ["vda"]}
    vm = find(vlab, f"r-{job}")
    assert isinstance(vm, vim.VirtualMachine)
    assert snapshot_names(vm) == [POINT_PREFIX + "p1", POINT_PREFIX + "p2"]
    with pytest.raises(ResourceNotFound, match="no sync s2 in progress"):
        with t.open_disk("s2", "vda"):
            pass
    t.destroy()
    assert find(vlab, f"r-{job}") is None


def test_an_export_during_a_prune_of_older_points_reads_its_point_exactly(vlab: VsphereLab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Removing older points consolidates files under the exported point's chain while VDDK reads it:
    the export still reads the point as committed."""
    import threading

    job = name("j")
    t = VsphereTargetConnector(job, target_spec(vlab, vm_name=f"r-{job}"), "id-1")
    disks = [DiskInfo(key="vda", size=16 * MiB)]
    for n in range(1, 6):
        t.prepare(f"s{n}", disks)
        with t.open_disk(f"s{n}", "vda") as d:
            w = d.connect()
            w.write((n - 1) * 2 * MiB, bytes([0x10 + n]) * (3 * MiB))  # each over the last one's tail
            w.flush()
        t.commit(f"s{n}", point(f"p{n}", disks))
    expected = bytearray(16 * MiB)
    for n in range(1, 6):
        expected[(n - 1) * 2 * MiB : (n - 1) * 2 * MiB + 3 * MiB] = bytes([0x10 + n]) * (3 * MiB)
    errors: list[BaseException] = []

    def prune() -> None:
        try:
            t2 = VsphereTargetConnector(job, target_spec(vlab, vm_name=f"r-{job}"), "id-1")
            t2.prune(1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=prune)
    th.start()
    files = dict(t.export("p5", "raw", tmp_path / "x"))
    th.join()
    assert not errors, errors
    assert files["vda"].read_bytes() == bytes(expected)
    # a prune that saw the export's hold on p5 kept p4 (the point before a held one); with the hold
    # released, the next prune removes it
    left = [p.point_id for p in t.list_points()]
    assert left in (["p5"], ["p5", "p4"]), left
    t.prune(1)
    assert [p.point_id for p in t.list_points()] == ["p5"]
    t.destroy()


def test_a_disk_removed_and_back_under_its_key_starts_empty_and_older_points_keep_it(
    vlab: VsphereLab, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Found by the scenario runner: a source disk added back under a key an older point's disk had
    was written over that disk's old bytes (and synced as a resync)."""
    job = name("j")
    t = VsphereTargetConnector(job, target_spec(vlab, vm_name=f"r-{job}"), "id-1")
    a, b = DiskInfo(key="vda", size=4 * MiB), DiskInfo(key="vdb", size=2 * MiB)

    def sync(n: int, disks: list[DiskInfo], writes: dict[str, bytes]) -> None:
        t.prepare(f"s{n}", disks)
        for key, data in writes.items():
            with t.open_disk(f"s{n}", key) as d:
                assert d.has_base == (n > 1 and key == "vda")  # vdb is new in s1 and again in s3
                w = d.connect()
                w.write(0, data)
                w.flush()
        t.commit(f"s{n}", point(f"p{n}", disks))

    sync(1, [a, b], {"vda": b"\x11" * MiB, "vdb": b"\x22" * (2 * MiB)})
    sync(2, [a], {})
    sync(3, [a, b], {"vdb": b"\x33" * 4096})
    p3 = dict(t.export("p3", "raw", tmp_path / "p3"))
    assert p3["vdb"].read_bytes() == b"\x33" * 4096 + bytes(2 * MiB - 4096)
    p1 = dict(t.export("p1", "raw", tmp_path / "p1"))
    assert p1["vdb"].read_bytes() == b"\x22" * (2 * MiB)
    t.destroy()
