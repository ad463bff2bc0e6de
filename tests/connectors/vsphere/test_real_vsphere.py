"""The vSphere connectors against a real vCenter or ESXi, when the environment names one:

    SENDENSE_VSPHERE_TEST_SERVER=vcenter.example.com  SENDENSE_VSPHERE_TEST_THUMBPRINT=AA:BB:...
    SENDENSE_VSPHERE_TEST_VM=test-vm          (a powered-off or running VM it may snapshot)
    SENDENSE_VSPHERE_TEST_DATACENTER=DC1  SENDENSE_VSPHERE_TEST_DATASTORE=ds1   (the target's place)
    SENDENSE_VSPHERE_USER=...  SENDENSE_VSPHERE_PASSWORD=...
    SENDENSE_VDDK_LIBDIR=/opt/vmware-vix-disklib-distrib

Without them this module says so and skips. With them: the source finds the VM, takes a snapshot, lists
its allocated areas page by page and reads through VDDK, then an incremental from it (nothing written:
the areas vSphere lists may be empty or few), and removes its snapshots; the target makes a placeholder,
writes and commits two points, exports them bit-exact and removes everything it made.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers_kvm import MiB

from connectors.vsphere.source import VsphereSourceConnector
from connectors.vsphere.spec import VsphereSource, VsphereTarget
from connectors.vsphere.target import VsphereTargetConnector
from sendense.models import DiskInfo, PointDisk, PointInfo

ENV = {
    k: os.environ.get(f"SENDENSE_VSPHERE_TEST_{k}")
    for k in ("SERVER", "THUMBPRINT", "VM", "DATACENTER", "DATASTORE")
}
pytestmark = pytest.mark.skipif(
    not (ENV["SERVER"] and ENV["THUMBPRINT"] and os.environ.get("SENDENSE_VSPHERE_USER")),
    reason="no real vCenter: set SENDENSE_VSPHERE_TEST_SERVER, _THUMBPRINT, _VM, _DATACENTER, _DATASTORE, "
    "SENDENSE_VSPHERE_USER/_PASSWORD and SENDENSE_VDDK_LIBDIR to run these against one",
)


def test_real_source_snapshot_areas_and_bytes(tmp_path: Path) -> None:
    if not ENV["VM"]:
        pytest.skip("SENDENSE_VSPHERE_TEST_VM names no VM")
    spec = VsphereSource(platform="vsphere", server=ENV["SERVER"], thumbprint=ENV["THUMBPRINT"], vm=ENV["VM"])
    src = VsphereSourceConnector("sendense-test", spec, tmp_path)
    src.validate()
    info = src.discover()
    assert info.disks and info.vm_id
    s1 = src.create_snapshot("t1", {})
    try:
        key = s1.disks[0].key
        with src.open_disk(s1, key) as disk:
            ext = list(disk.extents(None))
            assert ext and ext[-1].end == disk.size
            r = disk.connect()
            try:
                assert len(r.read(0, 4096)) == 4096
            finally:
                r.close()
    finally:
        src.release_snapshot(s1, committed=True)
    s2 = src.create_snapshot("t2", {d.key: d.change_id for d in s1.disks})
    try:
        assert all(d.tracking_lost is None for d in s2.disks), [d.tracking_lost for d in s2.disks]
        with src.open_disk(s2, s2.disks[0].key) as disk:
            list(disk.extents(s1.disks[0].change_id))
    finally:
        src.release_snapshot(s2, committed=False)
        src.forget()


def test_real_target_points_round_trip(tmp_path: Path) -> None:
    if not (ENV["DATACENTER"] and ENV["DATASTORE"]):
        pytest.skip("SENDENSE_VSPHERE_TEST_DATACENTER/_DATASTORE name no place for a placeholder")
    spec = VsphereTarget(
        platform="vsphere",
        server=ENV["SERVER"] or "",
        thumbprint=ENV["THUMBPRINT"],
        datacenter=ENV["DATACENTER"],
        datastore=ENV["DATASTORE"] or "",
    )
    t = VsphereTargetConnector("sendense-test", spec, "test-job-id")
    t.validate()
    disks = [DiskInfo(key="disk0", size=8 * MiB)]
    try:
        for n, byte in ((1, 0x11), (2, 0x22)):
            t.prepare(f"s{n}", disks)
            with t.open_disk(f"s{n}", "disk0") as d:
                w = d.connect()
                w.write((n - 1) * MiB, bytes([byte]) * MiB)
                w.flush()
            now = datetime.now(UTC)
            pd = [PointDisk(key="disk0", size=8 * MiB, change_id="c")]
            t.commit(
                f"s{n}",
                PointInfo(
                    point_id=f"p{n}",
                    job="sendense-test",
                    created_at=now,
                    committed_at=now,
                    kind="full",
                    disks=pd,
                ),
            )
        files = dict(t.export("p2", "raw", tmp_path / "x"))
        data = files["disk0"].read_bytes()
        assert data[:MiB] == b"\x11" * MiB and data[MiB : 2 * MiB] == b"\x22" * MiB
        assert data[2 * MiB :] == bytes(6 * MiB)
    finally:
        t.destroy()
