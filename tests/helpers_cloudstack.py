"""Helpers of the tests that run the CloudStack source against the CloudStack lab (root: its hosts are
private libvirtds): the lab in this process, a signed client of it (the project's own), VMs deployed
through its API, and the guest's writes on the VM's domain wherever it runs now.

The agent side is this test process: `agent_on(monkeypatch, lab, host)` makes it the agent of one lab
host (SENDENSE_HOST_ID the host's name, SENDENSE_KVM_LIBVIRT_URIS its libvirtd, the lab's keys in the
login's environment names), as `GET /_lab/hosts` says them.

Guest writes go through the VM's own virtio-blk backend (HMP `qemu-io` on the device, as
labs.kvm.libvirtd.guest_write does): dirty bitmaps, backup copy-before-write filters and all see them.
qemu-io takes any byte range there (the block layer reads, modifies and writes partial sectors).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt
import pytest

from connectors.cloudstack.client import CloudStackClient
from connectors.cloudstack.spec import CloudStackSource, key_envs
from connectors.kvm.inventory import URIS_ENV
from labs.cloudstack.server import LabServer
from labs.cloudstack.state import LabConfig
from labs.kvm.libvirtd import device_alias, hmp

GIB = 1 << 30


@contextmanager
def cloudstack_lab(cache: Path | None = None, **config: Any) -> Iterator[LabServer]:
    """The lab in this process with its two hosts' libvirtds, under a short /tmp path (sockets)."""
    root = Path(tempfile.mkdtemp(prefix="cslab-", dir="/tmp"))
    caps = cache or Path.home() / ".cache" / "sendense" / "libvirt-qemu-caps"
    server = LabServer(root, LabConfig(libvirt_cache=str(caps), **config)).start()
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def lab_cache(request: pytest.FixtureRequest) -> Path | None:
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None


def client(lab: LabServer) -> CloudStackClient:
    return CloudStackClient(
        lab.url, lab.info["api_key"], lab.info["secret_key"], poll_interval=0.05, job_timeout=120
    )


def control(lab: LabServer, path: str) -> Any:
    with urllib.request.urlopen(lab.url.rsplit("/client/api", 1)[0] + path, timeout=10) as r:
        return json.loads(r.read())


def lab_hosts(lab: LabServer) -> dict[str, dict[str, Any]]:
    """The lab's hosts by id: {"id", "name", "uri", "domains"} (GET /_lab/hosts)."""
    return {h["id"]: h for h in control(lab, "/_lab/hosts")}


def agent_on(monkeypatch: pytest.MonkeyPatch, lab: LabServer, host_id: str) -> None:
    """This process becomes the agent of lab host `host_id`, with the lab's keys (default login)."""
    h = lab_hosts(lab)[host_id]
    key_env, secret_env = key_envs("default")
    monkeypatch.setenv(key_env, lab.info["api_key"])
    monkeypatch.setenv(secret_env, lab.info["secret_key"])
    monkeypatch.setenv("SENDENSE_HOST_ID", h["name"])
    monkeypatch.setenv(URIS_ENV, h["uri"])


def source_spec(lab: LabServer, vm: str) -> CloudStackSource:
    return CloudStackSource(platform="cloudstack", url=lab.url, zone=lab.info["zone"], vm=vm)


def named(api: CloudStackClient, command: str, item: str, name: str, **kw: Any) -> dict[str, Any]:
    [found] = [x for x in api.list(command, item, **kw) if x["name"] == name]
    return found


