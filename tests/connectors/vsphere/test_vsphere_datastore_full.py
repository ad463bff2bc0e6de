"""A vSphere target whose datastore fills up (a lab whose datastore directory is a 24 MiB tmpfs): the sync
fails in one line naming the datastore, and nothing is left half-made: before the first point the
placeholder goes; after it, the unfinished sync's writes go with the reverted delta and the points
read exactly as before."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_kvm import MiB, make_qcow2, qemu_io, sync_point
from helpers_vsphere import target_spec, vsphere_agent_env

from connectors.kvm.offline import OfflineQcow2Source
from connectors.vsphere import session
from connectors.vsphere.target import VsphereTargetConnector
from labs.vsphere import VsphereLab
from sendense.errors import SendenseError

pytestmark = pytest.mark.root  # mounts a tmpfs over the lab's datastore (fails, never skips, without root)


@pytest.fixture
def small_lab() -> Iterator[VsphereLab]:
    with VsphereLab(vms=0) as lab, vsphere_agent_env(lab):
        ds = lab.datastores["LocalDS_0"]
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(ds)], check=True)
        session._sessions.clear()
        try:
            yield lab
        finally:
            session._sessions.clear()
            subprocess.run(["umount", "-l", str(ds)], check=False)


def _used(lab: VsphereLab) -> int:
    st = os.statvfs(lab.datastores["LocalDS_0"])
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _digest(tgt: VsphereTargetConnector, point: str, out: Path) -> str:
    [(_, f)] = tgt.export(point, "raw", out)
    h = hashlib.sha256(f.read_bytes()).hexdigest()
    shutil.rmtree(out)
    return h


def test_a_full_datastore_fails_the_sync_in_one_line_and_leaves_nothing_half_made(
    small_lab: VsphereLab, tmp_path: Path
) -> None:
    lab = small_lab
    disk = make_qcow2(tmp_path / "d.qcow2", 64 * MiB)
    qemu_io(disk, "write -P 0x11 0 4M")
    src = OfflineQcow2Source("full", [disk])
    tgt = VsphereTargetConnector("full", target_spec(lab), "j-full")
    empty = _used(lab)

    qemu_io(disk, "write -P 0x22 8M 40M")  # more than the datastore holds
    with pytest.raises(SendenseError) as ei:
        sync_point(src, tgt, "p0")
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert "target datastore LocalDS_0 (placeholder VM sendense-full disk disk0) is full" in msg, msg
    assert tgt.list_points() == [] and tgt._placeholder() is None  # the first sync's placeholder went
    assert _used(lab) <= empty + 1 * MiB

    qemu_io(disk, "write -z 8M 40M")
    p1 = sync_point(src, tgt, "p1")
    before = _digest(tgt, "p1", tmp_path / "x1")
    used_p1 = _used(lab)
    qemu_io(disk, "write -P 0x33 8M 40M")
    with pytest.raises(SendenseError) as ei:
        sync_point(src, tgt, "p2", p1.base)
    assert "\n" not in str(ei.value) and "target datastore LocalDS_0" in str(ei.value), str(ei.value)
    assert [p.point_id for p in tgt.list_points()] == ["p1"]
    assert _digest(tgt, "p1", tmp_path / "x2") == before  # the point reads as before
    assert _used(lab) <= used_p1 + 1 * MiB  # the unfinished sync's writes went with its delta
    tgt.destroy()
