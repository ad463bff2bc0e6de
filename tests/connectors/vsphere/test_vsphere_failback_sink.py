"""Failback onto a vSphere source (connectors/vsphere/failback_sink.py) against the lab: a VM with two
disks replicated to a KVM target (p1), then what the source wrote after the point and what reverse
writes put into it (through the VDDK stand-in, in place) are both what `diverged` lists from p1's
change id, the bytes land in the VM's disk, the question snapshot goes, and the next forward sync is
an incremental of exactly those blocks. A running VM and a reset change tracking are refused in one
line each."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers_kvm import KiB, MiB, sync_point
from helpers_vsphere import disk_image, guest_io, name, snapshot_names, source_spec
from pyVmomi import vim

from connectors.kvm.target import KvmTarget
from connectors.vsphere.failback_sink import VsphereFailbackSink
from connectors.vsphere.source import VsphereSourceConnector
from labs.vsphere import VsphereLab
from sendense import platforms
from sendense.datapath.extents import Extent
from sendense.errors import ChangeTrackingLost, ResourceUnavailable
from sendense.models import JobSpec
from sendense.protocols import FailbackSink

G = 64 * KiB  # the lab's tracking block


def _snapshots(lab: VsphereLab, moref: str) -> list[str]:
    return snapshot_names(lab.vm(moref))


def test_reverse_writes_land_in_place_and_the_next_forward_sync_is_an_incremental_of_them(
    vlab: VsphereLab, tmp_path: Path
) -> None:
    vm = name("fb")
    moref = vlab.make_vm(vm, [8 * MiB, 4 * MiB])
    guest_io(vlab, moref, 0, "write -P 0x11 0 1M")
    spec = source_spec(vlab, vm)
    src = VsphereSourceConnector("fbj", spec, tmp_path / "work")
    tgt = KvmTarget("fbj", tmp_path / "replicas", job_id="j1")
    s1 = sync_point(src, tgt, "p1")
    since = s1.base
    assert set(since) == {"scsi0-0", "scsi0-1"}

    job_spec = JobSpec.model_validate(
        {"name": "fbj", "source": spec.model_dump(mode="json", exclude_none=True),
         "target": {"platform": "kvm", "path": str(tmp_path / "replicas")}}
    )  # fmt: skip
    sink = platforms.failback_sink_for(job_spec, tmp_path / "work")
    assert isinstance(sink, VsphereFailbackSink) and isinstance(sink, FailbackSink)
    assert [d.key for d in sink.disks()] == ["scsi0-0", "scsi0-1"]
    guest_io(vlab, moref, 0, "write -P 0x55 1M 4k")  # the source went its own way after p1
    assert list(sink.diverged("scsi0-0", since["scsi0-0"] or "")) == [Extent(1 * MiB, G)]
    assert list(sink.diverged("scsi0-1", since["scsi0-1"] or "")) == []

    with sink.open_disk("scsi0-0") as d:  # a reverse sync's writes, in place
        w = d.connect()
        w.write(3 * MiB, b"\x66" * 4096)
        w.zero(0, 4096)
        w.flush()
    assert list(sink.diverged("scsi0-0", since["scsi0-0"] or "")) == [
        Extent(0, G),
        Extent(1 * MiB, G),
        Extent(3 * MiB, G),
    ]
    assert _snapshots(vlab, moref) == []  # the question snapshots went
    img = disk_image(vlab, moref, 0, tmp_path / "now.raw").read_bytes()
    assert img[:4096] == bytes(4096) and img[4096:G] == b"\x11" * (G - 4096)
    assert img[3 * MiB : 3 * MiB + 4096] == b"\x66" * 4096 and img[1 * MiB : 1 * MiB + 4096] == b"\x55" * 4096

    s2 = sync_point(src, tgt, "p2", since)  # after failback: from the job's change ids before it
    assert {r.kind for r in s2.results.values()} == {"incremental"}
    assert s2.results["scsi0-0"].stats.bytes_read == 3 * G and s2.results["scsi0-1"].stats.bytes_read == 0
    replica = tmp_path / "p2.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(tgt.point_path("p2", "scsi0-0")), str(replica)], check=True
    )
    assert replica.read_bytes() == img
    sink.cleanup()


def test_a_running_source_and_a_reset_tracking_are_one_line_each(vlab: VsphereLab, tmp_path: Path) -> None:
    vm = name("fb")
    moref = vlab.make_vm(vm, [4 * MiB])
    spec = source_spec(vlab, vm)
    src = VsphereSourceConnector("fbk", spec, tmp_path / "work")
    s1 = sync_point(src, KvmTarget("fbk", tmp_path / "replicas", job_id="j2"), "p1")
    sink = VsphereFailbackSink("fbk", spec, tmp_path / "work")
    v = vlab.vm(moref)
    vlab.wait(v.PowerOnVM_Task())
    try:
        with pytest.raises(ResourceUnavailable, match=rf"source.vm {vm} is poweredOn: failback writes") as ei:
            with sink.open_disk("scsi0-0"):
                pass
        assert "\n" not in str(ei.value)
    finally:
        vlab.wait(v.PowerOffVM_Task())
    key = next(d.key for d in v.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    vlab.reset_tracking(moref, key)
    with pytest.raises(ChangeTrackingLost, match=f"source.vm {vm} disk scsi0-0: "):
        list(sink.diverged("scsi0-0", s1.base["scsi0-0"] or ""))
    assert _snapshots(vlab, moref) == []
