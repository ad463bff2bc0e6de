"""Where a CloudStack VM runs now, as the API says (`hostname` of listVirtualMachines: the KVM host's
name, which is the host id its sendense agent runs under). Asked on the control queue before each sync
(activities.placement.locate_source), which also checks that the host's agent is alive."""

from __future__ import annotations

from connectors.cloudstack import api as csapi
from connectors.cloudstack.spec import CloudStackSource
from sendense.agents import Located


def locate(spec: CloudStackSource) -> Located:
    vm = csapi.find_vm(csapi.client_for(spec), spec)
    host = vm.get("hostname")
    if vm.get("state") != "Running" or not host:
        return Located(why=f"CloudStack VM {spec.vm} is {vm.get('state')}, on no host")
    return Located(host_id=str(host), where="")
