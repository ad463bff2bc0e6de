"""The CloudStack target against the CloudStack lab (its hosts without libvirtd: nothing boots here;
tests/connectors/cloudstack/test_cloudstack_vms.py boots VMs): points as qcow2 files in the job's
directory on the pool, read back bit-exact; VMs from points made over imported flat copies (deploy
stopped, the ROOT swapped, data volumes in order) and destroyed leaving nothing; a create cut short at
any step undone by name; bad input refused in one line naming the spec field, nothing made."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cs_target_rig import api, guest_disk, job_spec, leftovers, point, use_lab

from connectors.cloudstack.client import CloudStackApiError
from labs.cloudstack.server import LabServer
from labs.cloudstack.state import LabConfig
from sendense.errors import InvalidSpec, ResourceUnavailable, SendenseError, TargetError
from sendense.models import DiskInfo, VmPlan
from sendense.platforms import target_for, vms_for

MIB = 1 << 20
WRITES = ((0xAB, 0, 1 * MIB), (0x5C, 5 * MIB + 4096, 12288), (0xE1, 16 * MIB - 512, 512))


@pytest.fixture(scope="module")
def lab() -> Iterator[LabServer]:
    root = Path(tempfile.mkdtemp(prefix="cstgt-", dir="/tmp"))
    server = LabServer(root, LabConfig(libvirt=False, pool_capacity_gib=2)).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _env(lab: LabServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    use_lab(lab, monkeypatch)
    yield
    lab.cloud.faults.clear()
    lab.cloud.state.pool.state = "Up"


def one_line(e: pytest.ExceptionInfo[Any], lab: LabServer) -> str:
    """The error's text: one line, naming no lab directory (a temp path) and no key."""
    text = str(e.value)
    assert isinstance(e.value, SendenseError)
    assert "\n" not in text and str(lab.cloud.root) not in text and str(lab.info["secret_key"]) not in text
    return text


def test_a_point_is_written_to_the_pool_and_reads_back_bit_exact(lab: LabServer, tmp_path: Path) -> None:
    disk = guest_disk(tmp_path / "vm.qcow2", writes=WRITES)
    spec = job_spec(lab, disk)
    before = leftovers(lab)
    tgt = point(spec, tmp_path / "work")
    [p] = tgt.list_points()
    [pd] = p.disks
    f = Path(pd.path)
    job_dir = lab.cloud.state.pool.path / "sendense" / spec.job_id / spec.name
    assert f.parent.parent.parent == job_dir and f.is_file()
    subprocess.run(["qemu-img", "compare", "-q", str(disk), str(f)], check=True)  # bit-exact
    [(_, raw)] = tgt.export("p1", "raw", tmp_path / "out")
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(disk), str(raw)], check=True)
    assert leftovers(lab) == before  # the points are files of sendense's, no volume of CloudStack's
    [pool] = api(lab).call("listStoragePools", id=lab.cloud.state.pool.id)["storagepool"]
    assert pool["disksizeused"] > 0  # ... but they take the pool's room
    tgt.destroy()
    assert not job_dir.exists() and not job_dir.parent.exists()


def test_a_vm_from_a_point_is_made_over_imported_flat_copies_and_destroyed_leaving_nothing(
    lab: LabServer, tmp_path: Path
) -> None:
    d0 = guest_disk(tmp_path / "d0.qcow2", writes=WRITES)
    d1 = guest_disk(tmp_path / "d1.qcow2", "8M", writes=((0x77, 0, 4096),))
    spec = job_spec(lab, [d0, d1])
    before = leftovers(lab)
    tgt = point(spec, tmp_path / "work")
    vms = vms_for(spec)
    plan = VmPlan(name="drill-1", point_id="p1", memory_mib=256)
    tgt.hold("p1", "drill-1", "drill")
    ref = vms.create_vm(plan)
    assert (ref.name, ref.point_id, ref.mode, ref.state) == ("drill-1", "p1", "test", "stopped")
    assert vms.create_vm(plan).vm_id == ref.vm_id  # made once
    c = api(lab)
    [vm] = c.call("listVirtualMachines", id=ref.vm_id)["virtualmachine"]
    assert vm["name"] == "drill-1" and vm["serviceofferingname"] == "lab-small"
    assert [n["networkname"] for n in vm["nic"]] == ["lab-isolated"]
    vols = c.call("listVolumes", virtualmachineid=ref.vm_id)["volume"]
    assert [(v["name"], v["deviceid"], v["type"], v["state"]) for v in vols] == [
        ("drill-1-disk0", 0, "ROOT", "Ready"),
        ("drill-1-disk1", 1, "DATADISK", "Ready"),
    ]
    pool_dir = lab.cloud.state.pool.path
    for v, src in zip(vols, (d0, d1), strict=True):  # flat copies, each the point's disk exactly
        flat = pool_dir / v["path"]
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(flat)], capture_output=True, check=True
        )
        assert b"backing-filename" not in info.stdout
        subprocess.run(["qemu-img", "compare", "-q", str(src), str(flat)], check=True)
    assert [r.name for r in vms.list_vms()] == ["drill-1"]
    tgt.release("p1", "drill-1")
    with pytest.raises(TargetError, match="VMs made from its points exist: drill-1"):
        tgt.destroy()
    vms.destroy_vm("drill-1")
    vms.destroy_vm("drill-1")  # gone already: no error
    assert vms.list_vms() == [] and leftovers(lab) == before
    subprocess.run(["qemu-img", "compare", "-q", str(d0), str(tgt.point_path("p1", "disk0"))], check=True)  # type: ignore[attr-defined]
    tgt.destroy()