class LabVmHandle:
    """A VM of the lab, made through the API: `blank` (a blank 1 GiB ROOT swapped in before its
    first start, so that nothing but the test writes its disks: SeaBIOS finds nothing to boot) or
    from the bootable guest template; `data_gib` data volumes attached before it starts."""

    def __init__(
        self, lab: LabServer, *, blank: bool = True, data_gib: tuple[int, ...] = (1,), host: str | None = None
    ) -> None:
        self.lab, self.api = lab, client(lab)
        self.name = f"c-{uuid.uuid4().hex[:8]}"
        zone = lab.info["zoneid"]
        small = named(self.api, "listServiceOfferings", "serviceoffering", "lab-small")
        self.custom = named(self.api, "listDiskOfferings", "diskoffering", "lab-custom")
        [template] = self.api.list("listTemplates", "template", templatefilter="all")
        vm = self.api.job(
            "deployVirtualMachine",
            zoneid=zone,
            serviceofferingid=small["id"],
            templateid=template["id"],
            name=self.name,
            startvm=False,
            hostid=host,
        )["virtualmachine"]
        self.id = str(vm["id"])
        self.instancename = str(vm["instancename"])
        self.volumes: list[str] = []  # the data volumes made here (destroy keeps them)
        if blank:
            [root] = self.api.list("listVolumes", "volume", virtualmachineid=self.id, type="ROOT")
            self.api.job("detachVolume", id=root["id"])
            self.api.call("deleteVolume", id=root["id"])
            self.attach(1, deviceid=0)
        for gib in data_gib:
            self.attach(gib)
        self.api.job("startVirtualMachine", id=self.id, hostid=host)

    def attach(self, gib: int, deviceid: int | None = None) -> dict[str, Any]:
        vol = self.api.job(
            "createVolume",
            zoneid=self.lab.info["zoneid"],
            diskofferingid=self.custom["id"],
            size=gib,
            name=f"{self.name}-d{len(self.volumes)}",
        )["volume"]
        if deviceid != 0:
            self.volumes.append(str(vol["id"]))
        out: dict[str, Any] = self.api.job(
            "attachVolume", id=vol["id"], virtualmachineid=self.id, deviceid=deviceid
        )["volume"]
        return out

    def info(self) -> dict[str, Any]:
        [vm] = self.api.list("listVirtualMachines", "virtualmachine", id=self.id)
        return vm

    def host(self) -> str:
        return str(self.info()["hostid"])

    def volume_files(self) -> dict[str, Path]:
        """Each attached volume's qcow2 file by its disk target (vda for deviceid 0)."""
        from connectors.cloudstack.api import disk_key

        out = {}
        for v in control(self.lab, f"/_lab/vms/{self.id}")["volumes"]:
            if v["file"]:
                out[disk_key(int(v["deviceid"] or 0))] = Path(v["file"])
        return out

    @contextmanager
    def domain(self) -> Iterator[libvirt.virDomain]:
        """The VM's running domain on the host that runs it now."""
        conn = self.lab.cloud.hosts[self.host()].libvirtd.connect()
        try:
            yield conn.lookupByName(self.instancename)
        finally:
            conn.close()

    def qemu_io(self, key: str, command: str) -> None:
        with self.domain() as dom:
            qdev = f"/machine/peripheral/{device_alias(dom, key)}/virtio-backend"
            out = hmp(dom, f'qemu-io -d {qdev} "{command}"').strip()
        if out:
            raise RuntimeError(f"qemu-io {command!r} on {self.name}:{key}: {out}")

    def write(self, key: str, offset: int, length: int, pattern: int) -> None:
        self.qemu_io(key, f"write -P 0x{pattern & 0xFF:02x} {offset} {length}")

    def zero(self, key: str, offset: int, length: int) -> None:
        self.qemu_io(key, f"write -z {offset} {length}")

    def qmp(self, command: str, **args: Any) -> Any:
        import libvirt_qemu

        with self.domain() as dom:
            cmd = json.dumps({"execute": command, "arguments": args})
            return json.loads(libvirt_qemu.qemuMonitorCommand(dom, cmd, 0))["return"]

    def destroy(self) -> None:
        """The VM expunged, its data volumes deleted (whatever state it was left in)."""
        try:
            self.api.job("destroyVirtualMachine", id=self.id, expunge=True)
        except Exception:  # noqa: BLE001 - a test may have destroyed it already
            pass
        for v in self.volumes:
            try:
                self.api.call("deleteVolume", id=v)
            except Exception:  # noqa: BLE001 - deleted already
                pass
