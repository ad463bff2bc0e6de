"""vSphere lab (vcsim-lab): configuration semantics a connector relies on, through unmodified pyvmomi.

extraConfig and custom field values replace (stock vcsim appended duplicates), an empty extraConfig value
removes the key; capability.changeTrackingSupported follows the virtual hardware version (vmx-07 and
later) and enabling tracking on older hardware faults; RevertToSnapshot_Task restores the VM's
configuration as of the snapshot, but not its custom field values. See labs/vsphere/NOTES.md.
"""

from __future__ import annotations

from typing import Any

import pytest
from pyVmomi import vim, vmodl

from labs.vsphere import VsphereLab

MIB = 1 << 20


@pytest.fixture(scope="module")
def lab():
    with VsphereLab() as lab:
        yield lab


def _extra(vm) -> list[tuple[str, Any]]:
    return [(o.key, o.value) for o in vm.config.extraConfig if o.key != "govcsim"]


def _set_extra(lab: VsphereLab, vm, **kv: str) -> None:
    opts = [vim.option.OptionValue(key=k, value=v) for k, v in kv.items()]
    lab.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=opts)))


def _field(lab: VsphereLab, name: str) -> int:
    cfm = lab.si().RetrieveContent().customFieldsManager
    return cfm.AddCustomFieldDef(name=name, moType=vim.VirtualMachine).key


def _custom(vm) -> list[tuple[int, str]]:
    return sorted((v.key, v.value) for v in vm.customValue)


