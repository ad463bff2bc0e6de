"""VMware -> KVM, KVM -> VMware and VMware -> VMware end to end: the real dev server and worker
process, the vSphere lab started by `sendense lab up` (vcsim-lab, its VDDK stand-in), the agent reaching
it with the lab's login from what `lab up` registered (never from the spec), driven through the CLI.
Full then incremental, bit-exact against the source at the snapshot instant, only changed areas read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers_kvm import KiB, MiB, make_qcow2, qemu_io, to_raw
from helpers_vsphere import disk_image, guest_io

from app import stack
from labs.vsphere import VsphereLab
from labs.vsphere import hook as vsphere_hook
from tests.e2e.conftest import Cli, free_port
from tests.e2e.test_replication_e2e import export_raw, same

G = 64 * KiB  # the lab's change tracking block


@pytest.fixture(scope="module")
def vs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, dict[str, Any], VsphereLab]]:  # noqa: E501
    """A stack of its own, with no vSphere login in its environment: `lab up` registers the lab's for
    its endpoint, and the running worker reaches the lab without a restart."""
    state = Path(tmp_path_factory.mktemp("sdvs"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDENSE_VSPHERE_", "SENDENSE_VDDK_"))}
    env.update(SENDENSE_HOME=str(state), SENDENSE_HOST_ID=f"vs{port}")
    env.pop("SENDENSE_TEMPORAL", None)
    cli = Cli(env=env, state=state)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        stack.up(state, port=port, ui_port=free_port())
        labs = cli.json("lab", "up", "--show-secrets")
        attached = vsphere_hook.attach()
        assert attached is not None
        yield cli, {**labs["vsphere"], "aws": labs["aws"]}, attached
    finally:
        try:
            stack.down(state)
        finally:
            cli.run("lab", "down", check=False)
            os.environ.clear()
            os.environ.update(saved)


def write_job(tmp_path: Path, name: str, source: dict[str, Any], target: dict[str, Any]) -> None:
    spec = {"name": name, "source": source, "target": target, "schedule": {"interval": "1h"}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def test_lab_up_says_what_a_spec_needs_and_hides_the_password(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab],
) -> None:
    cli, lab, _ = vs_stack
    again = cli.json("lab", "up")["vsphere"]
    assert again["endpoint_url"] == lab["endpoint_url"]
    assert again["env"]["SENDENSE_VSPHERE_PASSWORD"] is None and lab["env"]["SENDENSE_VSPHERE_PASSWORD"]
    assert set(again["source"]) == {"platform", "server", "thumbprint", "vm"}
    assert lab["env"]["SENDENSE_VSPHERE_PASSWORD"] not in cli.run("lab", "status").stdout


def test_vmware_to_kvm_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    cli, lab, vlab = vs_stack
    made = cli.json("lab", "vm", "vs-web", "--disk-mib", "256", "--disk-mib", "16")
    moref = made["moref"]
    guest_io(vlab, moref, 1, "write -P 0x21 1M 512k")
    ref0 = [disk_image(vlab, moref, i, tmp_path / f"r0-{i}.raw") for i in (0, 1)]
    write_job(
        tmp_path,
        "e2e-vs-kvm",
        {**lab["source"], "vm": "vs-web"},
        {"platform": "kvm", "path": str(cli.state / "replicas")},
    )
    cli.json("job", "create", "-f", str(tmp_path / "e2e-vs-kvm.yaml"))
    st = cli.wait_point("e2e-vs-kvm", 1, timeout=300)
    assert st["last_sync"]["kind"] == "full"
    p1 = st["last_point"]

    guest_io(vlab, moref, 0, "write -P 0x31 100M 4k", "write -P 0x32 200M 64k")  # two blocks
    guest_io(vlab, moref, 1, "write -P 0x41 10M 10")  # one
    ref1 = [disk_image(vlab, moref, i, tmp_path / f"r1-{i}.raw") for i in (0, 1)]
    r = cli.json("job", "sync-now", "e2e-vs-kvm", "--wait", timeout=300)
    assert r["kind"] == "incremental"
    assert r["bytes_read"] == 3 * G  # only the changed blocks were read
    for point, refs in ((p1, ref0), (r["point_id"], ref1)):
        files = export_raw(cli, "e2e-vs-kvm", point, tmp_path / f"x-{point}")
        assert sorted(files) == ["scsi0-0", "scsi0-1"]
        assert same(files["scsi0-0"], refs[0]) and same(files["scsi0-1"], refs[1])
    history = cli.run("job", "status", "e2e-vs-kvm", "--json").stdout
    assert lab["env"]["SENDENSE_VSPHERE_PASSWORD"] not in history
    cli.json("job", "delete", "e2e-vs-kvm", "--purge")


def test_kvm_to_vmware_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    cli, lab, vlab = vs_stack
    d0 = make_qcow2(tmp_path / "root.qcow2", 48 * MiB)
    d1 = make_qcow2(tmp_path / "data.qcow2", 16 * MiB)
    qemu_io(d0, "write -P 0x11 0 5M", "write -P 0x12 40M 1M")
    qemu_io(d1, "write -P 0x21 3M 512k")
    ref0 = [to_raw(d, tmp_path / f"r0-{i}.raw") for i, d in enumerate((d0, d1))]
    write_job(tmp_path, "e2e-kvm-vs", {"platform": "kvm", "disks": [str(d0), str(d1)]}, lab["target"])
    cli.json("job", "create", "-f", str(tmp_path / "e2e-kvm-vs.yaml"))
    st = cli.wait_point("e2e-kvm-vs", 1, timeout=300)
    assert st["last_sync"]["kind"] == "full"
    p1 = st["last_point"]

    qemu_io(d0, "write -P 0x31 1M 4k", "write -z 40M 1M")
    qemu_io(d1, "write -P 0x41 10M 64k")
    ref1 = [to_raw(d, tmp_path / f"r1-{i}.raw") for i, d in enumerate((d0, d1))]
    r = cli.json("job", "sync-now", "e2e-kvm-vs", "--wait", timeout=300)
    assert r["kind"] == "incremental"
    points = [p["point_id"] for p in cli.json("point", "list", "e2e-kvm-vs")]
    assert points == [r["point_id"], p1]
    for point, refs in ((p1, ref0), (r["point_id"], ref1)):  # read back through the VDDK stand-in
        files = export_raw(cli, "e2e-kvm-vs", point, tmp_path / f"x-{point}")
        assert same(files["disk0"], refs[0]) and same(files["disk1"], refs[1])
    cli.json("job", "delete", "e2e-kvm-vs", "--purge")
    assert vlab.si().RetrieveContent().searchIndex.FindByInventoryPath("DC0/vm/sendense-e2e-kvm-vs") is None


def vmware_source_round(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab],
    tmp_path: Path,
    job: str,
    target: dict[str, Any],
    block: int = G,
) -> None:
    """A lab VM (the guest and a data disk) replicated to `target`: full, then incremental, each point
    exported and compared with the VM's disks at the snapshot instant; then the job is purged."""
    cli, lab, vlab = vs_stack
    vm = f"{job}-vm"
    moref = cli.json("lab", "vm", vm, "--disk-mib", "256", "--disk-mib", "8")["moref"]
    guest_io(vlab, moref, 1, "write -P 0x21 1M 512k")
    ref0 = [disk_image(vlab, moref, i, tmp_path / f"r0-{i}.raw") for i in (0, 1)]
    write_job(tmp_path, job, {**lab["source"], "vm": vm}, target)
    cli.json("job", "create", "-f", str(tmp_path / f"{job}.yaml"))
    p1 = cli.wait_point(job, 1, timeout=300)["last_point"]
    guest_io(vlab, moref, 0, "write -P 0x31 100M 4k")
    guest_io(vlab, moref, 1, "write -P 0x41 2M 64k")
    ref1 = [disk_image(vlab, moref, i, tmp_path / f"r1-{i}.raw") for i in (0, 1)]
    r = cli.json("job", "sync-now", job, "--wait", timeout=300)
    assert r["kind"] == "incremental" and r["bytes_read"] == 2 * block  # (the target's whole blocks)
    for point, refs in ((p1, ref0), (r["point_id"], ref1)):
        files = export_raw(cli, job, point, tmp_path / f"x-{point}")
        assert same(files["scsi0-0"], refs[0]) and same(files["scsi0-1"], refs[1])
    cli.json("job", "delete", job, "--purge")


def test_vmware_to_aws_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    aws = vs_stack[1]["aws"]
    target = {"platform": "aws", "region": aws["region"], "endpoint_url": aws["endpoint_url"]}
    vmware_source_round(vs_stack, tmp_path, "e2e-vs-aws", target, block=512 * KiB)


def test_vmware_to_vmware_full_then_incremental_bit_exact(
    vs_stack: tuple[Cli, dict[str, Any], VsphereLab], tmp_path: Path
) -> None:
    vmware_source_round(vs_stack, tmp_path, "e2e-vs-vs", vs_stack[1]["target"])
