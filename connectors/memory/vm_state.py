"""Where a memory target's VMs live in its store, and the console of their content-driven "boot".

Under the job's target (`target/<job>`), for a VM `<name>`:
- record `vms/<name>`: the VM (`VmRecord`: its plan, state, disks in boot order, NICs, network); a
  create writes it last and a destroy drops it last, so a record means a VM made whole;
- blobs `vm-disks/<name>/<key>`: its disks, frozen copies of its point's (copy-on-write: in process
  memory they share the point's chunks; in files they are copies), so nothing the VM writes ever
  reaches the point and no prune of the point reaches the VM;
- record `vm-consoles/<name>`: its console text;
- record `vm-networks/<name>`: the isolated network of a test VM, its own;
- records and blobs under `vm-failback/<name>/`: failback's snapshots of the VM (`failback.py`).
`vm_names` sees every VM with anything of these left, whole or not: the target refuses `destroy`
while there is one, and `list_vms` shows them.

The memory VM runs no OS: powering it on writes to its console a line saying so, then the printable
ASCII strings (8 characters or more, as `strings` finds them) of the first MiB of its first disk, one
per line, or a line saying it halted when there are none. A test that writes a marker into its
source VM's first disk gets VMs whose boot check finds it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from connectors.memory.backend import Backend
from sendense.models import NicInfo, VmPlan

BOOT_SCAN = 1 << 20  # the first MiB of the first disk is what a memory VM "boots"
CONSOLE_KEEP = 256 << 10  # console text kept from earlier boots (a boot's own text is kept whole)
CONSOLE_TAIL = 256 << 10  # console() returns at most this much (the newest text): it crosses Temporal
STRINGS = re.compile(rb"[\x20-\x7e\t]{8,}")

VMS, DISKS, CONSOLES, NETWORKS = "vms", "vm-disks", "vm-consoles", "vm-networks"
FAILBACK = "vm-failback"
POINT = "point"  # the change id of a VM's disk that records every write since it was made


class VmRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    plan: VmPlan
    job_id: str = ""
    vm_id: str
    disks: list[str] = Field(description="disk keys in boot order (the first one boots)")
    nics: list[NicInfo] = Field(default_factory=list, description="with the target network of each")
    network: str = Field(default="", description="test mode: its isolated network")
    state: Literal["stopped", "running"] = "stopped"
    powered_on_at: float | None = Field(default=None, description="time.time() of the last power-on")
    boot_from: int = Field(default=0, description="where the last boot's text starts in the console")
    changes: dict[str, dict[str, list[list[int]]]] = Field(
        default_factory=dict,
        description="per disk key: change id -> byte ranges the guest wrote since (`point`: since the VM "
        "was made from its point; the others: failback's snapshots, failback.py)",
    )


class VmPlace:
    """The store names of one VM of a job's target."""

    def __init__(self, top: str, name: str) -> None:
        self.top, self.name = top, name
        self.record = f"{top}/{VMS}/{name}"
        self.console = f"{top}/{CONSOLES}/{name}"
        self.network = f"{top}/{NETWORKS}/{name}"
        self.disks = f"{top}/{DISKS}/{name}/"
        self.failback = f"{top}/{FAILBACK}/{name}/"

    def disk(self, blob_key: str) -> str:
        return f"{self.disks}{blob_key}"


def vm_names(b: Backend, top: str) -> list[str]:
    """Every VM of the job's target with anything left in the store (record, disk, console, network)."""
    names = {n.split("/")[3] for kind in (DISKS, FAILBACK) for n in b.blobs(f"{top}/{kind}/")}
    for kind in (VMS, CONSOLES, NETWORKS, FAILBACK):
        names.update(n.split("/")[3] for n in b.records(f"{top}/{kind}/"))
    return sorted(names)


def isolated_network(name: str) -> str:
    return f"isolated-{name}"


def boot_text(name: str, point_id: str, mode: str, disk: str, data: bytes) -> str:
    """What the console shows when the VM is powered on with `data` at the start of its first disk."""
    lines = [f"memory VM {name}: powered on from point {point_id} ({mode}), booting disk {disk}"]
    found = [m.group(0).decode("ascii").strip() for m in STRINGS.finditer(data)]
    lines += [s for s in found if s] or [f"memory VM {name}: halted"]
    return "".join(f"{ln}\n" for ln in lines)


def line_at(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start : end if end >= 0 else len(text)].strip()


def tail(text: str, lines: int = 5) -> str:
    """The console's last lines, joined on one line."""
    return " | ".join(text.strip().splitlines()[-lines:]) or "no console output"
