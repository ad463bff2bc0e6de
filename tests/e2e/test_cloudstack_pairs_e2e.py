"""CloudStack paired with the other platforms, end to end: the real dev server and its worker, the labs
started by `sendense lab up` (their keys registered for their endpoints, never in a spec), driven
through the CLI. The worker is the agent of the CloudStack lab's first KVM host (its host id is the
host's name, it reads that host's libvirt), as an agent on a CloudStack host is deployed.

A VM booted from the bootable guest template, with a data volume written only through its disk
backend (a shadow of every write is what each point must hold), replicates full then incremental;
each point is exported from the target and compared (data volume bit-exact, root volume a consistent
file system)."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import stack
from connectors.cloudstack.client import CloudStackClient
from labs.guest.fscheck import check as fscheck
from tests.e2e.conftest import Cli, free_port
from tests.e2e.test_replication_e2e import export_raw, same

pytestmark = [pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20
HOST = "cs-lab-host-1"  # the lab's first KVM host: this stack's worker is its agent


class CsLab:
    def __init__(self, info: dict[str, Any]) -> None:
        env = info["env"]
        self.info = info
        self.url = info["endpoint_url"]
        self.client = CloudStackClient(
            self.url,
            env["SENDENSE_CLOUDSTACK_API_KEY"],
            env["SENDENSE_CLOUDSTACK_SECRET_KEY"],
            poll_interval=0.2,
        )
        base = self.url.rsplit("/client/api", 1)[0]
        with urllib.request.urlopen(f"{base}/_lab/hosts", timeout=30) as r:
            self.hosts = {h["name"]: h for h in json.loads(r.read())}

    def first(self, command: str, item: str, **params: Any) -> dict[str, Any]:
        items = self.client.call(command, **params).get(item) or []
        assert items, (command, params)
        return dict(items[0])

    def vm_with_data(self, name: str, tmp_path: Path) -> tuple[dict[str, Any], Any, Path]:
        """A VM of the guest template on HOST with a 1 GiB data volume (vdb), its libvirt domain, and
        the data volume's shadow."""
        import libvirt

        from labs.kvm.libvirtd import guest_write

        zone = self.first("listZones", "zone")
        vm = self.client.job(
            "deployVirtualMachine",
            zoneid=zone["id"],
            serviceofferingid=self.first("listServiceOfferings", "serviceoffering", name="lab-small")["id"],
            templateid=self.first("listTemplates", "template", templatefilter="all", name="sendense-guest")[
                "id"
            ],
            networkids=self.first("listNetworks", "network", name="lab-isolated")["id"],
            hostid=self.hosts[HOST]["id"],
            name=name,
        )["virtualmachine"]
        custom = self.first("listDiskOfferings", "diskoffering", name="lab-custom")
        data = self.client.call(
            "createVolume", zoneid=zone["id"], diskofferingid=custom["id"], size=1, name=f"{name}-data"
        )
        self.client.job("attachVolume", id=data["id"], virtualmachineid=vm["id"])
        dom = libvirt.open(self.hosts[HOST]["uri"]).lookupByName(vm["instancename"])
        shadow = tmp_path / f"{name}-data.raw"
        with shadow.open("wb") as f:
            f.truncate(1 << 30)
        for off, n, pat in ((0, 2 * MiB, 0x11), (700 * MiB, 1 * MiB, 0x12)):
            guest_write(dom, "vdb", off, n, pat)
            write_shadow(shadow, off, n, pat)
        return vm, dom, shadow

    def destroy(self, vm: dict[str, Any]) -> None:
        self.client.job("destroyVirtualMachine", id=vm["id"], expunge=True)
        for v in self.client.call("listVolumes", name=f"{vm['name']}-data").get("volume") or []:
            if not v.get("virtualmachineid"):
                self.client.call("deleteVolume", id=v["id"])


def write_shadow(raw: Path, offset: int, length: int, pattern: int) -> None:
    with raw.open("r+b") as f:
        f.seek(offset)
        f.write(bytes([pattern]) * length)


