"""What the CloudStack connectors ask of the API, each as one call with a one-line error naming what the
spec names (the zone, the VM, the pool, an offering), never an internal id alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.cloudstack.client import CloudStackClient
from connectors.cloudstack.spec import UUID, CloudStackPlace, CloudStackSource, key_envs
from sendense.errors import InvalidSpec, ResourceNotFound

GIB = 1 << 30


def client_for(place: CloudStackPlace, **kw: Any) -> CloudStackClient:
    """A client of the end's management server with the agent's keys of the end's login."""
    key_env, secret_env = key_envs(place.login)
    return CloudStackClient.from_env(place.url.rstrip("/"), key_env, secret_env, **kw)


def zone(api: CloudStackClient, place: CloudStackPlace, end: str) -> dict[str, Any]:
    """The end's zone (by id or name)."""
    by: dict[str, Any] = {"id": place.zone} if UUID.match(place.zone) else {"name": place.zone}
    try:
        found = api.list("listZones", "zone", f"listZones {place.zone}", **by)
    except ResourceNotFound:
        found = []
    if not found:
        raise InvalidSpec(f"{end}.zone: no zone {place.zone!r} at {place.url}")
    return found[0]


def find_vm(api: CloudStackClient, spec: CloudStackSource) -> dict[str, Any]:
    """The source VM: by its pinned id if the job has one (a VM renamed is still found; another VM
    under the name is refused), else by name in the zone (one, or a one-line error)."""
    z = zone(api, spec, "source")
    vm_id = spec.the_id()
    if vm_id is not None:
        try:
            found = api.list(
                "listVirtualMachines", "virtualmachine", f"listVirtualMachines {spec.vm}", id=vm_id
            )
        except ResourceNotFound:
            found = []
        if not found:
            raise ResourceNotFound(f"source.vm: CloudStack VM {spec.vm} ({vm_id}) is gone from {spec.url}")
        vm = found[0]
        if vm.get("zoneid") != z["id"]:
            raise InvalidSpec(f"source.vm: CloudStack VM {spec.vm} is not in zone {spec.zone}")
        return vm
    found = [
        v
        for v in api.list(
            "listVirtualMachines",
            "virtualmachine",
            f"listVirtualMachines {spec.vm}",
            zoneid=z["id"],
            name=spec.vm,
        )
        if v.get("name") == spec.vm  # (listVirtualMachines' name is a substring filter)
    ]
    if not found:
        raise ResourceNotFound(f"source.vm: no CloudStack VM {spec.vm!r} in zone {spec.zone}")
    if len(found) > 1:
        raise InvalidSpec(
            f"source.vm: {len(found)} CloudStack VMs are named {spec.vm!r} in zone {spec.zone}: "
            f"name it by id ({', '.join(v['id'] for v in found)})"
        )
    return found[0]


def vm_volumes(api: CloudStackClient, vm: dict[str, Any]) -> list[dict[str, Any]]:
    """The VM's volumes (ROOT and data), by device id."""
    vols = api.list("listVolumes", "volume", f"listVolumes of VM {vm['name']}", virtualmachineid=vm["id"])
    return sorted(vols, key=lambda v: int(v.get("deviceid") or 0))


def pool(api: CloudStackClient, pool_id: str, what: str) -> dict[str, Any]:
    """A primary storage pool by id."""
    found = api.list("listStoragePools", "storagepool", f"listStoragePools of {what}", id=pool_id)
    if not found:
        raise ResourceNotFound(f"{what}: its primary storage pool {pool_id} is gone")
    return found[0]


FILE_POOLS = ("Filesystem", "SharedMountPoint")
NFS_POOLS = ("NetworkFilesystem",)
NFS_MOUNTS = Path("/mnt")  # where CloudStack's KVM agent mounts an NFS pool: /mnt/<pool uuid>


def pool_dir(pool: dict[str, Any]) -> Path | None:
    """Where a KVM host sees a primary storage pool's files: CloudStack's KVM agent mounts an NFS pool
    at /mnt/<pool id>; a local (Filesystem) or SharedMountPoint pool is its path on every host. None:
    the pool's volumes are not files (RBD, iSCSI, ...)."""
    kind = str(pool.get("type", ""))
    if kind in FILE_POOLS:
        return Path(str(pool["path"]))
    if kind in NFS_POOLS:
        return NFS_MOUNTS / str(pool["id"])
    return None


def disk_key(deviceid: int) -> str:
    """The libvirt target CloudStack's KVM agent gives a volume of `deviceid` (vda for ROOT, 0)."""
    letters = ""
    n = deviceid + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "vd" + letters
