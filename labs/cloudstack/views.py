"""The lab's resources as CloudStack's list and job answers show them (field names as the API's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labs.cloudstack.state import GIB, MIB, DiskOffering, Network, Pool, ServiceOffering, Template, Vm, Volume

if TYPE_CHECKING:
    from labs.cloudstack.cloud import Cloud
    from labs.cloudstack.hosts import LabHost

OWNER = {"account": "admin", "domain": "ROOT"}


def zone(c: Cloud) -> dict[str, Any]:
    z = c.state.zone
    return {
        "id": z.id,
        "name": z.name,
        "networktype": "Advanced",
        "allocationstate": "Enabled",
        "localstorageenabled": False,
        "securitygroupsenabled": False,
    }


def _place(c: Cloud) -> dict[str, Any]:
    return {"zoneid": c.state.zone.id, "zonename": c.state.zone.name}


def pod(c: Cloud) -> dict[str, Any]:
    p = c.state.pod
    return {
        "id": p.id,
        "name": p.name,
        **_place(c),
        "gateway": "192.168.100.1",
        "netmask": "255.255.255.0",
        "allocationstate": "Enabled",
    }


def cluster(c: Cloud) -> dict[str, Any]:
    cl = c.state.cluster
    return {
        "id": cl.id,
        "name": cl.name,
        **_place(c),
        "podid": c.state.pod.id,
        "podname": c.state.pod.name,
        "hypervisortype": "KVM",
        "clustertype": "CloudManaged",
        "allocationstate": "Enabled",
        "managedstate": "Managed",
    }


def host(c: Cloud, h: LabHost) -> dict[str, Any]:
    used = [v for v in c.state.vms.values() if v.host == h.id and v.state in ("Running", "Starting")]
    mem = sum(v.offering.memory_mib for v in used) * MIB
    cpus = sum(v.offering.cpus for v in used)
    return {
        "id": h.id,
        "name": h.name,
        "type": "Routing",
        "hypervisor": "KVM",
        "state": "Up" if h.up else "Disconnected",
        "resourcestate": "Enabled",
        **_place(c),
        "podid": c.state.pod.id,
        "clusterid": c.state.cluster.id,
        "clustername": c.state.cluster.name,
        "ipaddress": "127.0.0.1",
        "cpunumber": h.cpus,
        "cpuspeed": 2000,
        "cpuallocated": f"{100 * cpus / h.cpus:.0f}%",
        "memorytotal": h.memory_mib * MIB,
        "memoryallocated": mem,
    }


def pool(c: Cloud, p: Pool) -> dict[str, Any]:
    # what the pool's filesystem holds (as libvirt reports a mount's use): every file under its
    # directory, volumes, template copies, and what else an agent keeps there (sendense's replicas)
    used = sum(f.stat().st_blocks * 512 for f in p.path.rglob("*") if f.is_file() and not f.is_symlink())
    return {
        "id": p.id,
        "name": p.name,
        **_place(c),
        "podid": c.state.pod.id,
        "clusterid": c.state.cluster.id,
        "clustername": c.state.cluster.name,
        "type": p.type,
        "path": str(p.path),
        "ipaddress": "127.0.0.1",
        "state": p.state,
        "scope": "CLUSTER",
        "hypervisor": "KVM",
        "disksizetotal": p.capacity,
        "disksizeallocated": c.state.allocated(p),
        "disksizeused": used,
    }


def service_offering(o: ServiceOffering) -> dict[str, Any]:
    return {
        "id": o.id,
        "name": o.name,
        "displaytext": o.name,
        "cpunumber": o.cpus,
        "cpuspeed": 2000,
        "memory": o.memory_mib,
        "storagetype": "shared",
        "provisioningtype": "thin",
    }


def disk_offering(o: DiskOffering) -> dict[str, Any]:
    return {
        "id": o.id,
        "name": o.name,
        "displaytext": o.name,
        "disksize": o.size_gib,
        "iscustomized": o.size_gib == 0,
        "storagetype": "shared",
        "provisioningtype": "thin",
    }


def template(c: Cloud, t: Template) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "displaytext": t.name,
        **_place(c),
        "format": "QCOW2",
        "hypervisor": "KVM",
        "ostypeid": t.ostypeid,
        "ostypename": t.ostypename,
        "size": t.size,
        "isready": True,
        "status": "Download Complete",
        "templatetype": "USER",
        "ispublic": True,
        "isfeatured": True,
        "bootable": True,
        **OWNER,
    }


def network(c: Cloud, n: Network) -> dict[str, Any]:
    return {
        "id": n.id,
        "name": n.name,
        "displaytext": n.name,
        **_place(c),
        "type": n.type,
        "traffictype": "Guest",
        "state": "Implemented" if n.type == "Isolated" else "Setup",
        "cidr": n.cidr,
        "gateway": n.gateway,
        "netmask": "255.255.255.0",
        **OWNER,
    }


def vm(c: Cloud, v: Vm) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": v.id,
        "name": v.name,
        "displayname": v.displayname,
        "instancename": v.instancename,
        "state": v.state,
        **_place(c),
        "templateid": v.template.id,
        "templatename": v.template.name,
        "ostypeid": v.template.ostypeid,
        "guestosid": v.template.ostypeid,
        "serviceofferingid": v.offering.id,
        "serviceofferingname": v.offering.name,
        "cpunumber": v.offering.cpus,
        "cpuspeed": 2000,
        "memory": v.offering.memory_mib,
        "hypervisor": "KVM",
        "created": v.created,
        "haenable": False,
        "rootdeviceid": 0,
        "rootdevicetype": "ROOT",
        **OWNER,
        "nic": [
            {
                "id": n.id,
                "networkid": n.network.id,
                "networkname": n.network.name,
                "macaddress": n.mac,
                "ipaddress": n.ip,
                "gateway": n.network.gateway,
                "netmask": "255.255.255.0",
                "isdefault": n.isdefault,
                "type": n.network.type,
                "traffictype": "Guest",
            }
            for n in v.nics
        ],
    }
    if v.host is not None:
        h = c.hosts[v.host]
        out |= {"hostid": h.id, "hostname": h.name}
    if v.last_host is not None:
        out["lastupdated"] = v.created
    return out


def volume(c: Cloud, v: Volume) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": v.id,
        "name": v.name,
        **_place(c),
        "type": v.type,
        "size": v.size,
        "state": v.state,
        "created": v.created,
        "hypervisor": "KVM",
        "storagetype": "shared",
        "provisioningtype": "thin",
        "destroyed": False,
        **OWNER,
    }
    if v.pool is not None:
        out |= {"storageid": v.pool.id, "storage": v.pool.name, "path": v.path or v.id}
    if v.diskoffering is not None:
        o = c.state.disk_offerings[v.diskoffering]
        out |= {"diskofferingid": o.id, "diskofferingname": o.name}
    if v.template is not None:
        out["templateid"] = v.template
    if v.vm is not None:
        owner = c.state.vms[v.vm]
        out |= {
            "virtualmachineid": owner.id,
            "vmname": owner.name,
            "vmdisplayname": owner.displayname,
            "vmstate": owner.state,
            "deviceid": v.deviceid,
        }
    return out


def gib(size: int) -> str:
    return f"{size / GIB:g} GiB"
