"""Volume commands: createVolume, attachVolume, detachVolume, resizeVolume (async) and deleteVolume.

createVolume only records the volume (`Allocated`, no storage yet); it gets its file when it is
attached to a VM whose volumes are on storage, or when that VM starts. Attached at deviceid 0 to a
Stopped VM with no ROOT, a volume becomes the VM's ROOT (the seed's failover flow: deploy with
startvm=false, detach and delete the new ROOT, attach the replica at deviceid 0). A running VM gets
data disks hot-plugged and unplugged through its host's libvirtd, and grown with blockresize.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labs.cloudstack import storage, views, wire
from labs.cloudstack.cloud import AsyncWork
from labs.cloudstack.state import GIB, Volume, new_id
from labs.cloudstack.vms import vm_volumes
from labs.cloudstack.wire import invalid
from tools.qemu import qemu_img

if TYPE_CHECKING:
    from labs.cloudstack.cloud import Cloud, Params

PKG = "org.apache.cloudstack.api.command.admin.volume"
NOT_ATTACHED = "Please specify a volume that is not attached to any VM."
ROOT_STATES = "Root volume detach can happen only when vm is in states: Stopped or Destroyed"


def _volume(c: Cloud, p: Params) -> Volume:
    vol: Volume = p.entity("id", c.state.volumes)
    return vol


def _result(c: Cloud, vol: Volume) -> dict[str, Any]:
    with c.state.lock:
        return {"volume": views.volume(c, vol)}


def _size(c: Cloud, p: Params, custom: bool) -> int | None:
    size = p.integer("size")
    if custom and size is None:
        raise invalid("This disk offering requires a custom size specified")
    if not custom and size is not None:
        raise invalid("This disk offering does not allow custom size")
    if size is not None and size <= 0:
        raise invalid(f"Disk size must be larger than 0 (size {size})")
    return None if size is None else size * GIB


def create_volume(c: Cloud, p: Params) -> AsyncWork:
    offering = p.entity("diskofferingid", c.state.disk_offerings)
    if p.need("zoneid") != c.state.zone.id:
        raise wire.bad_value(p.command, "zoneid", p.need("zoneid"))
    size = _size(c, p, offering.size_gib == 0) or offering.size_gib * GIB
    vol = Volume(
        new_id(), p.get("name") or f"DATA-{new_id()[:8]}", "DATADISK", size, diskoffering=offering.id
    )
    c.state.volumes[vol.id] = vol
    return AsyncWork(
        f"{PKG}.CreateVolumeCmdByAdmin", lambda: _result(c, vol), "Volume", vol.id, {"id": vol.id}
    )


def attach_volume(c: Cloud, p: Params) -> AsyncWork:
    vol = _volume(c, p)
    vm = p.entity("virtualmachineid", c.state.vms)
    deviceid = p.integer("deviceid")

    def run() -> dict[str, Any]:
        with c.state.lock:
            if vol.vm is not None:
                raise invalid(NOT_ATTACHED)
            if vol.state not in ("Allocated", "Ready"):
                raise invalid(
                    f"Volume {vol.name} is {vol.state}: volume state must be in Allocated, Ready or "
                    "Uploaded state"
                )
            if vm.state not in ("Running", "Stopped"):
                raise invalid("Please specify a VM that is either running or stopped.")
            used = {v.deviceid for v in vm_volumes(c, vm)}
            dev = deviceid if deviceid is not None else next(i for i in range(1, 64) if i not in used)
            if dev == 0 and vm.state != "Stopped":  # VolumeApiServiceImpl.validateRootVolumeDetachAttach
                raise invalid(ROOT_STATES)
            if dev == 0 and dev in used:
                raise invalid("Vm already has root volume attached to it")
            if dev in used:
                raise invalid(f"deviceId {dev} is used by vm {vm.instancename}")
            on_storage = any(v.state == "Ready" for v in vm_volumes(c, vm))
            if on_storage:
                storage.materialize(c.state, vol, c.state.pool)
            host = c.hosts[vm.host] if vm.state == "Running" and vm.host else None
        if host is not None and vol.file is not None:
            host.attach_disk(vm.instancename, dev, vol.file)
        with c.state.lock:
            vol.vm, vol.deviceid = vm.id, dev
            vol.type = "ROOT" if dev == 0 else "DATADISK"
        return _result(c, vol)

    return AsyncWork(f"{PKG}.AttachVolumeCmdByAdmin", run, "Volume", vol.id)


def detach_volume(c: Cloud, p: Params) -> AsyncWork:
    vol = _volume(c, p)

    def run() -> dict[str, Any]:
        with c.state.lock:
            if vol.vm is None:
                raise invalid(f"Volume {vol.name} is not attached to any VM")
            vm = c.state.vms[vol.vm]
            if vol.deviceid == 0 and vm.state != "Stopped":
                raise invalid(ROOT_STATES)
            host = c.hosts[vm.host] if vm.state == "Running" and vm.host else None
        if host is not None and vol.file is not None:
            host.detach_disk(vm.instancename, vol.deviceid or 0, vol.file)
        with c.state.lock:
            vol.vm, vol.deviceid = None, None
        return _result(c, vol)

    return AsyncWork(f"{PKG}.DetachVolumeCmdByAdmin", run, "Volume", vol.id)


def resize_volume(c: Cloud, p: Params) -> AsyncWork:
    vol = _volume(c, p)
    offering = p.entity("diskofferingid", c.state.disk_offerings, required=False)
    if offering is not None and offering.size_gib:
        new = offering.size_gib * GIB
    else:
        new = p.integer("size", required=True) * GIB  # type: ignore[operator]
    shrinkok = p.flag("shrinkok")

    def run() -> dict[str, Any]:
        with c.state.lock:
            if vol.state not in ("Allocated", "Ready"):
                raise invalid(
                    f"Volume {vol.name} is {vol.state}: only Allocated or Ready volumes can be resized"
                )
            if new < vol.size and not shrinkok:
                raise invalid(
                    f"Going from existing size of {vol.size} to size of {new} would shrink the volume. "
                    "Need to sign off by supplying the shrinkok parameter with value of true."
                )
            storage.grow_check(c.state, vol, new)
            vm = c.state.vms.get(vol.vm) if vol.vm else None
            host = c.hosts[vm.host] if vm is not None and vm.state == "Running" and vm.host else None
            if vol.file is not None and host is None:
                qemu_img("resize", "-q", *(["--shrink"] if new < vol.size else []), str(vol.file), str(new))
        if host is not None and vm is not None:
            host.resize_disk(vm.instancename, vol.deviceid or 0, new)
        with c.state.lock:
            vol.size = new
        return _result(c, vol)

    return AsyncWork(f"{PKG}.ResizeVolumeCmdByAdmin", run, "Volume", vol.id)


def delete_volume(c: Cloud, p: Params) -> dict[str, Any]:
    vol = _volume(c, p)
    if vol.vm is not None:
        raise invalid(NOT_ATTACHED)
    storage.remove(c.state, vol)
    return {"success": True}
