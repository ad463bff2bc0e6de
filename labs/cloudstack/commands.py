"""The lab's command table: list commands, queryAsyncJobResult / listAsyncJobs, deleteVolume (sync) and
the async commands of labs/cloudstack/vms.py, volumes.py and imports.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from labs.cloudstack import imports, views, vms, volumes, wire
from labs.cloudstack.wire import list_payload

if TYPE_CHECKING:
    from labs.cloudstack.cloud import AsyncHandler, Cloud, Params, SyncHandler


def _filtered(items: Iterable[Any], p: Params, table: dict[str, Any], key: Callable[[Any], str]) -> list[Any]:
    """Items, narrowed by `id` (which must name one: CloudStack answers 431 otherwise) and `name`."""
    if p.get("id") is not None:
        wanted = p.entity("id", table)
        items = [i for i in items if i is wanted]
    name = p.get("name")
    if name is not None:
        items = [i for i in items if key(i) == name]
    kw = p.get("keyword")
    if kw is not None:
        items = [i for i in items if kw.lower() in key(i).lower()]
    return list(items)


def _zone_check(c: Cloud, p: Params) -> None:
    z = p.get("zoneid")
    if z is not None and z != c.state.zone.id:
        raise wire.bad_value(p.command, "zoneid", z)


def list_zones(c: Cloud, p: Params) -> dict[str, Any]:
    z = c.state.zone
    items = _filtered([z], p, {z.id: z}, lambda x: x.name)
    return list_payload("zone", [views.zone(c) for _ in items])


def list_pods(c: Cloud, p: Params) -> dict[str, Any]:
    _zone_check(c, p)
    pod = c.state.pod
    return list_payload("pod", [views.pod(c) for _ in _filtered([pod], p, {pod.id: pod}, lambda x: x.name)])


def list_clusters(c: Cloud, p: Params) -> dict[str, Any]:
    _zone_check(c, p)
    cl = c.state.cluster
    items = _filtered([cl], p, {cl.id: cl}, lambda x: x.name)
    return list_payload("cluster", [views.cluster(c) for _ in items])


def list_hosts(c: Cloud, p: Params) -> dict[str, Any]:
    _zone_check(c, p)
    items = _filtered(c.hosts.values(), p, c.hosts, lambda h: h.name)
    t = p.get("type")
    if t is not None and t != "Routing":
        items = []
    return list_payload("host", [views.host(c, h) for h in items])


def list_storage_pools(c: Cloud, p: Params) -> dict[str, Any]:
    _zone_check(c, p)
    items = _filtered(c.state.pools.values(), p, c.state.pools, lambda x: x.name)
    return list_payload("storagepool", [views.pool(c, x) for x in items])


def list_service_offerings(c: Cloud, p: Params) -> dict[str, Any]:
    t = c.state.service_offerings
    return list_payload(
        "serviceoffering", [views.service_offering(o) for o in _filtered(t.values(), p, t, lambda o: o.name)]
    )


def list_disk_offerings(c: Cloud, p: Params) -> dict[str, Any]:
    t = c.state.disk_offerings
    return list_payload(
        "diskoffering", [views.disk_offering(o) for o in _filtered(t.values(), p, t, lambda o: o.name)]
    )


TEMPLATE_FILTERS = (
    "featured",
    "self",
    "selfexecutable",
    "sharedexecutable",
    "executable",
    "community",
    "all",
)


def list_templates(c: Cloud, p: Params) -> dict[str, Any]:
    f = p.need("templatefilter")
    if f not in TEMPLATE_FILTERS:
        raise wire.invalid(f"Invalid template filter {f}: one of {', '.join(TEMPLATE_FILTERS)}")
    _zone_check(c, p)
    t = c.state.templates
    return list_payload(
        "template", [views.template(c, x) for x in _filtered(t.values(), p, t, lambda x: x.name)]
    )


def list_networks(c: Cloud, p: Params) -> dict[str, Any]:
    _zone_check(c, p)
    t = c.state.networks
    items = _filtered(t.values(), p, t, lambda x: x.name)
    kind = p.get("type")
    if kind is not None:
        items = [n for n in items if n.type.lower() == kind.lower()]
    return list_payload("network", [views.network(c, n) for n in items])


def list_virtual_machines(c: Cloud, p: Params) -> dict[str, Any]:
    _zone_check(c, p)
    vms.sync_power(c)
    t = c.state.vms
    items = [v for v in _filtered(t.values(), p, t, lambda v: v.name) if v.state != "Expunging"]
    if p.get("hostid") is not None:
        h = p.entity("hostid", c.hosts)
        items = [v for v in items if v.host == h.id]
    state = p.get("state")
    if state is not None:
        items = [v for v in items if v.state.lower() == state.lower()]
    return list_payload("virtualmachine", [views.vm(c, v) for v in items])


def list_volumes(c: Cloud, p: Params) -> dict[str, Any]:
    _zone_check(c, p)
    t = c.state.volumes
    items = _filtered(t.values(), p, t, lambda v: v.name)
    if p.get("virtualmachineid") is not None:
        owner = p.entity("virtualmachineid", c.state.vms)
        items = [v for v in items if v.vm == owner.id]
    if p.get("storageid") is not None:
        pool = p.entity("storageid", c.state.pools)
        items = [v for v in items if v.pool is pool]
    kind = p.get("type")
    if kind is not None:
        items = [v for v in items if v.type == kind.upper()]
    items.sort(key=lambda v: (v.vm or "", v.deviceid if v.deviceid is not None else 99, v.created))
    return list_payload("volume", [views.volume(c, v) for v in items])


def query_async_job_result(c: Cloud, p: Params) -> dict[str, Any]:
    job = p.entity("jobid", c.state.jobs)
    return c.job_view(job)


def list_async_jobs(c: Cloud, p: Params) -> dict[str, Any]:
    return list_payload("asyncjobs", [c.job_view(j) for j in c.state.jobs.values()])


SYNC: dict[str, SyncHandler] = {
    "listZones": list_zones,
    "listPods": list_pods,
    "listClusters": list_clusters,
    "listHosts": list_hosts,
    "listStoragePools": list_storage_pools,
    "listServiceOfferings": list_service_offerings,
    "listDiskOfferings": list_disk_offerings,
    "listTemplates": list_templates,
    "listNetworks": list_networks,
    "listVirtualMachines": list_virtual_machines,
    "listVolumes": list_volumes,
    "queryAsyncJobResult": query_async_job_result,
    "listAsyncJobs": list_async_jobs,
    "deleteVolume": volumes.delete_volume,
    "listVolumesForImport": imports.list_volumes_for_import,
}

ASYNC: dict[str, AsyncHandler] = {
    "deployVirtualMachine": vms.deploy,
    "startVirtualMachine": vms.start,
    "stopVirtualMachine": vms.stop,
    "destroyVirtualMachine": vms.destroy,
    "migrateVirtualMachine": vms.migrate,
    "createVolume": volumes.create_volume,
    "attachVolume": volumes.attach_volume,
    "detachVolume": volumes.detach_volume,
    "resizeVolume": volumes.resize_volume,
    "importVolume": imports.import_volume,
    "unmanageVolume": imports.unmanage_volume,
}
