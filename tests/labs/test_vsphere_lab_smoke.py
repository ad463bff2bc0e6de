"""Smoke test of the vSphere lab's extended vcsim (labs/vsphere): pyvmomi over real SOAP/TLS.

Builds (or finds cached) vcsim-lab with labs/vsphere/build.sh, starts it on a free loopback port, logs in,
finds a VM, enables change tracking, records writes through the lab's control endpoint, takes a snapshot
and pages QueryChangedDiskAreas("*") the way vSphere pages (2 extents per reply by default).
Skipped when pyvmomi or the Debian Go packages are missing. Not wired into CI yet.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pyVmomi = pytest.importorskip("pyVmomi")
from pyVim.connect import Disconnect, SmartConnect  # noqa: E402
from pyVmomi import vim  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "labs" / "vsphere" / "build.sh"


def _wait_task(task, timeout=30.0):
    deadline = time.monotonic() + timeout
    while task.info.state not in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
        assert time.monotonic() < deadline, f"task {task} still {task.info.state}"
        time.sleep(0.05)
    if task.info.state == vim.TaskInfo.State.error:
        raise task.info.error
    return task.info.result


@pytest.fixture(scope="module")
def lab():
    if not shutil.which("go") or not Path("/usr/share/gocode/src/github.com/vmware/govmomi").is_dir():
        if os.geteuid() != 0:
            pytest.skip("needs Debian's golang-go and golang-github-vmware-govmomi-dev (labs/vsphere/build.sh)")
    out = subprocess.run(["bash", str(BUILD)], check=True, capture_output=True, text=True, timeout=600)
    binary = out.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen([binary, "-l", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("VCSIM_URL="), f"vcsim-lab said {line!r}: {proc.stderr.read() if proc.poll() is not None else ''}"
        url = urlsplit(line.removeprefix("VCSIM_URL="))
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_query_changed_disk_areas_star_is_paged(lab):
    si = SmartConnect(host=lab.hostname, port=lab.port, user=lab.username, pwd=lab.password,
                      disableSslCertValidation=True)
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        vm = sorted(view.view, key=lambda v: v.name)[0]
        view.Destroy()
        disk = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
        capacity = disk.capacityInBytes or disk.capacityInKB * 1024

        # Before tracking is on, a snapshot has no changeId and the query is refused with FileFault.
        snap0 = _wait_task(vm.CreateSnapshot_Task(name="before-cbt", description="", memory=False, quiesce=False))
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap0, deviceKey=disk.key, startOffset=0, changeId="*")

        _wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
        assert vm.config.changeTrackingEnabled

        # five separate writes (and one overlapping write that merges) -> five extents, 2 per reply
        writes = [(0, 4096), (65536, 8192), (69632, 8192), (262144, 4096), (524288, 65536), (900000, 1000)]
        ctx = ssl._create_unverified_context()
        for off, n in writes:
            req = urllib.request.Request(
                f"https://{lab.hostname}:{lab.port}/sendense-lab/write?vm={vm._moId}&key={disk.key}&offset={off}&length={n}",
                method="POST")
            with urllib.request.urlopen(req, context=ctx) as r:
                assert r.status == 204
        expected = [(0, 4096), (65536, 12288), (262144, 4096), (524288, 65536), (900000, 1000)]

        snap = _wait_task(vm.CreateSnapshot_Task(name="s1", description="", memory=False, quiesce=False))
        sdisk = next(d for d in snap.config.hardware.device if d.key == disk.key)
        change_id = sdisk.backing.changeId
        assert change_id and change_id.endswith("/2"), change_id  # s0 sealed epoch 1, s1 epoch 2
        assert not next(d for d in vm.config.hardware.device if d.key == disk.key).backing.changeId

        pages, areas, offset = [], [], 0
        while offset < capacity:
            info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=offset, changeId="*")
            assert info.startOffset == offset and info.length > 0
            pages.append(len(info.changedArea))
            areas += [(a.start, a.length) for a in info.changedArea]
            offset = info.startOffset + info.length
        assert pages == [2, 2, 1], pages  # paged: the lab's per-reply extent limit is 2
        assert areas == expected, areas

        # incremental from s1's changeId: nothing changed since -> one empty page covering the disk
        snap2 = _wait_task(vm.CreateSnapshot_Task(name="s2", description="", memory=False, quiesce=False))
        info = vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=disk.key, startOffset=0, changeId=change_id)
        assert info.changedArea == [] and info.length == capacity

        with pytest.raises(vim.fault.FileFault):  # a changeId of another tracking session
            vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=disk.key, startOffset=0,
                                     changeId="52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1")
    finally:
        Disconnect(si)
