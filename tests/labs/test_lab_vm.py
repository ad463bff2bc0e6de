"""The lab VM: a real QEMU whose disks are written like a guest's, with a shadow of every write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_kvm import KiB, MiB, same_content

from labs.kvm.vm import LabVm, Workload
from sendense.errors import SendenseError
from tools.qmp import QmpClient


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sdlab-", dir="/tmp"))  # short: unix socket paths < 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_vm(vm_dir: Path) -> Iterator[Callable[..., LabVm]]:
    vms: list[LabVm] = []

    def make(sizes: list[int], **kw: object) -> LabVm:
        vm = LabVm(vm_dir / f"vm{len(vms)}", sizes, **kw)  # type: ignore[arg-type]
        vms.append(vm)
        return vm.start()

    yield make
    for vm in vms:
        vm.kill()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split()[2] != "Z"


def bitmaps_in_image(path: Path) -> dict[str, list[str]]:
    p = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, check=True
    )
    data = json.loads(p.stdout).get("format-specific", {}).get("data", {})
    return {b["name"]: b.get("flags", []) for b in data.get("bitmaps", [])}


def test_start_write_stop_matches_the_shadow_and_leaves_nothing(make_vm: Callable[..., LabVm]) -> None:
    vm = make_vm([32 * MiB, 48 * MiB], shadow=True)
    pid = int(vm.pidfile.read_text())
    assert alive(pid) and vm.running
    with QmpClient(vm.qmp_path) as c:
        assert [b["inserted"]["node-name"] for b in c.execute("query-block")] == ["disk0", "disk1"]
        assert [b["qdev"] for b in c.execute("query-block")] == [vm.device(0), vm.device(1)]
    vm.write(0, 0, 0x11, 1 * MiB)
    vm.write(0, 3 * MiB + 512, b"\x01" * 1000 + b"\x02" * 3000)  # unaligned, bytes as runs
    vm.write(1, 40 * MiB, 0xFF, 64 * KiB)
    vm.write(0, 256 * KiB, 0x22, 64 * KiB)
    vm.write_zeroes(0, 128 * KiB, 64 * KiB)  # zero write over data
    assert (
        vm.shadow_path(0).read_bytes()[3 * MiB + 512 : 3 * MiB + 512 + 4000]
        == b"\x01" * 1000 + b"\x02" * 3000
    )
    vm.stop()
    assert not vm.running and not alive(pid)
    assert not vm.qmp_path.exists() and not vm.pidfile.exists()
    for i in range(2):
        assert same_content(vm.disk_path(i), vm.shadow_path(i))


def test_raw_disks_drives_and_swapped_disks_follow_their_shadows(make_vm: Callable[..., LabVm]) -> None:
    """`formats` (raw), `drive=True` (-drive if=virtio, automatic node names) and `swap` as the QMP
    source tests use them: the images hold what the shadows say, whichever device wrote them."""
    vm = make_vm([8 * MiB, 8 * MiB], shadow=True, formats=["raw", "qcow2"], drive=True)
    with QmpClient(vm.qmp_path) as c:
        blocks = c.execute("query-block")
    assert [b["device"] for b in blocks] == ["virtio0", "virtio1"]
    assert [b["inserted"]["drv"] for b in blocks] == ["raw", "qcow2"]
    assert all(b["inserted"]["node-name"].startswith("#") for b in blocks)
    assert vm.disk_path(0).suffix == ".img"
    vm.write(0, 1 * MiB, 0x11, 64 * KiB)
    vm.write(1, 2 * MiB, 0x22, 64 * KiB)
    with pytest.raises(SendenseError, match="stop it"):
        vm.swap(0, 1)
    vm.stop()
    vm.swap(0, 1)
    vm.start()
    assert vm.image_of(0) == vm.disk_path(1)
    vm.write(0, 3 * MiB, 0x33, 64 * KiB)  # device 0 now writes image 1
    vm.stop()
    assert vm.shadow_path(1).read_bytes()[3 * MiB : 3 * MiB + 4] == b"\x33" * 4
    for i in range(2):
        assert same_content(vm.disk_path(i), vm.shadow_path(i))


def test_writes_are_checked(make_vm: Callable[..., LabVm]) -> None:
    vm = make_vm([32 * MiB])
    with pytest.raises(ValueError, match="beyond the end of disk0"):
        vm.write(0, 32 * MiB - 4 * KiB, 0x11, 8 * KiB)
    with pytest.raises(ValueError, match="beyond the end"):
        vm.write_zeroes(0, 32 * MiB, 1)
    with pytest.raises(SendenseError, match="not found"):
        vm.qemu_io(3, "write 0 4k")  # no such device
    with pytest.raises(SendenseError, match="created without shadow"):
        vm.snapshot_shadow(0, vm.dir / "x.raw")


def test_resize_grows_disk_and_shadow(make_vm: Callable[..., LabVm]) -> None:
    vm = make_vm([32 * MiB], shadow=True)
    vm.write(0, 0, 0x11, 64 * KiB)
    vm.resize(0, 64 * MiB)
    vm.write(0, 63 * MiB, 0x22, 1 * MiB)
    with QmpClient(vm.qmp_path) as c:
        assert c.execute("query-block")[0]["inserted"]["image"]["virtual-size"] == 64 * MiB
    vm.stop()
    assert vm.shadow_path(0).stat().st_size == 64 * MiB
    assert same_content(vm.disk_path(0), vm.shadow_path(0))


def test_persistent_bitmaps_survive_stop_and_break_on_kill(make_vm: Callable[..., LabVm]) -> None:
    vm = make_vm([32 * MiB])
    with QmpClient(vm.qmp_path) as c:
        c.execute("block-dirty-bitmap-add", node="disk0", name="b1", persistent=True)
    vm.write(0, 0, 0x11, 64 * KiB)
    vm.stop()  # quit over QMP stores the bitmap
    assert bitmaps_in_image(vm.disk_path(0)) == {"b1": ["auto"]}
    vm.start()
    pid = int(vm.pidfile.read_text())
    vm.kill()
    assert not alive(pid) and not vm.running
    assert "in-use" in bitmaps_in_image(vm.disk_path(0))["b1"]
    vm.start()
    with QmpClient(vm.qmp_path) as c:
        nodes = {n["node-name"]: n for n in c.execute("query-named-block-nodes", flat=True)}
    assert nodes["disk0"]["dirty-bitmaps"][0]["inconsistent"] is True


def test_workload_writes_in_the_background_and_the_shadow_follows(make_vm: Callable[..., LabVm]) -> None:
    vm = make_vm([32 * MiB, 32 * MiB], shadow=True)
    with Workload(vm, block_size=64 * KiB, rate=None, zero_fraction=0.2, seed=7) as load:
        time.sleep(0.3)
        with vm.frozen():
            frozen_at = load.writes
            snap = vm.snapshot_shadow(1, vm.dir / "mid.raw")
            time.sleep(0.1)
            assert load.writes == frozen_at  # writes wait while frozen
        time.sleep(0.2)
    assert load.writes > frozen_at > 0 and load.bytes_written == load.writes * 64 * KiB
    assert snap.stat().st_size == 32 * MiB
    vm.stop()
    for i in range(2):
        assert same_content(vm.disk_path(i), vm.shadow_path(i))


def test_a_killed_test_process_takes_qemu_with_it(vm_dir: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from labs.kvm.vm import LabVm; "
        f"vm = LabVm(Path('{vm_dir}/orphan'), [16 << 20]).start(); "
        "print(vm.pidfile.read_text().strip(), flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert alive(pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
