"""The CloudStack lab's inventory and resources, in memory (they live as long as the lab process).

One zone, pod and cluster; lab KVM hosts (each a private libvirtd: labs/cloudstack/hosts.py, named by
the sendense host id its agent would use); one primary storage pool, a directory with a capacity;
service and disk offerings; templates (qcow2 files, one of them the bootable guest of labs/guest);
an isolated and a shared network. VMs and volumes carry CloudStack's states: a volume is `Allocated`
(known, no file yet) until it is first needed on storage (its VM starts, or it is attached to a VM
whose volumes are on storage), then `Ready`, a qcow2 file named by its uuid in the pool's directory.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GIB = 1 << 30
MIB = 1 << 20


def new_id() -> str:
    return str(uuid.uuid4())


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


@dataclass
class LabConfig:
    """What a lab is made of; written to DIR/config.json for the server process."""

    hosts: list[str] = field(default_factory=lambda: ["cs-lab-host-1", "cs-lab-host-2"])
    host_cpus: int = 2
    host_memory_mib: int = 2048
    pool_capacity_gib: float = 20.0
    enforce_timestamps: bool = True  # enforce.post.requests.and.timestamps
    job_delay: float = 0.0  # an async job stays pending at least this long (seconds)
    stop_timeout: float = 5.0  # a stop that is not forced waits this long for the guest, then destroys
    live_migration: bool = True  # migrateVirtualMachine live (libvirt, QEMU's stream); False: cold move
    libvirt: bool = True  # start each host's private libvirtd (root); without, hosts are Disconnected
    libvirt_cache: str = ""  # QEMU capabilities cache shared by the hosts' libvirtds
    guest_image: str = ""  # the bootable guest's qcow2 (empty: labs.guest.build.build())

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> LabConfig:
        return cls(**json.loads(path.read_text()))


@dataclass
class Place:
    id: str
    name: str


@dataclass
class Pool:
    id: str
    name: str
    path: Path
    capacity: int
    # a directory every lab host sees at the same path (CloudStack's SharedMountPoint: the agent of
    # each KVM host finds the pool's files at `path`); Up, or Maintenance / Disabled as an admin sets it
    type: str = "SharedMountPoint"
    state: str = "Up"


@dataclass
class ServiceOffering:
    id: str
    name: str
    cpus: int
    memory_mib: int


@dataclass
class DiskOffering:
    id: str
    name: str
    size_gib: int  # 0: customized (createVolume gives `size`)


@dataclass
class Template:
    id: str
    name: str
    path: Path
    size: int  # virtual size, bytes
    ostypeid: str
    ostypename: str


@dataclass
class Network:
    id: str
    name: str
    type: str  # Isolated | Shared
    cidr: str
    gateway: str


@dataclass
class Volume:
    id: str
    name: str
    type: str  # ROOT | DATADISK
    size: int
    state: str = "Allocated"  # Allocated -> Ready -> (Destroy) -> Expunged
    pool: Pool | None = None
    vm: str | None = None
    deviceid: int | None = None
    diskoffering: str | None = None
    template: str | None = None
    created: str = field(default_factory=now_text)
    path: str | None = None  # its file's name in the pool's directory (its id, unless imported)

    @property
    def file(self) -> Path | None:
        return self.pool.path / (self.path or self.id) if self.pool is not None else None


@dataclass
class Nic:
    id: str
    network: Network
    mac: str
    ip: str
    isdefault: bool


@dataclass
class Vm:
    id: str
    num: int
    name: str
    displayname: str
    offering: ServiceOffering
    template: Template
    nics: list[Nic]
    state: str = "Stopped"  # Starting, Running, Stopping, Stopped, Migrating, Destroyed, Expunging
    host: str | None = None
    last_host: str | None = None
    created: str = field(default_factory=now_text)

    @property
    def instancename(self) -> str:
        return f"i-2-{self.num}-VM"


@dataclass
class Job:
    id: str
    command: str
    cmd: str  # the command class, as queryAsyncJobResult names it
    instancetype: str | None = None
    instanceid: str | None = None
    status: int = 0  # 0 pending, 1 succeeded, 2 failed
    resultcode: int = 0
    result: dict[str, Any] | None = None
    created: str = field(default_factory=now_text)
    completed: str | None = None


class LabState:
    """Everything the API serves; `lock` guards every change (jobs run on their own threads)."""

    def __init__(self, root: Path, config: LabConfig, guest_image: Path) -> None:
        self.root = root
        self.config = config
        self.lock = threading.RLock()
        self.zone = Place(new_id(), "lab-zone-1")
        self.pod = Place(new_id(), "lab-pod-1")
        self.cluster = Place(new_id(), "lab-cluster-1")
        pool_dir = root / "primary"
        pool_dir.mkdir(parents=True, exist_ok=True)
        self.pool = Pool(new_id(), "lab-primary-1", pool_dir, int(config.pool_capacity_gib * GIB))
        self.pools = {self.pool.id: self.pool}
        self.service_offerings = {
            o.id: o
            for o in (
                ServiceOffering(new_id(), "lab-small", 1, 256),
                ServiceOffering(new_id(), "lab-medium", 2, 512),
                ServiceOffering(new_id(), "lab-huge", 2, 64 * 1024),  # fits no lab host
            )
        }
        self.disk_offerings = {
            o.id: o
            for o in (
                DiskOffering(new_id(), "lab-custom", 0),
                DiskOffering(new_id(), "lab-1gb", 1),
                DiskOffering(new_id(), "lab-5gb", 5),
            )
        }
        from tools.qemu import image_info

        self.templates = {
            t.id: t
            for t in (
                Template(
                    new_id(),
                    "sendense-guest",
                    guest_image,
                    int(image_info(guest_image)["virtual-size"]),
                    new_id(),
                    "Other Linux (64-bit)",
                ),
            )
        }
        self.networks = {
            n.id: n
            for n in (
                Network(new_id(), "lab-isolated", "Isolated", "10.1.1.0/24", "10.1.1.1"),
                Network(new_id(), "lab-shared", "Shared", "10.2.2.0/24", "10.2.2.1"),
            )
        }
        self.vms: dict[str, Vm] = {}
        self.volumes: dict[str, Volume] = {}
        self.jobs: dict[str, Job] = {}
        self.template_copies: dict[str, Path] = {}  # template id -> its copy on the pool
        self._nums = itertools.count(10)
        self._ips = itertools.count(10)

    def next_num(self) -> int:
        return next(self._nums)

    def next_ip(self, network: Network) -> str:
        return network.cidr.rsplit(".", 1)[0] + f".{next(self._ips)}"

    def allocated(self, pool: Pool) -> int:
        """Bytes the pool has given out: its volumes' and template copies' virtual sizes."""
        vols = sum(v.size for v in self.volumes.values() if v.pool is pool and v.state == "Ready")
        copies = sum(self.templates[t].size for t in self.template_copies)
        return vols + copies
