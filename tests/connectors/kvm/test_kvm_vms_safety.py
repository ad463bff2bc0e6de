"""KvmVms where it must not go wrong: test VMs reach nothing, production NICs land on the mapped
bridge, a pid that is not the VM's is never signalled, prune and purge leave a VM's point alone,
disks boot in the plan's order on its buses, UEFI, and errors that are one line and leave nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers_kvm import MiB, file_digest, make_qcow2, sync_point
from helpers_vms import BOOT_TIMEOUT, JOB, READY, REPO, Site, assert_gone, make_site, plan, qemu_processes

from connectors.kvm import vm_qemu
from connectors.kvm.offline import OfflineQcow2Source
from connectors.kvm.target import KvmTarget
from connectors.kvm.vms import KvmVms
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import NicInfo, PlanDisk

pytestmark = pytest.mark.usefixtures("no_vm_leaks")
NIC = NicInfo(mac="52:54:00:aa:bb:01", network="prod-lan", model="virtio")


def pci_classes(vms: KvmVms, name: str) -> list[str]:
    with vms.monitor(name) as qmp:
        buses = qmp.execute("query-pci")
    return [d["class_info"].get("desc", str(d["class_info"]["class"])) for b in buses for d in b["devices"]]


# ------------------------------------------------------------------------------------------ networks


def test_a_test_vm_has_no_way_out(vm_site: Site) -> None:
    """What QEMU itself reports: a test VM's NIC is on the user network with restrict=on (no route to
    the host or beyond), never a tap; without NICs there is no network device at all. The guest
    agent's channel is there either way."""
    vms = vm_site.vms
    prod_map = {"prod-lan": "br-prod"}  # a production mapping in a test plan is ignored, not followed
    vms.create_vm(plan("isolated", nics=[NIC], network_map=prod_map))
    vms.create_vm(plan("nonic"))
    for name in ("isolated", "nonic"):
        vms.power_on(name)
    with vms.monitor("isolated") as qmp:
        net = qmp.hmp("info network")
        chardevs = {c["label"]: c["filename"] for c in qmp.execute("query-chardev")}
        qtree = qmp.hmp("info qtree")
    backends = [ln.strip(" \\#") for ln in net.splitlines() if "type=" in ln and "type=nic" not in ln]
    assert backends and all("type=user" in b and "restrict=on" in b for b in backends), net
    assert "type=tap" not in net and "fwd" not in net
    assert "macaddr=52:54:00:aa:bb:01" in net
    assert "Ethernet controller" in pci_classes(vms, "isolated")
    assert chardevs["qga0"].startswith("disconnected:unix:")  # the agent's socket, waiting for a guest agent
    assert 'name = "org.qemu.guest_agent.0"' in qtree

    with vms.monitor("nonic") as qmp:
        assert qmp.hmp("info network").strip() == ""
    assert "Ethernet controller" not in pci_classes(vms, "nonic")
    for name in ("isolated", "nonic"):
        vms.destroy_vm(name)
        assert_gone(vms, name)


PRODUCTION = """
import json, subprocess, sys
from pathlib import Path
from connectors.kvm.vms import KvmVms
from sendense.models import NicInfo, VmPlan
job, root, job_id, run = sys.argv[1:5]
def ports():
    p = subprocess.run(["ip", "-j", "link", "show", "master", "br-prod"], capture_output=True, text=True)
    return [link["ifname"] for link in json.loads(p.stdout or "[]")]
subprocess.run(["ip", "link", "add", "br-prod", "type", "bridge"], check=True)
subprocess.run(["ip", "link", "set", "br-prod", "up"], check=True)
vms = KvmVms(job, Path(root), job_id, runtime_dir=Path(run))
out = {"networks": [n.model_dump() for n in vms.list_networks()]}
nic = NicInfo(mac="52:54:00:aa:bb:01", network="prod-lan", model="virtio")
vms.create_vm(VmPlan(name="prod", point_id="p1", memory_mib=256, mode="production", nics=[nic],
                     network_map={"prod-lan": "br-prod"}))
vms.power_on("prod")
with vms.monitor("prod") as q:
    out["info_network"] = q.hmp("info network")
out["tap"], out["ports_on"] = vms.files("prod").tap(0), ports()
vms.power_off("prod")
out["ports_off"] = ports()
vms.power_on("prod")
out["ports_on_again"] = ports()
vms.destroy_vm("prod")
out["ports_destroyed"] = ports()
out["links"] = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
print(json.dumps(out))
"""