@pytest.mark.parametrize("step", ["importVolume", "deployVirtualMachine", "detachVolume", "attachVolume"])
def test_a_create_cut_short_at_any_step_is_undone_by_name(lab: LabServer, tmp_path: Path, step: str) -> None:
    disk = guest_disk(tmp_path / "vm.qcow2", writes=WRITES)
    spec = job_spec(lab, disk, vm_name="dr")
    tgt = point(spec, tmp_path / "work")
    vms = vms_for(spec)
    before = leftovers(lab)
    vms.destroy_vm("never-made")  # the undo of a create that made nothing
    lab.cloud.faults.inject(step, 530, job=True, text=f"the lab failed {step}")
    with pytest.raises(CloudStackApiError, match=f"the lab failed {step}") as e:
        vms.create_vm(VmPlan(name="cut", point_id="p1", mode="production", memory_mib=256))
    one_line(e, lab)
    assert leftovers(lab) != before or step == "importVolume"  # something was made
    assert [r.state for r in vms.list_vms()] == ["incomplete"]
    vms.destroy_vm("cut")
    assert vms.list_vms() == [] and leftovers(lab) == before
    ref = vms.create_vm(VmPlan(name="cut", point_id="p1", mode="production", memory_mib=256))  # afresh
    [vm] = api(lab).call("listVirtualMachines", id=ref.vm_id)["virtualmachine"]
    assert vm["name"] == "dr-cut" and [n["networkname"] for n in vm["nic"]] == ["lab-shared"]
    vms.destroy_vm("cut")
    assert leftovers(lab) == before
    tgt.destroy()


def test_bad_input_is_refused_in_one_line_naming_the_spec_field_and_nothing_is_made(
    lab: LabServer, tmp_path: Path
) -> None:
    disk = guest_disk(tmp_path / "vm.qcow2", writes=WRITES)
    spec = job_spec(lab, disk)
    tgt = point(spec, tmp_path / "work")
    before = leftovers(lab)
    plan = VmPlan(name="bad", point_id="p1", memory_mib=256)
    cases: list[tuple[dict[str, str | None], str]] = [
        (
            {"storage": "no-such-pool"},
            "target.storage: no primary storage pool 'no-such-pool' in zone lab-zone-1",
        ),
        ({"service_offering": "no-such"}, "target.service_offering: no service offering 'no-such' at "),
        ({"template": "no-such"}, "target.template: no template 'no-such' at "),
        ({"template": None}, "target.template: name the template VMs from points are deployed from"),
        ({"disk_offering": "no-such"}, "target.disk_offering: no disk offering 'no-such' at "),
        ({"drill_network": "no-such"}, "target.drill_network: no network in the zone 'no-such' at "),
        ({"drill_network": "lab-shared"}, "target.drill_network: network lab-shared is Shared: a drill"),
        ({"drill_network": None}, "target.drill_network: name the isolated network drills run on"),
        (
            {"host": None},
            "target.host: name the agent of a KVM host that mounts primary storage lab-primary-1",
        ),
    ]
    for change, text in cases:
        other = job_spec(lab, disk, **change).model_copy(update={"name": spec.name, "job_id": spec.job_id})
        with pytest.raises(InvalidSpec) as e:
            vms_for(other).create_vm(plan)
        assert one_line(e, lab).startswith(text), (change, str(e.value))
    huge = VmPlan(name="bad", point_id="p1", mode="production", cpus=64, memory_mib=1 << 20)
    with pytest.raises(InvalidSpec, match="target.service_offering: no service offering at .* has 64 CPUs"):
        vms_for(spec).create_vm(huge)
    unmapped = job_spec(lab, disk, networks=[]).model_copy(update={"name": spec.name, "job_id": spec.job_id})
    with pytest.raises(InvalidSpec, match=r"target.networks: the source network \* of NIC 0 is not mapped"):
        vms_for(unmapped).create_vm(VmPlan(name="bad", point_id="p1", mode="production", memory_mib=256))
    assert vms_for(spec).list_vms() == [] and leftovers(lab) == before

    with pytest.raises(InvalidSpec) as e:  # the target itself
        target_for(job_spec(lab, disk, storage="no-such-pool")).validate()
    assert one_line(e, lab) == "target.storage: no primary storage pool 'no-such-pool' in zone lab-zone-1"
    lab.cloud.state.pool.state = "Maintenance"
    with pytest.raises(ResourceUnavailable) as down:
        tgt.prepare("p2", [DiskInfo(key="disk0", size=16 * MIB)])
    assert one_line(down, lab) == "target.storage: primary storage lab-primary-1 is Maintenance, not Up"
    lab.cloud.state.pool.state = "Up"
    with pytest.raises(ResourceUnavailable) as full:  # a new disk's replica beyond the pool's 2 GiB
        tgt.prepare("p2", [DiskInfo(key="disk0", size=16 * MIB), DiskInfo(key="disk1", size=4 << 30)])
    assert "target.storage: primary storage lab-primary-1 has " in one_line(full, lab)
    assert one_line(full, lab).endswith("free of 2.0 GiB; the replicas need 4.0 GiB")
    assert [p.point_id for p in tgt.list_points()] == ["p1"]
    tgt.destroy()


