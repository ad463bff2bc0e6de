"""KvmVms on a KVM target that names a libvirt connection: VMs from points are libvirt domains, on a
private, real libvirtd (labs.kvm.libvirtd, one per module) running real QEMU (TCG) on the bootable guest.

The overlays, record and console file are the same as a bare QEMU's (test_kvm_vms.py); what differs is
that libvirt owns the VM: a persistent domain `sendense-<job>-<vm>`, found again by a new provisioner.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from helpers_kvm import file_digest
from helpers_vms import BOOT_TIMEOUT, JOB, READY, Site, assert_gone, plan, qemu_processes

from connectors.kvm.spec import KvmSource
from connectors.kvm.spec import KvmTarget as KvmTargetSpec
from connectors.kvm.vm_libvirt import NS, LibvirtBackend
from connectors.kvm.vms import KvmVms
from labs.kvm.libvirtd import LabLibvirtd, lab_domain_xml, start_libvirtd
from sendense.errors import InvalidSpec, ResourceUnavailable, SendenseError, TargetError
from sendense.models import JobSpec, NicInfo, PlanDisk
from sendense.platforms import vms_for
from sendense.spec import parse_spec

# slow tier (CI runs it); the lab libvirtd runs as root; a missing libvirtd fails, never skips
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.usefixtures("no_vm_leaks")]

log = logging.getLogger(__name__)
NIC = NicInfo(mac="52:54:00:aa:bb:01", network="prod-lan", model="virtio")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LabLibvirtd]:
    cache = getattr(request.config, "cache", None)
    cache_dir = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    lab = start_libvirtd(tmp_path_factory.mktemp("lvvm"), cache_dir=cache_dir)
    log.warning("lab libvirtd ready, first call took %.1f s", lab.first_call_seconds or 0)
    with lab:
        yield lab


@pytest.fixture
def conn(lab: LabLibvirtd) -> Iterator[libvirt.virConnect]:
    c = lab.connect()
    yield c
    c.close()


def provisioner(site: Site, lab: LabLibvirtd) -> KvmVms:
    return KvmVms(JOB, site.tgt.root, "j1", runtime_dir=site.run, libvirt_uri=lab.uri, stop_timeout=2)


def our_domains(conn: libvirt.virConnect) -> list[str]:
    return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(f"sendense-{JOB}-"))


def assert_no_domain(conn: libvirt.virConnect, name: str) -> None:
    with pytest.raises(libvirt.libvirtError) as e:
        conn.lookupByName(f"sendense-{JOB}-{name}")
    assert e.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def one_line(e: pytest.ExceptionInfo[SendenseError]) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------------------------------- lifecycle


def test_a_test_vm_is_a_libvirt_domain_that_boots_and_a_new_provisioner_destroys_it(
    vm_site: Site, lab: LabLibvirtd, conn: libvirt.virConnect
) -> None:
    vms, point = provisioner(vm_site, lab), vm_site.point_file()
    before = file_digest(point)
    ref = vms.create_vm(plan("drill", nics=[NIC], network_map={"prod-lan": "br-prod"}))
    assert (ref.point_id, ref.mode, ref.state) == ("p1", "test", "stopped")
    assert vms.create_vm(plan("drill", nics=[NIC], network_map={"prod-lan": "br-prod"})) == ref

    dom = conn.lookupByName(f"sendense-{JOB}-drill")
    assert dom.isPersistent() and not dom.isActive() and dom.UUIDString() == ref.vm_id
    xml = ET.fromstring(dom.XMLDesc(0))
    assert xml.get("type") == "qemu"  # TCG here
    assert xml.findall("./devices/interface") == []  # a test VM reaches nothing: no interface at all
    state = vms.files("drill").state
    assert [d.get("file") for d in xml.findall("./devices/disk/source")] == [str(state / "disk0.qcow2")]
    assert xml.find("./devices/serial/source").get("path") == str(state / "console.log")  # type: ignore[union-attr]
    meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0))
    assert (meta.get("job_id"), meta.get("point"), meta.get("vm")) == ("j1", "p1", "drill")
    assert qemu_processes(vm_site.tmp) == []  # defined, not running

    assert vms.power_on("drill").state == "running"
    assert vms.power_on("drill").state == "running" and len(qemu_processes(vm_site.tmp)) == 1
    check = vms.boot_check("drill", READY, BOOT_TIMEOUT)
    print(f"libvirt boot check: {check.seconds} s, {check.evidence!r}")
    assert check.ok and check.evidence == READY and 0 < check.seconds < BOOT_TIMEOUT, check
    assert READY in vms.console("drill")
    assert file_digest(point) == before  # the domain runs on the overlay; the point is only read

    assert vms.power_off("drill").state == "stopped"  # shutdown, then destroy after stop_timeout
    assert qemu_processes(vm_site.tmp) == [] and dom.isPersistent() and not dom.isActive()
    assert vms.power_on("drill").state == "running"  # the domain stays defined: it runs again

    again = vms_for(  # a new agent: its provisioner from the job's spec finds the domain by name
        JobSpec(
            name=JOB,
            job_id="j1",
            source=KvmSource(platform="kvm", disks=vm_site.src.paths),
            target=KvmTargetSpec.model_validate(
                {"platform": "kvm", "path": vm_site.tgt.root, "libvirt": {"uri": lab.uri}}
            ),
        )
    )
    assert isinstance(again, KvmVms) and isinstance(again.backend, LibvirtBackend)
    assert [(r.name, r.state, r.vm_id) for r in again.list_vms()] == [("drill", "running", ref.vm_id)]
    again.destroy_vm("drill")
    assert_no_domain(conn, "drill")
    assert_gone(again, "drill")
    again.destroy_vm("drill")  # gone already: no error
    assert file_digest(point) == before


def test_the_guest_agent_answers_through_libvirt_and_a_suspended_domain_fails_status_checks(
    vm_site: Site, lab: LabLibvirtd, conn: libvirt.virConnect
) -> None:
    vms = provisioner(vm_site, lab)
    vms.create_vm(plan("drill"))
    dom = conn.lookupByName(f"sendense-{JOB}-drill")
    chan = ET.fromstring(dom.XMLDesc(0)).find("./devices/channel/target")
    assert chan is not None and chan.get("name") == "org.qemu.guest_agent.0"
    vms.power_on("drill")
    check = vms.boot_check("drill", READY, BOOT_TIMEOUT, guest_agent=True, status_checks=True)
    print(f"libvirt boot check: {check.seconds} s, {check.evidence!r}")
    assert check.ok, check.evidence
    assert check.evidence.startswith(f"{READY}; VM running; guest agent answered ("), check.evidence

    dom.suspend()
    paused = vms.boot_check("drill", READY, 30, status_checks=True)
    assert not paused.ok and paused.evidence.startswith(f"{READY}; but the VM is not running: paused ("), (
        paused
    )
    silent = vms.boot_check("drill", READY, 3, guest_agent=True)
    assert silent.evidence == f"guest agent did not answer within 3s; last line: {READY}", silent.evidence
    dom.resume()
    vms.destroy_vm("drill")
    assert_no_domain(conn, "drill")
    assert_gone(vms, "drill")


def test_a_create_or_power_on_cut_short_is_undone_by_destroy(
    vm_site: Site, lab: LabLibvirtd, conn: libvirt.virConnect, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms = provisioner(vm_site, lab)
    real_define, real_start = LibvirtBackend.define, LibvirtBackend.start

    def define_then_die(self: LibvirtBackend, *a: object) -> None:
        real_define(self, *a)  # type: ignore[arg-type]
        raise RuntimeError("agent killed after the domain was defined")

    monkeypatch.setattr(LibvirtBackend, "define", define_then_die)
    with pytest.raises(RuntimeError):
        vms.create_vm(plan("cut"))
    assert our_domains(conn) == [f"sendense-{JOB}-cut"]
    assert [r.name for r in vms.list_vms()] == ["cut"]
    vms.destroy_vm("cut")
    assert_no_domain(conn, "cut")
    assert_gone(vms, "cut")

    monkeypatch.setattr(LibvirtBackend, "define", real_define)
    vms.create_vm(plan("cut"))

    def start_then_die(self: LibvirtBackend, *a: object) -> None:
        real_start(self, *a)  # type: ignore[arg-type]
        raise RuntimeError("agent killed after the domain started")

    monkeypatch.setattr(LibvirtBackend, "start", start_then_die)
    with pytest.raises(RuntimeError):
        vms.power_on("cut")
    assert [r.state for r in vms.list_vms()] == ["running"]
    assert len(qemu_processes(vms.files("cut").state)) == 1
    vms.destroy_vm("cut")
    assert_no_domain(conn, "cut")
    assert_gone(vms, "cut")
    assert our_domains(conn) == []


def test_a_refused_plan_leaves_nothing_and_another_domain_of_the_name_is_left_alone(
    vm_site: Site, lab: LabLibvirtd, conn: libvirt.virConnect
) -> None:
    vms = provisioner(vm_site, lab)
    refused: list[tuple[object, type[SendenseError], str]] = [
        (plan("nv", disks=[PlanDisk(key="disk0", bus="nvme")]), InvalidSpec, "bus 'nvme' is not offered"),
        (plan("prod", mode="production", nics=[NIC]), InvalidSpec, "which network_map does not map"),
        (plan("gone", point_id="p9"), SendenseError, "p9"),
    ]
    foreign = conn.defineXML(lab_domain_xml(f"sendense-{JOB}-taken", [vm_site.point_file()]))
    try:
        refused.append((plan("taken"), TargetError, f"libvirt domain sendense-{JOB}-taken on qemu:///system"))
        for p, kind, text in refused:
            with pytest.raises(kind) as e:
                vms.create_vm(p)  # type: ignore[arg-type]
            assert text in one_line(e), str(e.value)  # type: ignore[arg-type]
            vms.destroy_vm(p.name)  # type: ignore[attr-defined]
            assert_gone(vms, p.name)  # type: ignore[attr-defined]
        assert our_domains(conn) == [f"sendense-{JOB}-taken"]  # another's domain is never undefined
        assert foreign.isPersistent() and not vms.list_vms()

        down = KvmVms(JOB, vm_site.tgt.root, "j1", libvirt_uri=f"qemu:///system?socket={vm_site.tmp}/no-sock")
        with pytest.raises(ResourceUnavailable) as e2:
            down.create_vm(plan("down"))
        assert "is unreachable" in one_line(e2)  # type: ignore[arg-type]
        assert_gone(vms, "down")
    finally:
        foreign.undefine()

    vms.create_vm(plan("efi", firmware="uefi"))  # OVMF is here: libvirt's firmware auto-selection
    dom = conn.lookupByName(f"sendense-{JOB}-efi")
    assert ET.fromstring(dom.XMLDesc(0)).find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    vms.destroy_vm("efi")
    assert_no_domain(conn, "efi")
    assert_gone(vms, "efi")


# ---------------------------------------------------------------------------------------------- spec


def test_the_targets_libvirt_uri_is_checked_and_never_echoed(tmp_path: Path) -> None:
    def spec(uri: object) -> JobSpec:
        return parse_spec(
            {
                "name": "j",
                "source": {"platform": "kvm", "disks": [str(tmp_path / "a.qcow2")]},
                "target": {"platform": "kvm", "path": str(tmp_path), "libvirt": {"uri": uri}},
            }
        )

    ok = spec("qemu+ssh://root@kvm1.example/system")
    assert ok.target.libvirt.uri == "qemu+ssh://root@kvm1.example/system"  # type: ignore[attr-defined]
    assert isinstance(vms_for(ok), KvmVms)
    for bad, says in [
        ("qemu+ssh://root:S3cretPW@kvm1.example/system", "the URI carries a password"),
        ("kvm1.example", "not a libvirt URI"),
        (7, "string"),
    ]:
        with pytest.raises(InvalidSpec) as e:
            spec(bad)
        text = one_line(e)  # type: ignore[arg-type]
        assert text.startswith("spec: target.libvirt.uri: ") and says in text, text
        assert "S3cretPW" not in text
    with pytest.raises(InvalidSpec, match=r"target\.libvirt\.socket: unknown field"):
        parse_spec(
            {
                "name": "j",
                "source": {"platform": "kvm", "disks": [str(tmp_path / "a.qcow2")]},
                "target": {"platform": "kvm", "path": str(tmp_path), "libvirt": {"uri": "x://", "socket": 1}},
            }
        )
