"""Recovery points of a running real guest are crash-consistent and boot.

The bootable guest runs its workload (files written and synced in a loop, a sequence counter) in a
QEMU VM started by hand (`-drive file=...,if=virtio`, a QMP socket); the QMP source replicates it
while it writes, through the real activities (snapshot, copy, commit). Each point must pass e2fsck
after journal replay, hold a sequence number that never goes back from one point to the next, and
boot (from an overlay, so the point never changes) to the guest's ready marker with that sequence.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from helpers_kvm import file_digest
from temporalio.testing import ActivityEnvironment

from activities.replication import begin_and_copy
from connectors.kvm.spec import KvmSource, KvmTarget
from connectors.kvm.target import KvmTarget as Replicas
from labs.guest.build import build
from labs.guest.fscheck import check
from sendense.models import JobSpec, SnapshotRequest
from tools.boot import GuestVm, overlay

pytestmark = pytest.mark.slow
JOB = "guest"


def test_points_of_a_running_guest_are_consistent_and_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    short = Path(tempfile.mkdtemp(prefix="sd-g-"))  # unix socket paths stay short
    disk = overlay(build(), tmp_path / "vm.qcow2")
    spec = JobSpec(
        name=JOB,
        job_id="g1",
        source=KvmSource(platform="kvm", qmp=short / "qmp.sock"),
        target=KvmTarget(platform="kvm", path=tmp_path / "rep"),
    )
    replicas = Replicas(JOB, spec.target.path, job_id="g1")
    env = ActivityEnvironment()
    seqs: list[int] = []
    with GuestVm(disk, tmp_path / "vm", mode="workload", qmp=short / "qmp.sock") as vm:
        assert vm.wait_for("SENDENSE-GUEST-SEQ 25", timeout=240).ok, vm.text()[-400:]
        base: dict[str, str | None] = {}
        for n, until in ((1, 50), (2, 75)):
            req = SnapshotRequest(spec=spec, snapshot_id=f"p{n}", base=base, copy_up_to=1 << 40, finish=True)
            done = env.run(begin_and_copy, req)
            assert done.finished is not None, "the sync did not finish in its task"
            assert done.finished.point.kind == ("full" if n == 1 else "incremental")
            base = {d.key: d.change_id for d in done.snapshot.disks}
            assert vm.wait_for(f"SENDENSE-GUEST-SEQ {until}", timeout=240).ok  # the guest kept writing

    for n in (1, 2):
        [pd] = replicas.get_point(f"p{n}").disks
        point = Path(pd.path)
        before = file_digest(point)
        fs = check(point)
        assert fs.ok, f"point p{n}: {fs.detail}"
        assert fs.seq is not None and fs.seq >= 25
        seqs.append(fs.seq)
        with GuestVm(overlay(point, tmp_path / f"boot{n}.qcow2"), tmp_path / f"boot{n}") as booted:
            result = booted.wait_for(timeout=240)
        assert result.ok, f"point p{n} did not boot: {result.evidence}"
        assert result.seq == fs.seq  # it booted the filesystem the check saw
        assert file_digest(point) == before  # booting (journal replay) never changed the point
    assert seqs[1] > seqs[0]