@pytest.fixture(scope="module")
def cs_stack() -> Iterator[tuple[Cli, dict[str, Any], CsLab]]:
    state = Path(tempfile.mkdtemp(prefix="sdcs-", dir="/tmp"))  # short: the lab's libvirt sockets
    port = free_port()
    drop = ("SENDENSE_CLOUDSTACK_", "SENDENSE_VSPHERE_", "SENDENSE_VDDK_", "AWS_", "SENDENSE_KVM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(SENDENSE_HOME=str(state), SENDENSE_HOST_ID=HOST, AWS_EC2_METADATA_DISABLED="true")
    env.pop("SENDENSE_TEMPORAL", None)
    cli = Cli(env=env, state=state)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        labs = cli.json("lab", "up", "--show-secrets")  # first: the worker reads its host's libvirt
        lab = CsLab(labs["cloudstack"])
        os.environ["SENDENSE_KVM_LIBVIRT_URIS"] = cli.env["SENDENSE_KVM_LIBVIRT_URIS"] = lab.hosts[HOST][
            "uri"
        ]
        stack.up(state, port=port, ui_port=free_port())
        yield cli, labs, lab
    finally:
        try:
            stack.down(state)
        finally:
            cli.run("lab", "down", check=False)
            os.environ.clear()
            os.environ.update(saved)


@pytest.mark.parametrize("target", ["aws", "vsphere"])
def test_cloudstack_to_a_cloud_target_full_then_incremental(
    cs_stack: tuple[Cli, dict[str, Any], CsLab], tmp_path: Path, target: str
) -> None:
    cli, labs, lab = cs_stack
    job = f"cs-{target}"
    vm, dom, shadow = lab.vm_with_data(f"{job}-vm", tmp_path)
    from labs.kvm.libvirtd import guest_write

    spec = {
        "name": job,
        "source": {**labs["cloudstack"]["source"], "vm": vm["name"]},
        "target": labs[target]["target"],
        "schedule": {"interval": "1h"},
    }
    (tmp_path / f"{job}.yaml").write_text(yaml.safe_dump(spec))
    try:
        cli.json("job", "create", "-f", str(tmp_path / f"{job}.yaml"))
        st = cli.wait_point(job, 1, timeout=400)
        assert st["last_sync"]["kind"] == "full", st
        files = sorted(export_raw(cli, job, st["last_point"], tmp_path / "x1").items())
        assert len(files) == 2, files
        assert fscheck(files[0][1], "raw").ok  # the root volume: a consistent file system
        assert same(files[1][1], shadow)

        guest_write(dom, "vdb", 1 * MiB, 64 * 1024, 0x21)
        write_shadow(shadow, 1 * MiB, 64 * 1024, 0x21)
        r = cli.json("job", "sync-now", job, "--wait", timeout=400)
        # (only what changed is written; a target that cannot say where its replica holds data, as
        # vSphere's, has the zero ranges read and compared too: the shrink guard of sync.py)
        assert r["kind"] == "incremental" and r["bytes_written"] <= 4 * MiB, r
        files = sorted(export_raw(cli, job, r["point_id"], tmp_path / "x2").items())
        assert same(files[1][1], shadow)
        cli.json("job", "delete", job, "--purge")
    finally:
        lab.destroy(vm)


def test_bad_cloudstack_specs_fail_in_one_line_naming_what_the_user_wrote(
    cs_stack: tuple[Cli, dict[str, Any], CsLab], tmp_path: Path
) -> None:
    cli, labs, lab = cs_stack
    source = labs["cloudstack"]["source"]
    target = {"platform": "kvm", "path": str(tmp_path / "replicas")}
    secret = labs["cloudstack"]["env"]["SENDENSE_CLOUDSTACK_SECRET_KEY"]
    for i, (change, expect) in enumerate(
        (
            ({"vm": "no-such-vm"}, "source.vm: no CloudStack VM 'no-such-vm' in zone lab-zone-1"),
            ({"zone": "atlantis", "vm": "x"}, "source.zone: no zone 'atlantis' at "),
            (
                {"login": "ops", "vm": "x"},
                "set SENDENSE_CLOUDSTACK_OPS_API_KEY and SENDENSE_CLOUDSTACK_OPS_SECRET_KEY",
            ),
            ({"url": source["url"] + "?apikey=k&signature=s", "vm": "x"}, "source.url: "),
        )
    ):
        name = f"bad-cs-{i}"
        spec = {
            "name": name,
            "source": {**source, **change},
            "target": target,
            "schedule": {"interval": "1h"},
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        r = cli.run("job", "create", "-f", str(tmp_path / f"{name}.yaml"), check=False)
        err = r.stderr.strip()
        assert r.returncode != 0 and expect in err and len(err.splitlines()) == 1, (change, err)
        assert secret not in err + r.stdout
        assert name not in cli.run("job", "list").stdout
    # a wrong secret: CloudStack answers 401, said without the key
    key = labs["cloudstack"]["env"]["SENDENSE_CLOUDSTACK_API_KEY"]
    bad_env = {
        **cli.env,
        "SENDENSE_CLOUDSTACK_API_KEY": key,
        "SENDENSE_CLOUDSTACK_SECRET_KEY": "not-the-secret",
    }
    spec = {"name": "bad-cs-key", "source": {**source, "vm": "x"}, "target": target}
    (tmp_path / "bad-cs-key.yaml").write_text(yaml.safe_dump(spec))
    r = Cli(env=bad_env, state=cli.state).run(
        "job", "create", "-f", str(tmp_path / "bad-cs-key.yaml"), check=False
    )
    err = r.stderr.strip()
    assert r.returncode != 0 and "refused the API key or the request's signature (401" in err, err
    assert len(err.splitlines()) == 1 and "not-the-secret" not in err and secret not in err


def test_kvm_to_cloudstack_full_then_incremental_bit_exact(
    cs_stack: tuple[Cli, dict[str, Any], CsLab], tmp_path: Path
) -> None:
    """Points as qcow2 files on the lab's primary storage, written by the agent of a host that mounts
    it (target.host: this stack's worker)."""
    from helpers_kvm import make_qcow2, qemu_io, to_raw

    cli, labs, lab = cs_stack
    d0 = make_qcow2(tmp_path / "root.qcow2", 48 * MiB)
    d1 = make_qcow2(tmp_path / "data.qcow2", 16 * MiB)
    qemu_io(d0, "write -P 0x11 0 5M", "write -P 0x12 40M 1M")
    qemu_io(d1, "write -P 0x21 3M 512k")
    ref0 = [to_raw(d, tmp_path / f"r0-{i}.raw") for i, d in enumerate((d0, d1))]
    target = labs["cloudstack"]["target"]
    assert target["host"] == HOST
    spec = {"name": "kvm-cs", "source": {"platform": "kvm", "disks": [str(d0), str(d1)]}, "target": target}
    (tmp_path / "kvm-cs.yaml").write_text(yaml.safe_dump({**spec, "schedule": {"interval": "1h"}}))
    cli.json("job", "create", "-f", str(tmp_path / "kvm-cs.yaml"))
    p1 = cli.wait_point("kvm-cs", 1, timeout=300)["last_point"]
    qemu_io(d0, "write -P 0x31 1M 4k", "write -z 40M 1M")
    qemu_io(d1, "write -P 0x41 10M 64k")
    ref1 = [to_raw(d, tmp_path / f"r1-{i}.raw") for i, d in enumerate((d0, d1))]
    r = cli.json("job", "sync-now", "kvm-cs", "--wait", timeout=300)
    assert r["kind"] == "incremental", r
    for point, refs in ((p1, ref0), (r["point_id"], ref1)):
        files = export_raw(cli, "kvm-cs", point, tmp_path / f"x-{point}")
        assert same(files["disk0"], refs[0]) and same(files["disk1"], refs[1])
    pool = Path(lab.first("listStoragePools", "storagepool")["path"])
    assert list(pool.glob("sendense/*/kvm-cs"))  # on primary storage
    cli.json("job", "delete", "kvm-cs", "--purge")
    assert not list(pool.glob("sendense/*/kvm-cs"))


def test_aws_to_cloudstack_full_then_incremental(
    cs_stack: tuple[Cli, dict[str, Any], CsLab], tmp_path: Path
) -> None:
    cli, labs, _ = cs_stack
    aws = labs["aws"]
    inst = cli.json("lab", "instance", "cs-src", "--disk-gib", "1", "--blank")
    vol = inst["volumes"][0]["volume_id"]
    cli.run("lab", "write", vol, "0", "--pattern", "17", "--length", str(3 * MiB))
    source = {"platform": "aws", "instance_id": inst["instance_id"], "region": aws["region"]}
    spec = {
        "name": "aws-cs",
        "source": {**source, "endpoint_url": aws["endpoint_url"]},
        "target": labs["cloudstack"]["target"],
        "schedule": {"interval": "1h"},
    }
    (tmp_path / "aws-cs.yaml").write_text(yaml.safe_dump(spec))
    cli.json("job", "create", "-f", str(tmp_path / "aws-cs.yaml"))
    p1 = cli.wait_point("aws-cs", 1, timeout=300)["last_point"]
    cli.run("lab", "write", vol, str(500 * MiB), "--pattern", "51", "--length", "4096")
    r = cli.json("job", "sync-now", "aws-cs", "--wait", timeout=300)
    assert r["kind"] == "incremental" and r["bytes_written"] == 4096, r
    for point, expect in ((p1, bytes(4096)), (r["point_id"], b"\x33" * 4096)):
        [f] = export_raw(cli, "aws-cs", point, tmp_path / f"x-{point}").values()
        with open(f, "rb") as fh:
            assert fh.read(3 * MiB) == b"\x11" * (3 * MiB)
            fh.seek(500 * MiB)
            assert fh.read(4096) == expect
    cli.json("job", "delete", "aws-cs", "--purge")


def test_vmware_to_cloudstack_full_then_incremental_bit_exact(
    cs_stack: tuple[Cli, dict[str, Any], CsLab], tmp_path: Path
) -> None:
    """The seed's flagship pair: a VMware VM (CBT, VDDK) into CloudStack primary storage."""
    from labs.vsphere import hook as vsphere_hook
    from tests.e2e.test_vsphere_e2e import vmware_source_round

    cli, labs, _ = cs_stack
    vlab = vsphere_hook.attach()
    assert vlab is not None
    vmware_source_round((cli, labs["vsphere"], vlab), tmp_path, "vs-cs", labs["cloudstack"]["target"])


def test_vmware_to_cloudstack_drill_then_failover_boot_the_guest_in_cloudstack(
    cs_stack: tuple[Cli, dict[str, Any], CsLab], tmp_path: Path
) -> None:
    """The seed's flagship flow: a VMware VM with the bootable guest replicated into CloudStack. A drill
    makes a CloudStack VM from the point on the isolated network (its volumes flat copies imported),
    sees the guest boot on its console and removes everything it made; a failover makes the
    production VM on the mapped network and boots it; the point never changes."""
    import subprocess

    from helpers_vsphere import current_disk

    from labs.guest.build import build as build_guest
    from labs.vsphere import hook as vsphere_hook

    cli, labs, lab = cs_stack
    vlab = vsphere_hook.attach()
    assert vlab is not None
    job = "vs-cs-dr"
    ready = "SENDENSE-GUEST-READY"
    moref = cli.json("lab", "vm", "vs-cs-dr-vm", "--disk-mib", "256")["moref"]
    path, fmt = current_disk(vlab, moref, 0)
    subprocess.run(["qemu-img", "convert", "-n", "-O", fmt, str(build_guest()), path], check=True)
    spec = {
        "name": job,
        "source": {**labs["vsphere"]["source"], "vm": "vs-cs-dr-vm"},
        "target": labs["cloudstack"]["target"],
        "schedule": {"interval": "1h"},
        "recovery": {"memory_mib": 256, "boot_check": {"console_contains": ready, "timeout": "4m"}},
    }
    (tmp_path / f"{job}.yaml").write_text(yaml.safe_dump(spec))
    cli.json("job", "create", "-f", str(tmp_path / f"{job}.yaml"))
    pool = Path(lab.first("listStoragePools", "storagepool")["path"])

    def ours() -> list[str]:
        vms = lab.client.call("listVirtualMachines", listall=True).get("virtualmachine") or []
        return sorted(v["name"] for v in vms if job in v["name"] or job in str(v.get("displayname", "")))

    try:
        st = cli.wait_point(job, timeout=300)
        before = sorted(export_raw(cli, job, st["last_point"], tmp_path / "x0").items())[0][1].read_bytes()
        files_before = sorted(p.name for p in pool.iterdir())
        r = cli.json("drill", "run", job, timeout=600)
        assert r["error"] is None and r["point_id"] == st["last_point"], r
        assert r["boot"]["ok"] and ready in r["boot"]["evidence"], r["boot"]
        assert r["cleaned"] and r["left_behind"] == [], r
        print(f"FIGURE VMware -> CloudStack drill: boot {r['boot']['seconds']} s, result {r}")
        assert ours() == []  # the drill's VM expunged
        assert sorted(p.name for p in pool.iterdir()) == files_before  # its volumes and copies gone
        [after] = cli.json("point", "list", job)
        assert after["holds"] == []

        fo = cli.json("failover", job, timeout=600)
        assert fo["error"] is None and fo["boot"]["ok"] and ready in fo["boot"]["evidence"], fo
        print(
            f"FIGURE VMware -> CloudStack failover: RTO {fo['rto_seconds']} s, boot {fo['boot']['seconds']} s"
        )
        assert cli.json("job", "status", job)["state"] == "failed-over"
        [vm] = [
            v
            for v in lab.client.call("listVirtualMachines", listall=True).get("virtualmachine") or []
            if v["name"] in ours()
        ]
        assert vm["state"] == "Running" and vm["nic"][0]["networkname"] == "lab-shared", vm
        again = sorted(export_raw(cli, job, st["last_point"], tmp_path / "x1").items())[0][1].read_bytes()
        assert again == before  # the VM runs on a copy: the point never changes
    finally:
        import asyncio

        from sendense.platforms import vms_for
        from tests.e2e.test_failback_e2e import _job_spec

        try:
            vms_for(asyncio.run(_job_spec(job))).destroy_vm(job)
        except Exception:  # noqa: BLE001 - the job may not exist
            pass
        cli.run("job", "delete", job, "--purge", check=False)


def test_cloudstack_to_vmware_failover_then_failback(
    cs_stack: tuple[Cli, dict[str, Any], CsLab], tmp_path: Path
) -> None:
    """The other way: a CloudStack VM with the bootable guest fails over to VMware (stopped, its last
    point read at rest, the vSphere placeholder boots it), then fails back: what the VMware VM wrote
    (CBT since the point) is written into the CloudStack VM's volumes in place, the VM is started
    through the API and boots, and the job replicates again incrementally."""
    import time

    cli, labs, lab = cs_stack
    job = "cs-vs-fb"
    ready = "SENDENSE-GUEST-READY"
    zone = lab.first("listZones", "zone")
    vm = lab.client.job(
        "deployVirtualMachine",
        zoneid=zone["id"],
        serviceofferingid=lab.first("listServiceOfferings", "serviceoffering", name="lab-medium")["id"],
        templateid=lab.first("listTemplates", "template", templatefilter="all", name="sendense-guest")["id"],
        networkids=lab.first("listNetworks", "network", name="lab-isolated")["id"],
        hostid=lab.hosts[HOST]["id"],
        name=f"{job}-vm",
    )["virtualmachine"]
    spec = {
        "name": job,
        "source": {**labs["cloudstack"]["source"], "vm": vm["name"]},
        "target": labs["vsphere"]["target"],
        "schedule": {"interval": "1h"},
        "recovery": {
            "memory_mib": 256,
            "network_map": {"lab-isolated": "VM Network"},
            "boot_check": {"console_contains": ready, "timeout": "4m"},
        },
    }
    (tmp_path / f"{job}.yaml").write_text(yaml.safe_dump(spec))
    base = lab.url.rsplit("/client/api", 1)[0]

    def console() -> str:
        with urllib.request.urlopen(f"{base}/_lab/vms/{vm['id']}/console", timeout=30) as r:
            return str(r.read().decode(errors="replace"))

    try:
        cli.json("job", "create", "-f", str(tmp_path / f"{job}.yaml"))
        cli.wait_point(job, timeout=300)
        fo = cli.json("failover", job, timeout=600)
        assert fo["error"] is None and fo["boot"]["ok"], fo
        assert lab.first("listVirtualMachines", "virtualmachine", id=vm["id"])["state"] == "Stopped"

        print(f"FIGURE CloudStack -> VMware failover: RTO {fo['rto_seconds']} s")
        r = cli.json("failback", job, timeout=900)
        assert r["error"] is None, r
        print(f"FIGURE CloudStack <- VMware failback: {r}")
        assert all(s["compared_whole"] == [] for s in r["reverse_syncs"]), r  # CBT knew where
        assert r["bytes_written"] > 0 and r["started"], r
        assert lab.first("listVirtualMachines", "virtualmachine", id=vm["id"])["state"] == "Running"
        deadline = time.monotonic() + 240
        while ready not in console():  # it boots its failed-back volumes
            assert time.monotonic() < deadline, console()[-400:]
            time.sleep(1)
        st = cli.wait_point(job, count=3, timeout=300)  # replicating from CloudStack again
        assert st["failed_over"] is None and st["last_sync"]["kind"] == "incremental", st
        root = sorted(export_raw(cli, job, st["last_point"], tmp_path / "after").items())[0][1]
        assert fscheck(root, "raw").ok
    finally:
        cli.run("job", "delete", job, "--purge", check=False)
        lab.destroy(vm)


def test_vmware_to_cloudstack_failover_then_failback(
    cs_stack: tuple[Cli, dict[str, Any], CsLab], tmp_path: Path
) -> None:
    """The flagship pair's way home: a VMware VM with the guest fails over into CloudStack (a VM over
    flat copies of the point), boots there, and fails back: what the CloudStack VM wrote since the point
    (the point bitmap of its volumes) goes into the VMware VM's disks in place, the VMware VM is
    powered on, and the job replicates again incrementally."""
    import subprocess

    from helpers_vsphere import current_disk

    from labs.guest.build import build as build_guest
    from labs.vsphere import hook as vsphere_hook

    cli, labs, _ = cs_stack
    vlab = vsphere_hook.attach()
    assert vlab is not None
    job = "vs-cs-fb"
    ready = "SENDENSE-GUEST-READY"
    moref = cli.json("lab", "vm", "vs-cs-fb-vm", "--disk-mib", "256")["moref"]
    path, fmt = current_disk(vlab, moref, 0)
    subprocess.run(["qemu-img", "convert", "-n", "-O", fmt, str(build_guest()), path], check=True)
    spec = {
        "name": job,
        "source": {**labs["vsphere"]["source"], "vm": "vs-cs-fb-vm"},
        "target": labs["cloudstack"]["target"],
        "schedule": {"interval": "1h"},
        "recovery": {"memory_mib": 256, "boot_check": {"console_contains": ready, "timeout": "4m"}},
    }
    (tmp_path / f"{job}.yaml").write_text(yaml.safe_dump(spec))
    try:
        cli.json("job", "create", "-f", str(tmp_path / f"{job}.yaml"))
        cli.wait_point(job, timeout=300)
        fo = cli.json("failover", job, timeout=600)
        assert fo["error"] is None and fo["boot"]["ok"], fo
        r = cli.json("failback", job, timeout=900)
        assert r["error"] is None, r
        print(f"FIGURE VMware <- CloudStack failback: {r}")
        assert r["bytes_written"] > 0 and r["started"], r  # the guest's boot in CloudStack wrote
        assert vlab.vm(moref).runtime.powerState == "poweredOn"
        st = cli.wait_point(job, count=2, timeout=300)  # replicating again
        assert st["failed_over"] is None and st["last_sync"]["kind"] == "incremental", st
        vlab.wait(vlab.vm(moref).PowerOffVM_Task())
        path, fmt = current_disk(vlab, moref, 0)
        assert fscheck(Path(path), fmt).ok  # the CloudStack VM's file system came home
    finally:
        cli.run("job", "delete", job, "--purge", check=False)
