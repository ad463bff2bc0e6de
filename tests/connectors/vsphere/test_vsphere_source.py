"""The vSphere source against the lab: what a user gets wrong (one line each, nothing left behind),
change tracking switched on when it is off, a retried snapshot step, snapshots that are not this
job's, CBT paging (the lab answers two areas per reply), and a disk grown between syncs."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from helpers_kvm import KiB, MiB
from helpers_vsphere import guest_io, name, snapshot_names, source_spec
from pyVmomi import vim

from connectors.vsphere.session import extra_config
from connectors.vsphere.source import VsphereSourceConnector, job_key
from labs.vsphere import VsphereLab
from sendense.errors import InvalidSpec, NotAllowed, ResourceNotFound, ServerUnreachable

G = 64 * KiB  # the lab's tracking block


def connector(
    lab: VsphereLab, vm: str, tmp_path: Path, job: str = "j1", **over: object
) -> VsphereSourceConnector:
    return VsphereSourceConnector(job, source_spec(lab, vm, **over), tmp_path / "work")


def snapshots(lab: VsphereLab, moref: str) -> list[str]:
    return snapshot_names(lab.vm(moref))


def test_bad_input_is_one_line_naming_what_the_user_gave(
    vlab: VsphereLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    vm = name()
    vlab.make_vm(vm, [4 * MiB])
    cases: list[tuple[type[Exception], str, VsphereSourceConnector]] = [
        (ResourceNotFound, "source.vm no-such-vm: no such VM", connector(vlab, "no-such-vm", tmp_path)),
        (ResourceNotFound, "source.vm vm-99999: no such VM", connector(vlab, "vm-99999", tmp_path)),
        (
            NotAllowed,
            "does not match source.thumbprint",
            connector(vlab, vm, tmp_path, thumbprint=":".join(["AB"] * 20)),
        ),
    ]
    for kind, text, c in cases:
        with pytest.raises(kind, match=text) as ei:
            c.validate()
        assert "\n" not in str(ei.value)

    secret = "wrong-password-Zq81"
    monkeypatch.setenv("SENDENSE_VSPHERE_PASSWORD", secret)
    with pytest.raises(NotAllowed, match="login 'default' refused: wrong user or password") as ei:
        connector(vlab, vm, tmp_path).validate()
    assert secret not in str(ei.value) and secret not in caplog.text

    monkeypatch.delenv("SENDENSE_VSPHERE_USER")
    with pytest.raises(InvalidSpec, match="set SENDENSE_VSPHERE_USER and SENDENSE_VSPHERE_PASSWORD"):
        connector(vlab, vm, tmp_path).validate()

    monkeypatch.setenv("SENDENSE_VSPHERE_USER", vlab.user)
    monkeypatch.setenv("SENDENSE_VSPHERE_PASSWORD", vlab.password)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerUnreachable, match=f"vSphere 127.0.0.1:{port}: cannot connect"):
        connector(vlab, vm, tmp_path, server=f"127.0.0.1:{port}").validate()


def test_change_tracking_is_enabled_when_off_and_the_first_sync_is_full(
    vlab: VsphereLab, tmp_path: Path
) -> None:
    vm = name()
    moref = vlab.make_vm(vm, [4 * MiB], cbt=False)
    assert not vlab.vm(moref).config.changeTrackingEnabled
    guest_io(vlab, moref, 0, "write -P 0x11 0 128k")
    src = connector(vlab, vm, tmp_path)
    snap = src.create_snapshot("s1", {})
    try:
        assert vlab.vm(moref).config.changeTrackingEnabled
        assert snap.notes == [  # said in job status (the sync's notes)
            f"change tracking (CBT) was off on VM {vm}: enabled; it takes effect at this sync's snapshot"
        ]
        d = snap.disk("scsi0-0")
        assert d.base_change_id is None and d.tracking_lost is None
        assert "/" in d.change_id and d.change_id.endswith(f"@{4 * MiB}")
        with src.open_disk(snap, "scsi0-0") as disk:
            data = [(e.offset, e.length) for e in disk.extents(None) if not e.zero]
            assert data == [(0, 128 * KiB)]
            r = disk.connect()
            try:
                assert r.read(0, 4096) == b"\x11" * 4096
            finally:
                r.close()
    finally:
        src.release_snapshot(snap, committed=True)
    assert snapshots(vlab, moref) == []


def test_a_retried_snapshot_step_reuses_it_and_only_this_jobs_leftovers_go(
    vlab: VsphereLab, tmp_path: Path
) -> None:
    vm = name()
    moref = vlab.make_vm(vm, [4 * MiB])
    vlab.wait(vlab.vm(moref).CreateSnapshot_Task(name="before-upgrade", memory=False, quiesce=False))
    src = connector(vlab, vm, tmp_path)
    crashed = src.create_snapshot("s1", {})  # a sync that died before releasing
    other = connector(vlab, vm, tmp_path, job="j2")
    theirs = other.create_snapshot("s1", {})
    s2 = src.create_snapshot("s2", {})
    again = src.create_snapshot("s2", {})  # the step retried: the same snapshot
    assert again.handle == s2.handle and again.created_at == s2.created_at
    assert snapshots(vlab, moref) == ["before-upgrade", "sendense-j1-s2", "sendense-j2-s1"]
    assert crashed.handle != s2.handle
    src.release_snapshot(s2, committed=True)
    src.release_snapshot(s2, committed=True)  # again: no error
    src.forget()
    assert snapshots(vlab, moref) == ["before-upgrade", "sendense-j2-s1"]
    assert job_key("j1") not in extra_config(vlab.vm(moref)) and job_key("j2") in extra_config(vlab.vm(moref))
    other.release_snapshot(theirs, committed=True)


def test_incremental_lists_exactly_the_written_blocks_across_pages(vlab: VsphereLab, tmp_path: Path) -> None:
    """Seven separate areas: the lab answers two per QueryChangedDiskAreas reply, so four pages."""
    vm = name()
    moref = vlab.make_vm(vm, [8 * MiB])
    guest_io(vlab, moref, 0, "write -P 0x11 0 1M")
    src = connector(vlab, vm, tmp_path)
    s1 = src.create_snapshot("s1", {})
    src.release_snapshot(s1, committed=True)
    base = {d.key: d.change_id for d in s1.disks}
    blocks = [2, 5, 17, 30, 64, 90, 127]
    guest_io(vlab, moref, 0, *(f"write -P 0x{0x20 + i:02x} {b * G + 100} 10" for i, b in enumerate(blocks)))
    s2 = src.create_snapshot("s2", base)
    try:
        assert s2.disk("scsi0-0").tracking_lost is None
        with src.open_disk(s2, "scsi0-0") as disk:
            got = sorted({e.offset // G for e in disk.extents(base["scsi0-0"])})
            assert got == blocks
            assert sum(e.length for e in disk.extents(base["scsi0-0"])) == len(blocks) * G
            # from the middle of a page (a resumed copy)
            assert sorted({e.offset // G for e in disk.extents(base["scsi0-0"], start=20 * G)}) == blocks[3:]
    finally:
        src.release_snapshot(s2, committed=False)


def test_a_reset_is_tracking_lost_with_the_reason(vlab: VsphereLab, tmp_path: Path) -> None:
    vm = name()
    moref = vlab.make_vm(vm, [4 * MiB])
    src = connector(vlab, vm, tmp_path)
    s1 = src.create_snapshot("s1", {})
    src.release_snapshot(s1, committed=True)
    for on in (False, True):  # disabled and enabled again
        vlab.wait(vlab.vm(moref).ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=on)))
    s2 = src.create_snapshot("s2", {d.key: d.change_id for d in s1.disks})
    try:
        lost = s2.disk("scsi0-0").tracking_lost
        assert lost is not None and "reset" in lost and "\n" not in lost
    finally:
        src.release_snapshot(s2, committed=False)


def test_old_virtual_hardware_is_refused_in_one_line_and_nothing_is_made(
    vlab: VsphereLab, tmp_path: Path
) -> None:
    vm = name()
    moref = vlab.make_vm(vm, [4 * MiB], cbt=False, version="vmx-04")
    src = connector(vlab, vm, tmp_path)
    with pytest.raises(
        InvalidSpec, match=f"source.vm {vm}: virtual hardware vmx-04 cannot track changed blocks"
    ):
        src.validate()
    with pytest.raises(InvalidSpec, match="vmx-04"):
        src.create_snapshot("s1", {})
    assert snapshots(vlab, moref) == [] and not vlab.vm(moref).config.changeTrackingEnabled


def test_two_jobs_on_one_vm_read_their_snapshots_while_the_other_releases(
    vlab: VsphereLab, tmp_path: Path
) -> None:
    """Removing one job's snapshot consolidates the chain the other job's snapshot reads through (and
    renames its files): the other job still opens and reads its snapshot exactly."""
    vm = name()
    moref = vlab.make_vm(vm, [8 * MiB])
    guest_io(vlab, moref, 0, "write -P 0x11 0 2M")
    a, b = connector(vlab, vm, tmp_path, job="ja"), connector(vlab, vm, tmp_path, job="jb")
    sa = a.create_snapshot("s1", {})
    guest_io(vlab, moref, 0, "write -P 0x22 1M 2M")
    sb = b.create_snapshot("s1", {})
    guest_io(vlab, moref, 0, "write -P 0x33 0 8M")  # after both: neither sees it
    expected = b"\x11" * MiB + b"\x22" * (2 * MiB) + bytes(5 * MiB)
    a.release_snapshot(sa, committed=True)  # consolidates: jb's snapshot file is renamed
    with b.open_disk(sb, "scsi0-0") as disk:
        r = disk.connect()
        try:
            assert r.read(0, 8 * MiB) == expected
        finally:
            r.close()
    b.release_snapshot(sb, committed=True)
    assert snapshots(vlab, moref) == []


def test_a_disk_grown_between_syncs_is_an_incremental_plus_what_the_grown_part_holds(
    vlab: VsphereLab, tmp_path: Path
) -> None:
    """The user extends a disk between syncs (ReconfigVM_Task edit of its capacity; vSphere allows it
    only without snapshots, which the job leaves none of): the next sync reads the blocks changed
    within the old size (CBT from the old changeId, which stays valid) and what the grown part holds,
    and the replica grows to equal the disk."""
    import subprocess

    from helpers_kvm import sync_point
    from helpers_vsphere import disk_image

    from connectors.kvm.target import KvmTarget

    vm = name()
    moref = vlab.make_vm(vm, [4 * MiB, 2 * MiB])
    guest_io(vlab, moref, 0, "write -P 0x11 0 1M")
    src = connector(vlab, vm, tmp_path)
    tgt = KvmTarget("j1", tmp_path / "replicas", job_id="g1")
    s1 = sync_point(src, tgt, "p1")
    v = vlab.vm(moref)
    disk = next(
        d for d in v.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk) and d.unitNumber == 0
    )
    disk.capacityInBytes, disk.capacityInKB = 6 * MiB, 6 * MiB // 1024
    vlab.wait(
        v.ReconfigVM_Task(
            spec=vim.vm.ConfigSpec(
                deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)]
            )
        )
    )
    guest_io(vlab, moref, 0, "write -P 0x22 1M 4k", "write -P 0x33 5M 4k")
    s2 = sync_point(src, tgt, "p2", s1.base)
    d0 = s2.snap.disk("scsi0-0")
    assert d0.size == 6 * MiB and d0.base_change_id == s1.base["scsi0-0"] and d0.tracking_lost is None
    assert s2.results["scsi0-0"].kind == "incremental"
    assert s2.results["scsi0-0"].stats.bytes_read == 2 * G  # the changed block and the grown part's one
    assert s2.results["scsi0-1"].stats.bytes_read == 0
    want = disk_image(vlab, moref, 0, tmp_path / "want.raw")
    got = tmp_path / "got.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(tgt.point_path("p2", "scsi0-0")), str(got)], check=True
    )
    assert got.read_bytes() == want.read_bytes()
    assert snapshots(vlab, moref) == []
