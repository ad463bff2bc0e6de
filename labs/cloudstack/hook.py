"""The CloudStack lab's hook for `sendense lab up/down/status` (named by the CloudStack platform's plug-in
once it is registered; until then importable and callable as it is).

`up` starts the lab in the background under SENDENSE_HOME/labs/cloudstack (or finds it running) and
registers its API key and secret key for its endpoint (sendense.config.register_lab) under the
environment names of the spec's default login (SENDENSE_CLOUDSTACK_API_KEY / _SECRET_KEY,
connectors.cloudstack.spec.key_envs): the keys never go in a spec.
As root its hosts run VMs (private libvirtds); otherwise the API serves with its hosts Disconnected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from labs.cloudstack.lab import CloudStackLab, CloudStackLabError
from labs.cloudstack.state import LabConfig
from sendense import config
from sendense.errors import SendenseError

ERRORS: tuple[type[Exception], ...] = (SendenseError, CloudStackLabError)
API_KEY_ENV = "SENDENSE_CLOUDSTACK_API_KEY"
SECRET_KEY_ENV = "SENDENSE_CLOUDSTACK_SECRET_KEY"


def lab_dir() -> Path:
    return config.home() / "labs" / "cloudstack"


def attach() -> CloudStackLab | None:
    try:
        return CloudStackLab.attach(lab_dir())
    except CloudStackLabError:
        return None


def endpoint(lab: CloudStackLab) -> str:
    return f"cloudstack:{lab.url}"


def env(lab: CloudStackLab) -> dict[str, str]:
    return {API_KEY_ENV: str(lab.info["api_key"]), SECRET_KEY_ENV: str(lab.info["secret_key"])}


def describe(lab: CloudStackLab) -> dict[str, Any]:
    place = {
        "platform": "cloudstack",
        "url": lab.url,
        "zone": lab.info["zone"],
    }
    return {
        "running": True,
        "endpoint_url": lab.url,
        "zone": lab.info["zone"],
        "env": env(lab),
        "source": {**place, "vm": "NAME"},
        "target": {
            **place,
            "storage": "lab-primary-1",
            "template": "sendense-guest",
            "drill_network": "lab-isolated",
            "networks": [{"source": "*", "target": "lab-shared"}],
            "host": LabConfig().hosts[0],
        },
        # an agent per lab host (a CloudStack source's steps run on the agent of the VM's host)
        "hosts": [
            {
                "name": h["name"],
                "agent_env": {"SENDENSE_HOST_ID": h["name"], "SENDENSE_KVM_LIBVIRT_URIS": h["uri"]},
            }
            for h in lab.control("GET", "/_lab/hosts")
            if h.get("uri")
        ],
        "dir": str(lab_dir()),
        "note": "agents on this machine reach it as they are; an agent elsewhere needs the env; "
        "VMs run only when the lab runs as root (its hosts are private libvirtds)",
    }


def up(port: int = 0) -> dict[str, Any]:
    lab = attach()
    if lab is None:
        # the QEMU capabilities cache outlives the lab: a second `lab up` starts its hosts in a second
        caps = Path.home() / ".cache" / "sendense" / "libvirt-qemu-caps"
        cfg = LabConfig(libvirt=os.geteuid() == 0, libvirt_cache=str(caps))
        lab = CloudStackLab(lab_dir(), cfg, port=port).start(detached=True)
    config.register_lab(endpoint(lab), env(lab))
    return describe(lab)


def down() -> bool:
    lab = attach()
    if lab is None:
        return False
    config.unregister_lab(endpoint(lab))
    lab.stop()
    return True


def status() -> dict[str, Any]:
    lab = attach()
    return describe(lab) if lab is not None else {"running": False}
