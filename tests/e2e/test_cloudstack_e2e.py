"""CloudStack as a source, deployed as its users deploy it (labs.sites: two sites, the control plane in B
behind mutual TLS): the CloudStack lab's management server runs in site B, its two KVM hosts are
`site-a` and `site-b`, each with its sendense agent (the host's id is the CloudStack host's name, the
agent reads its host's libvirt). A VM booted from the bootable guest on site-a replicates to a KVM
target on site-b: full, then incremental across the link; then the VM live-migrates to site-b and the
job follows it at its next sync, which says so; later syncs are incremental there. The data volume's
points are bit-exact against a shadow of every write; the root volume's point holds a consistent
file system."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.cloudstack.client import CloudStackClient
from labs.sites.deploy import Deployment
from labs.sites.netns import TwoSites

pytestmark = [pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
LAB_PORT = 8096


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True).returncode == 0


def export_raw(d: Deployment, job: str, point: str, out: Path) -> list[Path]:
    res = d.json("point", "export", job, "--point", point, "--format", "raw", "--output", str(out))
    return [Path(f["path"]) for f in res["files"]]


def shadow_write(raw: Path, offset: int, length: int, pattern: int) -> None:
    with raw.open("r+b") as f:
        f.seek(offset)
        f.write(bytes([pattern]) * length)


class Lab:
    """The CloudStack lab's server in site B, called from here through B's namespace."""

    def __init__(self, sites: TwoSites, root: Path) -> None:
        from labs.cloudstack.state import LabConfig
        from labs.guest.build import build

        self.sites, self.root = sites, root
        root.mkdir(parents=True, exist_ok=True)
        caps = Path.home() / ".cache" / "sendense" / "libvirt-qemu-caps"
        LabConfig(
            hosts=["site-a", "site-b"], libvirt=True, libvirt_cache=str(caps), guest_image=str(build())
        ).save(root / "config.json")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "labs.cloudstack", "serve", "--dir", str(root)]
        argv += ["--host", sites.addr["b"], "--port", str(LAB_PORT)]
        self.log = open(root / "lab.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = sites.popen("b", argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (root / "lab.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "lab.log").read_text()[-500:]
                raise RuntimeError(f"the CloudStack lab did not start: {tail}")
            time.sleep(0.2)
        time.sleep(0.3)
        self.info = json.loads((root / "lab.json").read_text())
        self.url = self.info["url"]
        key, secret = self.info["api_key"], self.info["secret_key"]
        self.client = CloudStackClient(self.url, key, secret, poll_interval=0.2)
        self.hosts = {h["name"]: h for h in self.control("hosts")}

    def call(self, command: str, **params: Any) -> dict[str, Any]:
        return self.sites.call("b", lambda: self.client.call(command, **params))

    def job(self, command: str, **params: Any) -> dict[str, Any]:
        return self.sites.call("b", lambda: self.client.job(command, **params))

    def first(self, command: str, item: str, **params: Any) -> dict[str, Any]:
        items = self.call(command, **params).get(item) or []
        assert items, (command, params)
        return dict(items[0])

    def control(self, path: str) -> Any:
        import urllib.request

        base = self.url.rsplit("/client/api", 1)[0]

        def get() -> Any:
            with urllib.request.urlopen(f"{base}/_lab/{path}", timeout=30) as r:
                return json.loads(r.read())

        return self.sites.call("b", get)

    def domain(self, host: str, instancename: str) -> Any:
        import libvirt

        return libvirt.open(self.hosts[host]["uri"]).lookupByName(instancename)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Deployment, Lab]]:
    short = Path(tempfile.mkdtemp(prefix="cse2e-", dir="/tmp"))  # libvirt socket paths are short
    try:
        with TwoSites(rate="1gbit") as s:
            lab = Lab(s, short / "lab")
            keys = {
                "SENDENSE_CLOUDSTACK_API_KEY": lab.info["api_key"],
                "SENDENSE_CLOUDSTACK_SECRET_KEY": lab.info["secret_key"],
            }
            try:
                d = Deployment(
                    s,
                    tmp_path / "dep",
                    platforms=["kvm", "cloudstack"],
                    roots={"target_roots": [str(tmp_path)], "endpoints": ["cloudstack:*"]},
                    agent_env=keys,
                    cli_env=keys,  # (job create checks the VM with the operator's keys)
                    site_env={
                        site: {"SENDENSE_KVM_LIBVIRT_URIS": lab.hosts[host]["uri"]}
                        for site, host in (("a", "site-a"), ("b", "site-b"))
                    },
                )
                d.start()
                try:
                    yield d, lab
                finally:
                    for site in list(d.agents):
                        d.kill(site)
            finally:
                lab.close()
    finally:
        subprocess.run(["rm", "-rf", str(short)], check=False)


def test_a_cloudstack_vm_replicates_across_sites_and_is_followed_when_it_live_migrates(
    deployment: tuple[Deployment, Lab], tmp_path: Path
) -> None:
    d, lab = deployment
    zone = lab.first("listZones", "zone")
    small = lab.first("listServiceOfferings", "serviceoffering", name="lab-small")
    template = lab.first("listTemplates", "template", templatefilter="all", name="sendense-guest")
    net = lab.first("listNetworks", "network", name="lab-isolated")
    custom = lab.first("listDiskOfferings", "diskoffering", name="lab-custom")
    vm = lab.job(
        "deployVirtualMachine",
        zoneid=zone["id"],
        serviceofferingid=small["id"],
        templateid=template["id"],
        networkids=net["id"],
        hostid=lab.hosts["site-a"]["id"],
        name="web-1",
    )["virtualmachine"]
    assert vm["hostname"] == "site-a", vm
    data = lab.call("createVolume", zoneid=zone["id"], diskofferingid=custom["id"], size=1, name="web-1-data")
    lab.job("attachVolume", id=data["id"], virtualmachineid=vm["id"])
    dom = lab.domain("site-a", vm["instancename"])
    # the data volume's contents, written only through the guest's own disk backend (the guest does
    # not mount it): a shadow of every write is what each point must hold
    from labs.kvm.libvirtd import guest_write

    ref = tmp_path / "data.raw"
    with ref.open("wb") as f:
        f.truncate(1 << 30)
    for off, n, pat in ((0, 4 * MiB, 0x11), (300 * MiB, 1 * MiB, 0x12)):
        guest_write(dom, "vdb", off, n, pat)
        shadow_write(ref, off, n, pat)

    spec = {
        "name": "web-1",
        "source": {"platform": "cloudstack", "url": lab.url, "zone": zone["name"], "vm": "web-1"},
        "target": {"platform": "kvm", "path": str(tmp_path / "replicas"), "host": "site-b"},
        "schedule": {"interval": "1h"},
        "retention": {"points": 5},
        "tuning": {"heartbeat_timeout": "5s"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    d.cli("job", "create", "-f", str(tmp_path / "job.yaml"))
    st = d.wait_point("web-1", 1, timeout=300)
    assert st["last_sync"]["kind"] == "full" and st["source_host"] == "site-a", st
    assert st["last_sync"]["bytes_on_wire"] is not None  # read on site-a, across the link to site-b
    root1, data1 = export_raw(d, "web-1", st["last_point"], tmp_path / "x1")
    assert same(data1, ref)
    from labs.guest.fscheck import check

    fs = check(root1, "raw")
    assert fs.ok, fs  # the root volume's point: a consistent ext4 file system

    guest_write(dom, "vdb", 1 * MiB, 64 * 1024, 0x21)
    shadow_write(ref, 1 * MiB, 64 * 1024, 0x21)
    r = d.json("job", "sync-now", "web-1", "--wait", timeout=300)
    assert r["kind"] == "incremental" and r["bytes_read"] <= 4 * MiB, r
    assert same(export_raw(d, "web-1", r["point_id"], tmp_path / "x2")[1], ref)

    # written on site-a, not yet synced: the migration must carry it into the next point
    guest_write(dom, "vdb", 500 * MiB, 128 * 1024, 0x31)
    shadow_write(ref, 500 * MiB, 128 * 1024, 0x31)
    lab.job("migrateVirtualMachine", virtualmachineid=vm["id"], hostid=lab.hosts["site-b"]["id"])
    assert lab.first("listVirtualMachines", "virtualmachine", id=vm["id"])["hostname"] == "site-b"
    moved = lab.domain("site-b", vm["instancename"])
    guest_write(moved, "vdb", 2 * MiB, 64 * 1024, 0x32)
    shadow_write(ref, 2 * MiB, 64 * 1024, 0x32)
    r = d.json("job", "sync-now", "web-1", "--wait", timeout=300)
    st = d.json("job", "status", "web-1")
    assert st["source_host"] == "site-b" and "from host site-a to host site-b" in st["last_move"], st
    assert r["kind"] in ("incremental", "resync") and r["bytes_on_wire"] is None, r  # one agent now
    if r["kind"] == "resync":  # by digests: only what changed is written
        assert "vdb: checkpoint" in r["resync_reason"] and r["bytes_written"] <= 1 * MiB, r
    assert same(export_raw(d, "web-1", r["point_id"], tmp_path / "x3")[1], ref)

    guest_write(moved, "vdb", 3 * MiB, 64 * 1024, 0x41)
    shadow_write(ref, 3 * MiB, 64 * 1024, 0x41)
    r = d.json("job", "sync-now", "web-1", "--wait", timeout=300)
    assert r["kind"] == "incremental" and r["bytes_read"] <= 4 * MiB, r
    root4, data4 = export_raw(d, "web-1", r["point_id"], tmp_path / "x4")
    assert same(data4, ref)
    assert check(root4, "raw").ok
    d.cli("job", "delete", "web-1")
    # the job's change tracking is gone from the VM's volumes, the bitmaps the migration carried too
    from tools.qemu import image_info, qcow2_bitmaps

    pool = Path(lab.first("listStoragePools", "storagepool")["path"])
    for v in lab.call("listVolumes", virtualmachineid=vm["id"])["volume"]:
        left = [b for b in qcow2_bitmaps(image_info(pool / v["path"])) if b.startswith("sendense.web-1.")]
        assert not left, (v["name"], left)
