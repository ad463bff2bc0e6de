"""VM commands: deployVirtualMachine, start, stop, destroy and migrate (all async).

A VM runs on one lab host's libvirtd as a transient domain named by its instancename (hosts.py).
Placement takes the asked host, else the VM's last host, else the first host that is Up and has the
CPUs and memory of the offering free; none: CloudStack's 533 (InsufficientServerCapacityException).
Migration is live by default: libvirt's migrate3 from one host's libvirtd to the other's, QEMU's
stream over loopback, the disks shared (the same files on the one pool directory), the guest running
on; with `live_migration` off it is a cold move (destroy on one host, start on the other over the same
volume files: the guest restarts). Either way the volumes, their ids and paths stay.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from labs.cloudstack import storage, views, wire
from labs.cloudstack.cloud import AsyncWork
from labs.cloudstack.state import GIB, Nic, Vm, Volume, new_id
from labs.cloudstack.wire import ApiError, invalid

if TYPE_CHECKING:
    from labs.cloudstack.cloud import Cloud, Params
    from labs.cloudstack.hosts import LabHost

DEPLOY_CMD = "org.apache.cloudstack.api.command.admin.vm.DeployVMCmdByAdmin"


def _mac() -> str:
    return "02:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(4))


def sync_power(c: Cloud) -> None:
    """A Running VM whose domain is gone (the guest powered off) is Stopped, as CloudStack's power
    state sync reports it. Caller holds the lock."""
    for vm in c.state.vms.values():
        if vm.state == "Running" and vm.host is not None and not c.hosts[vm.host].running(vm.instancename):
            vm.state, vm.last_host, vm.host = "Stopped", vm.host, None


def _free(c: Cloud, h: LabHost, exclude: str | None = None) -> tuple[int, int]:
    used = [
        v
        for v in c.state.vms.values()
        if v.host == h.id and v.id != exclude and v.state in ("Running", "Starting", "Migrating")
    ]
    return h.cpus - sum(v.offering.cpus for v in used), h.memory_mib - sum(
        v.offering.memory_mib for v in used
    )


def _fits(c: Cloud, h: LabHost, vm: Vm) -> bool:
    cpus, mem = _free(c, h, exclude=vm.id)
    return h.up and cpus >= vm.offering.cpus and mem >= vm.offering.memory_mib


def _no_host(vm: Vm, why: str) -> ApiError:
    return ApiError(
        wire.INSUFFICIENT_CAPACITY_ERROR,
        f'Unable to create a deployment for VM instance {{"id": "{vm.id}", "instanceName": '
        f'"{vm.instancename}"}}: {why}',
        wire.CS_INSUFFICIENT_SERVER_CAPACITY,
    )


def place(c: Cloud, vm: Vm, wanted: LabHost | None) -> LabHost:
    if wanted is not None:
        if not _fits(c, wanted, vm):
            raise _no_host(
                vm,
                f"host {wanted.name} has not {vm.offering.cpus} CPUs and "
                f"{vm.offering.memory_mib} MiB free, or is not Up",
            )
        return wanted
    order = sorted(c.hosts.values(), key=lambda h: h.id != vm.last_host)
    for h in order:
        if _fits(c, h, vm):
            return h
    raise _no_host(vm, f"no host is Up with {vm.offering.cpus} CPUs and {vm.offering.memory_mib} MiB free")


def vm_volumes(c: Cloud, vm: Vm) -> list[Volume]:
    vols = [v for v in c.state.volumes.values() if v.vm == vm.id]
    return sorted(vols, key=lambda v: v.deviceid or 0)


def _boot(c: Cloud, vm: Vm, host: LabHost) -> None:
    """Put the VM's volumes on storage and start its domain on `host` (the lock is held to decide,
    released while libvirt starts it)."""
    with c.state.lock:
        vols = vm_volumes(c, vm)
        if not any(v.deviceid == 0 for v in vols):
            raise invalid(f"VM {vm.name} has no ROOT volume (deviceid 0): attach one to start it")
        for v in vols:
            storage.materialize(c.state, v, c.state.pool)
        vm.state, vm.host = "Starting", host.id
        xml = host.domain_xml(
            vm.instancename,
            vm.id,
            vm.offering.cpus,
            vm.offering.memory_mib,
            [(v.deviceid or 0, v.file) for v in vols if v.file is not None],
            [n.mac for n in vm.nics],
        )
    try:
        host.start_domain(xml, vm.instancename)
    except BaseException:
        with c.state.lock:
            vm.state, vm.host, vm.last_host = "Stopped", None, host.id
        raise
    with c.state.lock:
        vm.state, vm.last_host = "Running", host.id


def _result(c: Cloud, vm: Vm) -> dict[str, Any]:
    with c.state.lock:
        return {"virtualmachine": views.vm(c, vm)}


def deploy(c: Cloud, p: Params) -> AsyncWork:
    offering = p.entity("serviceofferingid", c.state.service_offerings)
    template = p.entity("templateid", c.state.templates)
    if p.need("zoneid") != c.state.zone.id:
        raise wire.bad_value(p.command, "zoneid", p.need("zoneid"))
    net_ids = [n for n in (p.get("networkids") or "").split(",") if n]
    for n in net_ids:
        if n not in c.state.networks:
            raise wire.bad_value(p.command, "networkids", n)
    networks = [c.state.networks[n] for n in net_ids] or [
        next(n for n in c.state.networks.values() if n.type == "Isolated")
    ]
    wanted = p.entity("hostid", c.hosts, required=False)
    root_gib = p.integer("rootdisksize")
    size = template.size
    if root_gib is not None:
        if root_gib * GIB < template.size:
            raise invalid(
                f"Root disk size ({root_gib} GB) is smaller than the template's ({views.gib(template.size)})"
            )
        size = root_gib * GIB
    num = c.state.next_num()
    name = p.get("name") or f"VM-{new_id()}"
    if any(v.name == name for v in c.state.vms.values() if v.state not in ("Expunging",)):
        raise invalid(f"The vm with hostName {name} already exists in the network domain")
    nics = [Nic(new_id(), n, _mac(), c.state.next_ip(n), i == 0) for i, n in enumerate(networks)]
    vm = Vm(new_id(), num, name, p.get("displayname") or name, offering, template, nics)
    startvm = p.flag("startvm", True)
    vm.state = "Starting" if startvm else "Stopped"
    c.state.vms[vm.id] = vm
    root = Volume(new_id(), f"ROOT-{num}", "ROOT", size, vm=vm.id, deviceid=0, template=template.id)
    c.state.volumes[root.id] = root

    def run() -> dict[str, Any]:
        if startvm:
            try:
                with c.state.lock:
                    host = place(c, vm, wanted)
                _boot(c, vm, host)
            except ApiError:
                with c.state.lock:
                    vm.state = "Error"
                raise
        return _result(c, vm)

    return AsyncWork(DEPLOY_CMD, run, "VirtualMachine", vm.id, {"id": vm.id})


def _vm(c: Cloud, p: Params, name: str = "id") -> Vm:
    vm: Vm = p.entity(name, c.state.vms)
    if vm.state == "Expunging":
        raise wire.bad_value(p.command, name, vm.id)
    return vm


def start(c: Cloud, p: Params) -> AsyncWork:
    vm = _vm(c, p)
    wanted = p.entity("hostid", c.hosts, required=False)

    def run() -> dict[str, Any]:
        with c.state.lock:
            sync_power(c)
            if vm.state == "Running":
                raise invalid(f"The virtual machine {vm.id} ({vm.displayname}) is already running")
            if vm.state != "Stopped":
                raise invalid(f"VM {vm.name} is {vm.state}: only a Stopped VM can be started")
            host = place(c, vm, wanted)
        _boot(c, vm, host)
        return _result(c, vm)

    return AsyncWork(
        "org.apache.cloudstack.api.command.admin.vm.StartVMCmdByAdmin", run, "VirtualMachine", vm.id
    )


def _halt(c: Cloud, vm: Vm, forced: bool) -> None:
    with c.state.lock:
        if vm.host is None:
            return
        host, vm.state = c.hosts[vm.host], "Stopping"
    host.stop_domain(vm.instancename, forced, c.config.stop_timeout)
    with c.state.lock:
        vm.state, vm.last_host, vm.host = "Stopped", host.id, None


def stop(c: Cloud, p: Params) -> AsyncWork:
    vm = _vm(c, p)
    forced = p.flag("forced")

    def run() -> dict[str, Any]:
        with c.state.lock:
            if vm.state not in ("Running", "Stopped", "Error"):
                raise invalid(f"VM {vm.name} is {vm.state}: it cannot be stopped now")
        _halt(c, vm, forced)
        return _result(c, vm)

    return AsyncWork(
        "org.apache.cloudstack.api.command.admin.vm.StopVMCmdByAdmin", run, "VirtualMachine", vm.id
    )


def destroy(c: Cloud, p: Params) -> AsyncWork:
    vm = _vm(c, p)
    expunge = p.flag("expunge")

    def run() -> dict[str, Any]:
        _halt(c, vm, True)
        with c.state.lock:
            view = views.vm(c, vm) | {"state": "Destroyed"}
            for v in vm_volumes(c, vm):
                if v.type == "ROOT":
                    if expunge:
                        storage.remove(c.state, v)
                    else:
                        v.state = "Destroy"
                else:  # data volumes are detached and kept
                    v.vm, v.deviceid = None, None
            if expunge:
                vm.state = "Expunging"
                c.state.vms.pop(vm.id, None)
            else:
                vm.state = "Destroyed"
        return {"virtualmachine": view}

    return AsyncWork(
        "org.apache.cloudstack.api.command.admin.vm.DestroyVMCmdByAdmin", run, "VirtualMachine", vm.id
    )


def migrate(c: Cloud, p: Params) -> AsyncWork:
    vm = _vm(c, p, "virtualmachineid")
    wanted = p.entity("hostid", c.hosts, required=False)

    def run() -> dict[str, Any]:
        with c.state.lock:
            sync_power(c)
            if vm.state != "Running" or vm.host is None:
                raise invalid(f"VM is not Running, unable to migrate the vm {vm.instancename}")
            if wanted is not None and wanted.id == vm.host:
                raise invalid("Cannot migrate VM, destination host is same as current host")
            source = c.hosts[vm.host]
            if wanted is None:
                others = [h for h in c.hosts.values() if h.id != source.id and _fits(c, h, vm)]
                if not others:
                    raise _no_host(vm, "no other host is Up with room for it")
                target = others[0]
            else:
                target = place(c, vm, wanted)
            vm.state = "Migrating"
        if c.config.live_migration:
            try:
                source.migrate_to(vm.instancename, target)
            finally:
                with c.state.lock:
                    moved = target.running(vm.instancename)
                    vm.state, vm.host = "Running", (target if moved else source).id
            return _result(c, vm)
        source.stop_domain(vm.instancename, True, 0)
        with c.state.lock:
            vm.host, vm.state = None, "Stopped"
        _boot(c, vm, target)
        return _result(c, vm)

    return AsyncWork("org.apache.cloudstack.api.command.admin.vm.MigrateVMCmd", run, "VirtualMachine", vm.id)
