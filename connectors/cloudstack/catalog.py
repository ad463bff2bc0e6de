"""What a VM from a point is made of, looked up in the target's zone by the names the spec gives: the
service offering (or the smallest that fits the plan's CPUs and memory), the template it is deployed
from, the disk offering imported volumes get, the networks its NICs are on. Each lookup fails in one
line naming the spec field, before anything is made."""

from __future__ import annotations

from typing import Any

from connectors.cloudstack.client import CloudStackClient
from connectors.cloudstack.spec import UUID, CloudStackTarget
from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.models import VmPlan


def _named(
    api: CloudStackClient, command: str, item: str, value: str, field: str, what: str, **kw: Any
) -> dict[str, Any]:
    by: dict[str, Any] = {"id": value} if UUID.match(value) else {"name": value}
    try:
        found = api.list(command, item, f"{command} {value}", **kw, **by)
    except ResourceNotFound:
        found = []
    found = [x for x in found if value in (x.get("id"), x.get("name"))]
    if not found:
        raise InvalidSpec(f"{field}: no {what} {value!r} at {api.url}")
    if len(found) > 1:
        ids = ", ".join(str(x["id"]) for x in found)
        raise InvalidSpec(f"{field}: {len(found)} {what}s are named {value!r}: name it by id ({ids})")
    return found[0]


def service_offering(api: CloudStackClient, spec: CloudStackTarget, plan: VmPlan) -> dict[str, Any]:
    """The spec's offering, or the smallest fixed one with the plan's CPUs and memory."""
    if spec.service_offering:
        return named_offering(api, spec)
    fits = [
        o
        for o in api.list("listServiceOfferings", "serviceoffering", "listServiceOfferings")
        if int(o.get("cpunumber") or 0) >= plan.cpus and int(o.get("memory") or 0) >= plan.memory_mib
    ]
    if not fits:
        raise InvalidSpec(
            f"target.service_offering: no service offering at {api.url} has {plan.cpus} CPUs and "
            f"{plan.memory_mib} MiB; name one"
        )
    return min(fits, key=lambda o: (int(o["memory"]), int(o["cpunumber"]), str(o.get("name"))))


def named_offering(api: CloudStackClient, spec: CloudStackTarget) -> dict[str, Any]:
    assert spec.service_offering
    return _named(
        api, "listServiceOfferings", "serviceoffering", spec.service_offering,
        "target.service_offering", "service offering",
    )  # fmt: skip


def template(api: CloudStackClient, spec: CloudStackTarget, zone_id: str) -> dict[str, Any]:
    if not spec.template:
        raise InvalidSpec(
            "target.template: name the template VMs from points are deployed from (CloudStack deploys "
            "a VM from a template; its root disk is then replaced by the point's)"
        )
    return _named(
        api, "listTemplates", "template", spec.template, "target.template", "template",
        templatefilter="executable", zoneid=zone_id,
    )  # fmt: skip


def disk_offering(api: CloudStackClient, spec: CloudStackTarget) -> dict[str, Any] | None:
    if not spec.disk_offering:
        return None
    return _named(
        api, "listDiskOfferings", "diskoffering", spec.disk_offering, "target.disk_offering", "disk offering"
    )


def network(api: CloudStackClient, value: str, field: str, zone_id: str) -> dict[str, Any]:
    return _named(api, "listNetworks", "network", value, field, "network in the zone", zoneid=zone_id)


def drill_network(api: CloudStackClient, spec: CloudStackTarget, zone_id: str) -> dict[str, Any]:
    if not spec.drill_network:
        raise InvalidSpec("target.drill_network: name the isolated network drills run on")
    net = network(api, spec.drill_network, "target.drill_network", zone_id)
    if str(net.get("type", "")).lower() == "shared":
        raise InvalidSpec(
            f"target.drill_network: network {spec.drill_network} is Shared: a drill runs on an "
            "isolated network, apart from production"
        )
    return net


def networks(
    api: CloudStackClient, spec: CloudStackTarget, plan: VmPlan, zone_id: str
) -> list[dict[str, Any]]:
    """The networks of the VM's NICs, in the NICs' order: a test VM's one, `target.drill_network`
    (isolated: never a Shared network); a production VM's, each source NIC's network mapped by the
    plan's `network_map`, else `target.networks` (a `*` source maps any), a VM without NICs given
    the `*` mapping's."""
    if plan.mode == "test":
        return [drill_network(api, spec, zone_id)]
    mapped = {m.source: m.target for m in spec.networks}
    sources = [n.network for n in plan.nics] or ["*"]
    out = []
    for i, src in enumerate(sources):
        dest = plan.network_map.get(src) or mapped.get(src) or mapped.get("*")
        if not dest:
            raise InvalidSpec(
                f"target.networks: the source network {src or '(none)'} of NIC {i} is not mapped "
                "(map it, or map '*')"
            )
        out.append(network(api, dest, "target.networks", zone_id))
    return out