def test_a_volume_in_the_wrong_state_stops_the_undo_in_one_line_and_it_finishes_later(
    lab: LabServer, tmp_path: Path
) -> None:
    """A create cut short after its import, and the imported volume attached elsewhere meanwhile:
    destroy_vm cannot delete it (CloudStack's answer, naming the volume) and keeps the record, so a
    later destroy_vm finishes once the volume is free."""
    disk = guest_disk(tmp_path / "vm.qcow2", writes=WRITES)
    spec = job_spec(lab, disk)
    tgt = point(spec, tmp_path / "work")
    vms = vms_for(spec)
    before = leftovers(lab)
    lab.cloud.faults.inject("deployVirtualMachine", 530, job=True)
    with pytest.raises(CloudStackApiError):
        vms.create_vm(VmPlan(name="held", point_id="p1", memory_mib=256))
    c = api(lab)
    [vol] = c.call("listVolumes", name="held-disk0")["volume"]
    small = c.call("listServiceOfferings", name="lab-small")["serviceoffering"][0]
    tmpl = c.call("listTemplates", templatefilter="all")["template"][0]
    other = c.job("deployVirtualMachine", zoneid=lab.info["zoneid"], serviceofferingid=small["id"],
                  templateid=tmpl["id"], name="someone-elses", startvm=False)["virtualmachine"]  # fmt: skip
    c.job("attachVolume", id=vol["id"], virtualmachineid=other["id"])
    with pytest.raises(TargetError) as e:
        vms.destroy_vm("held")
    assert one_line(e, lab).startswith("destroy of VM held: what was made for it stays: volume held-disk0 (")
    assert "not attached to any VM" in str(e.value)
    assert [r.name for r in vms.list_vms()] == ["held"]  # the record stays: the undo can run again
    c.job("detachVolume", id=vol["id"])
    vms.destroy_vm("held")
    c.job("destroyVirtualMachine", id=other["id"], expunge=True)
    assert leftovers(lab) == before and vms.list_vms() == []
    tgt.destroy()


def test_validate_says_what_a_vm_from_a_point_would_miss_when_the_job_is_made(
    lab: LabServer, tmp_path: Path
) -> None:
    disk = guest_disk(tmp_path / "vm.qcow2")
    target_for(job_spec(lab, disk)).validate()  # the rig's spec: all there
    cases: list[tuple[dict[str, object], str]] = [
        ({"template": "no-such"}, "target.template: no template 'no-such' at "),
        ({"service_offering": "no-such"}, "target.service_offering: no service offering 'no-such' at "),
        ({"disk_offering": "no-such"}, "target.disk_offering: no disk offering 'no-such' at "),
        ({"drill_network": "lab-shared"}, "target.drill_network: network lab-shared is Shared: a drill"),
        (
            {"networks": [{"source": "*", "target": "no-such"}]},
            "target.networks: no network in the zone 'no-such'",
        ),
        ({"zone": "no-such-zone"}, f"target.zone: no zone 'no-such-zone' at {lab.url}"),
    ]
    for change, text in cases:
        with pytest.raises(InvalidSpec) as e:
            target_for(job_spec(lab, disk, **change)).validate()
        assert one_line(e, lab).startswith(text), (change, str(e.value))
    assert not (lab.cloud.state.pool.path / "sendense").exists() or not any(
        (lab.cloud.state.pool.path / "sendense").iterdir()
    )  # validate made nothing


def test_a_volume_imported_after_its_answer_was_lost_is_found_and_removed_by_the_undo(
    lab: LabServer, tmp_path: Path
) -> None:
    """The agent loses importVolume's job answer (queryAsyncJobResult fails): the volume exists in
    CloudStack but not in the VM's record. destroy_vm finds it as the pool's volume on a recorded file."""
    disk = guest_disk(tmp_path / "vm.qcow2", writes=WRITES)
    spec = job_spec(lab, disk)
    tgt = point(spec, tmp_path / "work")
    vms = vms_for(spec)
    before = leftovers(lab)
    lab.cloud.faults.inject("queryAsyncJobResult", 530, text="the answer was lost")
    with pytest.raises(CloudStackApiError, match="the answer was lost"):
        vms.create_vm(VmPlan(name="lost", point_id="p1", memory_mib=256))
    deadline = time.monotonic() + 10
    while not (found := api(lab).call("listVolumes", name="lost-disk0").get("volume")):  # its job ends
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [v["state"] for v in found] == ["Ready"]  # made, unrecorded
    vms.destroy_vm("lost")
    assert leftovers(lab) == before and vms.list_vms() == []
    tgt.destroy()
