"""VM hardware in VmInfo (issue 10 item 4): what a VM made from a point must look like, discovered
from a running QEMU over QMP, from a libvirt domain's XML, and given in the spec for a stopped VM."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_kvm import MiB, make_qcow2

from connectors.kvm.hardware import libvirt_hardware, nics_of
from connectors.kvm.live import QmpSource
from connectors.kvm.offline import OfflineQcow2Source
from connectors.kvm.spec import KvmSource
from sendense.models import DiskInfo
from tools.qemu import die_with_parent, tool


@pytest.fixture
def qemu_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A stopped (-S) QEMU with 2 vCPUs, 300 MiB, a virtio disk, a SCSI disk that boots first, and a
    virtio NIC with a fixed MAC on a user network."""
    d = Path(tmp_path_factory.mktemp("hw", numbered=True))
    a, b = make_qcow2(d / "a.qcow2", 4 * MiB), make_qcow2(d / "b.qcow2", 8 * MiB)
    sock = d / "qmp.sock"
    cmd = [
        tool("qemu-system-x86_64"), *"-S -nodefaults -machine pc -accel tcg -display none".split(),
        "-smp", "2", "-m", "300",
        "-blockdev", f"driver=file,filename={a},node-name=disk0-file",
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=vd0,bootindex=2",
        "-blockdev", f"driver=file,filename={b},node-name=disk1-file",
        "-blockdev", "driver=qcow2,file=disk1-file,node-name=disk1",
        "-device", "virtio-scsi-pci,id=scsi0",
        "-device", "scsi-hd,drive=disk1,bus=scsi0.0,id=sd0,bootindex=1",
        "-netdev", "user,id=net0,restrict=on",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
        "-qmp", f"unix:{sock},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(die_with_parent(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "QEMU did not start"
        time.sleep(0.05)
    try:
        yield sock
    finally:
        proc.kill()
        proc.wait()


def test_a_running_vms_hardware_is_asked_of_qemu(qemu_vm: Path, tmp_path: Path) -> None:
    vm = QmpSource("hwjob", qemu_vm, tmp_path / "work").discover()
    assert (vm.cpus, vm.memory_mib, vm.firmware) == (2, 300, "bios")
    assert [(d.key, d.size, d.bus, d.boot_order) for d in vm.disks] == [
        ("disk0", 4 * MiB, "virtio", 2),
        ("disk1", 8 * MiB, "scsi", 1),
    ]
    assert [(n.mac, n.model, n.network) for n in vm.nics] == [("52:54:00:12:34:56", "virtio", "user:net0")]


def test_a_stopped_vms_hardware_comes_from_the_spec(tmp_path: Path) -> None:
    a, b = make_qcow2(tmp_path / "a.qcow2", 4 * MiB), make_qcow2(tmp_path / "b.qcow2", 2 * MiB)
    spec = KvmSource.model_validate(
        {
            "platform": "kvm",
            "disks": [str(a), str(b)],
            "hardware": {
                "cpus": 4,
                "memory_mib": 2048,
                "firmware": "uefi",
                "bus": "scsi",
                "nics": [{"mac": "52:54:00:aa:bb:cc", "network": "bridge:br0"}],
            },
        }
    )
    vm = OfflineQcow2Source("hwjob", spec.disks or [], spec.hardware).discover()
    assert (vm.cpus, vm.memory_mib, vm.firmware) == (4, 2048, "uefi")
    assert [(d.key, d.bus, d.boot_order) for d in vm.disks] == [("disk0", "scsi", 1), ("disk1", "scsi", None)]
    assert [(n.mac, n.network, n.model) for n in vm.nics] == [("52:54:00:aa:bb:cc", "bridge:br0", "virtio")]
    # without it: unknown, said as 0 / '' (a VM made from a point then takes the plan's own)
    bare = OfflineQcow2Source("hwjob", [a]).discover()
    assert (bare.cpus, bare.memory_mib, bare.firmware, bare.nics) == (0, 0, "", [])
    assert bare.disks[0].boot_order == 1


@pytest.mark.parametrize(
    "hardware, error",
    [
        ({"cpus": -1}, "hardware.cpus"),
        ({"nics": [{"mac": "52:54:00:zz:00:00"}]}, "hardware.nics.0.mac"),
        ({"firmware": "coreboot"}, "hardware.firmware"),
    ],
)
def test_hardware_fields_are_checked(tmp_path: Path, hardware: dict[str, object], error: str) -> None:
    from sendense.errors import InvalidSpec
    from sendense.spec import parse_spec

    data = {
        "name": "hw",
        "source": {"platform": "kvm", "disks": [str(tmp_path / "a.qcow2")], "hardware": hardware},
        "target": {"platform": "kvm", "path": str(tmp_path / "t")},
    }
    with pytest.raises(InvalidSpec, match=f"source.{error}"):
        parse_spec(data)


def test_hardware_belongs_to_the_stopped_vm_form_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hardware is given for a stopped VM"):
        KvmSource.model_validate({"platform": "kvm", "qmp": str(tmp_path / "s"), "hardware": {"cpus": 2}})


DOMAIN_XML = """<domain type='qemu'>
  <name>web01</name><memory unit='KiB'>1048576</memory><vcpu placement='static'>3</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><source file='/vms/a.qcow2'/><target dev='vda' bus='virtio'/>
      <boot order='2'/></disk>
    <disk type='file' device='disk'><source file='/vms/b.qcow2'/><target dev='sda' bus='sata'/>
      <boot order='1'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>
    <interface type='network'><mac address='52:54:00:01:02:03'/><source network='default'/>
      <model type='virtio'/></interface>
    <interface type='bridge'><mac address='52:54:00:04:05:06'/><source bridge='br-prod'/>
      <model type='e1000'/></interface>
  </devices>
</domain>"""


def test_a_libvirt_domains_hardware_is_read_from_its_xml() -> None:
    disks = [DiskInfo(key="vda", size=1), DiskInfo(key="sda", size=2)]
    hw = libvirt_hardware(DOMAIN_XML, disks)
    assert (hw["cpus"], hw["memory_mib"], hw["firmware"]) == (3, 1024, "uefi")
    assert [(d.key, d.bus, d.boot_order) for d in hw["disks"]] == [("vda", "virtio", 2), ("sda", "sata", 1)]
    assert [(n.mac, n.network, n.model) for n in hw["nics"]] == [
        ("52:54:00:01:02:03", "network:default", "virtio"),
        ("52:54:00:04:05:06", "bridge:br-prod", "e1000"),
    ]


def test_nics_from_info_network_name_their_bridge() -> None:
    text = (
        "e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:00:00:01\r\n"
        " \\ hostnet0: index=0,type=tap,ifname=tap0,script=no,downscript=no\r\n"
        "virtio-net-pci.1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:02\r\n"
        " \\ hostnet1: index=0,type=bridge,br=br0\r\n"
    )
    assert [(n.mac, n.model, n.network) for n in nics_of(text)] == [
        ("52:54:00:00:00:01", "e1000", "tap:tap0"),
        ("52:54:00:00:00:02", "virtio", "bridge:br0"),
    ]