def test_production_nics_are_taps_on_the_mapped_bridge_with_the_plans_macs(vm_site: Site) -> None:
    """In a network namespace of the test's own (its bridge is no one else's): the NIC's tap is on the
    bridge the plan maps its network to, with the plan's MAC; power_off and destroy take the tap away."""
    p = subprocess.run(
        [
            "unshare",
            "--net",
            "--",
            sys.executable,
            "-c",
            PRODUCTION,
            JOB,
            str(vm_site.tgt.root),
            "j1",
            str(vm_site.run),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"name": "br-prod", "kind": "bridge", "isolated": False} in out["networks"]
    assert {"name": "sendense-isolated", "kind": "user", "isolated": True} in out["networks"]
    assert f"type=tap,ifname={out['tap']}" in out["info_network"]
    assert "macaddr=52:54:00:aa:bb:01" in out["info_network"] and "type=user" not in out["info_network"]
    assert out["ports_on"] == [out["tap"]] == out["ports_on_again"]
    assert out["ports_off"] == [] == out["ports_destroyed"]
    assert out["tap"] not in out["links"]  # deleted, not merely detached
    assert_gone(vm_site.vms, "prod")


# ------------------------------------------------------------------------------------------- errors


def test_errors_are_one_line_name_the_vm_and_leave_nothing(
    vm_site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms = vm_site.vms

    cases: list[tuple[object, type[SendenseError], tuple[str, ...]]] = [
        (lambda: vms.create_vm(plan("x", point_id="p9")), ResourceNotFound, ("p9",)),
        (lambda: vms.create_vm(plan("x", disks=[PlanDisk(key="disk7")])), InvalidSpec, ("disk7", "disk0")),
        (lambda: vms.create_vm(plan("x", disks=[PlanDisk(key="disk0", bus="usb")])), InvalidSpec, ("usb",)),
        (lambda: vms.create_vm(plan("x", nics=[NicInfo(mac="01:00:5e:00:00:01")])), InvalidSpec, ("MAC",)),
        (
            lambda: vms.create_vm(
                plan("x", mode="production", nics=[NIC], network_map={"prod-lan": "nobr0"})
            ),
            InvalidSpec,
            ("'nobr0' does not exist",),
        ),
        (lambda: vms.create_vm(plan("x", mode="production", nics=[NIC])), InvalidSpec, ("'prod-lan'",)),
        (lambda: vms.power_on("ghost"), ResourceNotFound, ("ghost", JOB)),
        (lambda: vms.boot_check("ghost", READY, 1), ResourceNotFound, ("ghost",)),
        (lambda: vms.console("ghost"), ResourceNotFound, ("ghost",)),
        (lambda: vms.destroy_vm("../x"), InvalidSpec, ("../x",)),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind) as e:
            call()  # type: ignore[operator]
        msg = e.value.message
        assert "\n" not in msg and str(vm_site.run) not in msg and all(w in msg for w in words), msg
    assert vms.list_vms() == [] and list((vm_site.tgt.dir / "vms").glob("*")) == []

    monkeypatch.setattr(vm_qemu, "OVMF", [(Path("/nonexistent/OVMF_CODE.fd"), Path("/nonexistent/VARS.fd"))])
    with pytest.raises(InvalidSpec, match=r"^VM efi: firmware uefi needs OVMF.*apt-get install ovmf$"):
        vms.create_vm(plan("efi", firmware="uefi"))
    assert vms.list_vms() == []

    vms.create_vm(plan("same"))
    with pytest.raises(InvalidSpec) as e:
        vms.create_vm(plan("same", memory_mib=512))  # another plan under the same name
    assert e.value.message == (
        f"VM same: exists on job {JOB} from another plan (differs in memory_mib); "
        "destroy it or choose another name"
    )
    with pytest.raises(InvalidSpec, match="pattern"):
        vms.boot_check("same", "(unclosed", 1)
    check = vms.boot_check("same", READY, 5)  # never powered on: says so at once
    assert not check.ok and check.evidence.startswith("VM same is not running")
    vms.destroy_vm("same")
    assert_gone(vms, "same")

    vms.create_vm(plan("huge", memory_mib=4 << 20))  # 4 TiB: QEMU refuses, and says why
    with pytest.raises(TargetError) as e:
        vms.power_on("huge")
    assert e.value.message == (
        "VM huge: QEMU did not start: cannot set up guest memory 'pc.ram': Cannot allocate memory"
    )
    assert [r.state for r in vms.list_vms()] == ["stopped"]
    paths = vms.files("huge")
    paths.log.write_text(
        f"qemu-system-x86_64: -chardev socket,id=qga0,path={paths.qga},server=on,wait=off: "
        f"Failed to bind socket to {paths.qga}: Address already in use\n"
    )
    assert vm_qemu.reason(paths) == "Failed to bind socket to <runtime dir>/qga.sock: Address already in use"
    vms.destroy_vm("huge")
    assert_gone(vms, "huge")

    nowhere = KvmVms(JOB, vm_site.tmp / "nowhere", "j9", runtime_dir=vm_site.run)
    nowhere.destroy_vm("x")  # a job without a directory: nothing to destroy, and nothing made
    assert nowhere.power_off("x").state == "absent" and nowhere.list_vms() == []
    assert not (vm_site.tmp / "nowhere").exists()


def test_a_pid_that_is_not_the_vms_is_never_signalled(vm_site: Site) -> None:
    """A pid file naming another process (a recycled pid: a `sleep`, another VM's QEMU) is not the
    VM's: the VM counts as stopped, and power_off and destroy signal nobody."""
    vms = vm_site.vms
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        vms.create_vm(plan("other"))
        vms.power_on("other")
        other = qemu_processes(vms.files("other").state)[0].pid
        for victim in (sleeper.pid, other):
            vms.create_vm(plan("stale"))
            vms.files("stale").pidfile.write_text(f"{victim}\n")
            assert [r.state for r in vms.list_vms() if r.name == "stale"] == ["stopped"]
            assert vms.power_off("stale").state == "stopped"
            vms.destroy_vm("stale")
            assert_gone(vms, "stale")
            assert psutil.pid_exists(victim) and psutil.Process(victim).status() != psutil.STATUS_ZOMBIE
        assert [r.state for r in vms.list_vms()] == ["running"]
        vms.destroy_vm("other")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_vm_whose_monitor_does_not_answer_is_killed(vm_site: Site) -> None:
    """power_off asks QEMU to quit over QMP; when the monitor does not answer (here: another client
    holds it), the VM is killed after the stop timeout, and its stale pid file goes too."""
    vms = KvmVms(JOB, vm_site.tgt.root, "j1", runtime_dir=vm_site.run, stop_timeout=1.0)
    vms.create_vm(plan("stuck"))
    vms.power_on("stuck")
    pidfile = vms.files("stuck").pidfile
    pid = int(pidfile.read_text())
    with vms.monitor("stuck") as busy:
        busy.execute("query-status")
        t0 = time.monotonic()
        assert vms.power_off("stuck").state == "stopped"
        took = time.monotonic() - t0
    assert 1.0 <= took < 15, took
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not pidfile.exists()  # QEMU removes it on quit, not when killed: power_off did
    vms.destroy_vm("stuck")
    assert_gone(vms, "stuck")


# ---------------------------------------------------------------------------------- prune and purge


def test_prune_keeps_a_point_a_stopped_vms_overlay_backs_and_purge_waits_for_vms(vm_site: Site) -> None:
    """No hold, no QEMU (nothing locks the files): the overlay alone keeps its point, and the point it
    would be merged into, from prune; purge refuses while a VM exists."""
    vms, tgt = vm_site.vms, vm_site.tgt
    sync_point(vm_site.src, tgt, "p2", {"disk0": tgt.get_point("p1").disks[0].change_id})
    digests = {p: file_digest(vm_site.point_file(p)) for p in ("p1", "p2")}
    for on in ("p1", "p2"):  # on the oldest point; on the point the oldest would be merged into
        vms.create_vm(plan(f"on-{on}", point_id=on))
        assert tgt.prune(1) == []
        assert {p: file_digest(vm_site.point_file(p)) for p in ("p1", "p2")} == digests
        with pytest.raises(TargetError, match=f"^purge of job {JOB}: nothing deleted: VMs .*: on-{on} "):
            tgt.destroy()
        vms.destroy_vm(f"on-{on}")
    assert tgt.prune(1) == ["p1"]
    tgt.destroy()
    assert not tgt.dir.exists()


# -------------------------------------------------------------------------------------- disks, UEFI


def test_disks_boot_in_the_plans_order_on_the_plans_buses(tmp_path: Path, guest_image: Path) -> None:
    """The guest's disk and a blank one, on SCSI and IDE: the disk the plan boots first is the one the
    BIOS boots (SeaBIOS boots the first hard disk only: a blank one first is no bootable device)."""
    blank = make_qcow2(tmp_path / "blank.qcow2", 64 * MiB)
    s = make_site(tmp_path, guest_image)
    try:
        src = OfflineQcow2Source(JOB, [s.src.paths[0], blank])
        tgt = KvmTarget(JOB, tmp_path / "two", job_id="j2")
        sync_point(src, tgt, "p1")
        vms = KvmVms(JOB, tmp_path / "two", "j2", runtime_dir=s.run)
        layouts = {
            "blank-first": [
                PlanDisk(key="disk0", bus="scsi"),
                PlanDisk(key="disk1", bus="ide", boot_order=1),
            ],
            "guest-ide": [PlanDisk(key="disk1", bus="scsi"), PlanDisk(key="disk0", bus="ide", boot_order=1)],
            "guest-scsi": [PlanDisk(key="disk0", bus="scsi"), PlanDisk(key="disk1", bus="ide")],
        }
        for name, disks in layouts.items():
            vms.create_vm(plan(name, disks=disks))
            vms.power_on(name)
        checks = {name: vms.boot_check(name, READY, BOOT_TIMEOUT) for name in layouts}
        assert not checks["blank-first"].ok
        assert checks["blank-first"].evidence == "No bootable device. (Boot failed: not a bootable disk)"
        assert checks["guest-ide"].ok and checks["guest-scsi"].ok, checks
        assert {"SCSI controller", "IDE controller"} <= set(pci_classes(vms, "guest-ide"))
        for name in layouts:
            vms.destroy_vm(name)
            assert_gone(vms, name)
    finally:
        shutil.rmtree(s.run, ignore_errors=True)


def test_a_uefi_vm_runs_ovmf_with_a_variable_store_of_its_own(vm_site: Site) -> None:
    vms = vm_site.vms
    vms.create_vm(plan("efi", firmware="uefi"))
    vms.power_on("efi")
    with vms.monitor("efi") as qmp:
        blocks = {b["device"]: b.get("inserted", {}).get("file", "") for b in qmp.execute("query-block")}
    efivars = vms.files("efi").efivars
    assert "OVMF_CODE" in blocks["pflash0"] and blocks["pflash1"] == str(efivars)
    vms.destroy_vm("efi")
    assert_gone(vms, "efi")