def _disks(vm_or_snap) -> list[Any]:
    return [d for d in vm_or_snap.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def test_extra_config_replaces_and_empty_value_removes(lab):
    vm = lab.vm(lab.make_vm("xcfg", [MIB], extra_config={"sendense.a": "1", "sendense.b": "x"}))
    assert _extra(vm) == [("sendense.a", "1"), ("sendense.b", "x")]
    _set_extra(lab, vm, **{"sendense.a": "2"})
    assert _extra(vm) == [("sendense.a", "2"), ("sendense.b", "x")]  # stock vcsim: a second "sendense.a"
    _set_extra(lab, vm, **{"sendense.c": "3", "sendense.a": "4"})
    assert _extra(vm) == [("sendense.a", "4"), ("sendense.b", "x"), ("sendense.c", "3")]
    _set_extra(lab, vm, **{"sendense.a": ""})  # vSphere: an empty value removes the key
    assert _extra(vm) == [("sendense.b", "x"), ("sendense.c", "3")]
    _set_extra(lab, vm, **{"sendense.nothing": ""})  # removing a key that is not there: no-op
    assert _extra(vm) == [("sendense.b", "x"), ("sendense.c", "3")]


def test_set_field_replaces_the_value(lab):
    vm = lab.vm(lab.make_vm("cf", [MIB]))
    other = lab.vm(lab.make_vm("cf-other", [MIB]))
    cfm = lab.si().RetrieveContent().customFieldsManager
    k1, k2 = _field(lab, "sendense.f1"), _field(lab, "sendense.f2")
    cfm.SetField(entity=vm, key=k1, value="one")
    cfm.SetField(entity=vm, key=k2, value="two")
    cfm.SetField(entity=other, key=k1, value="other")
    cfm.SetField(entity=vm, key=k1, value="uno")  # stock vcsim: a second value for k1
    assert _custom(vm) == [(k1, "uno"), (k2, "two")]
    assert sorted((v.key, v.value) for v in vm.value) == [(k1, "uno"), (k2, "two")]
    assert _custom(other) == [(k1, "other")]


def test_change_tracking_supported_follows_hardware_version(lab):
    modern = lab.vm(lab.make_vm("hw-default", [MIB], cbt=False))
    assert modern.config.version == "vmx-13"
    assert modern.capability.changeTrackingSupported is True  # stock vcsim: unset
    inventory = lab.si().RetrieveContent().searchIndex.FindByInventoryPath("DC0/vm/DC0_H0_VM0")
    assert inventory.capability.changeTrackingSupported is True
    assert lab.vm(lab.make_vm("hw7", [MIB], version="vmx-07")).capability.changeTrackingSupported is True

    old = lab.vm(lab.make_vm("hw4", [MIB], cbt=False, version="vmx-04"))
    assert old.config.version == "vmx-04"
    assert old.capability.changeTrackingSupported is False
    with pytest.raises(vmodl.fault.NotSupported):
        lab.wait(old.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert not old.config.changeTrackingEnabled
    lab.wait(old.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)))  # off is fine
    with pytest.raises(vmodl.fault.NotSupported):  # nor can such a VM be created with tracking on
        lab.make_vm("hw4-cbt", [MIB], cbt=True, version="vmx-04")
    lab.wait(old.UpgradeVM_Task())  # to the lab's version (vmx-13): supported from then on
    assert old.capability.changeTrackingSupported is True
    lab.wait(old.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert old.config.changeTrackingEnabled


def test_revert_restores_the_config_but_not_custom_values(lab):
    moref = lab.make_vm("revcfg", [MIB], extra_config={"sendense.k": "v1"})
    vm = lab.vm(moref)
    cfm = lab.si().RetrieveContent().customFieldsManager
    key = _field(lab, "sendense.rev")
    cfm.SetField(entity=vm, key=key, value="before")
    s1 = lab.wait(vm.CreateSnapshot_Task(name="s1", description="", memory=False, quiesce=False))
    s1_disk = _disks(s1)[0].backing.fileName

    ctrl = next(
        d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.ParaVirtualSCSIController)
    )
    new_disk = vim.vm.device.VirtualDisk(
        key=-1,
        controllerKey=ctrl.key,
        unitNumber=1,
        capacityInBytes=2 * MIB,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            diskMode="persistent", thinProvisioned=True, fileName="[LocalDS_0]"
        ),
    )
    spec = vim.vm.ConfigSpec(
        numCPUs=2,
        memoryMB=128,
        annotation="changed",
        extraConfig=[
            vim.option.OptionValue(key="sendense.k", value="v2"),
            vim.option.OptionValue(key="sendense.new", value="n"),
        ],
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=new_disk)
        ],
    )
    lab.wait(vm.ReconfigVM_Task(spec=spec))
    cfm.SetField(entity=vm, key=key, value="after")
    assert len(_disks(vm)) == 2 and vm.config.hardware.numCPU == 2
    # the snapshot's config is its own: the reconfigure did not change it
    assert [(o.key, o.value) for o in s1.config.extraConfig if o.key.startswith("sendense.")] == [
        ("sendense.k", "v1")
    ]
    assert len(_disks(s1)) == 1 and s1.config.hardware.numCPU == 1

    lab.wait(s1.RevertToSnapshot_Task())
    assert _extra(vm) == [("sendense.k", "v1")]
    assert (vm.config.hardware.numCPU, vm.config.hardware.memoryMB) == (1, 64)
    assert (vm.summary.config.numCpu, vm.summary.config.memorySizeMB) == (1, 64)
    assert vm.config.annotation in (None, "")
    assert vm.config.changeTrackingEnabled is True
    assert vm.config.name == "revcfg"
    disks = _disks(vm)
    assert len(disks) == 1  # the disk added after s1 is gone from the config
    assert disks[0].backing.parent.fileName == s1_disk and disks[0].backing.fileName != s1_disk
    assert not disks[0].backing.changeId
    assert _custom(vm) == [(key, "after")]  # custom values are not part of the config
    # the VM works on: a snapshot of the reverted VM tracks changes from s1
    s2 = lab.wait(vm.CreateSnapshot_Task(name="s2", description="", memory=False, quiesce=False))
    cid = _disks(s1)[0].backing.changeId
    info = vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=disks[0].key, startOffset=0, changeId=cid)
    assert info.changedArea == []
