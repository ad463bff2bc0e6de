"""KVM -> AWS and AWS -> KVM jobs end to end: the real dev server and worker process, the AWS lab
started by `sendense lab up`, the agent reaching it with the lab's credentials from its environment
(never from the spec), driven through the CLI. Full then incremental, bit-exact both ways."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml
from helpers_kvm import MiB, make_qcow2, qemu_io, to_raw

from app import stack
from labs.guest.fscheck import check
from tests.e2e.conftest import Cli, free_port
from tests.e2e.test_replication_e2e import export_raw, same

BLOCK = 512 * 1024


@pytest.fixture(scope="module")
def aws_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, dict]]:  # type: ignore[type-arg]
    """A stack of its own, started before the lab and with no AWS credentials in its environment: `lab up`
    registers the lab's for its endpoint, and the running worker reaches the lab without a restart
    (issue 10 item 2: the lab hook wires the embedded stack)."""
    state = Path(tmp_path_factory.mktemp("sdaws"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(SENDENSE_HOME=str(state), SENDENSE_HOST_ID=f"aws{port}", AWS_EC2_METADATA_DISABLED="true")
    env.pop("SENDENSE_TEMPORAL", None)
    cli = Cli(env=env, state=state)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        stack.up(state, port=port, ui_port=free_port())
        lab = cli.json("lab", "up", "--show-secrets")["aws"]
        yield cli, lab
    finally:
        try:
            stack.down(state)
        finally:
            cli.run("lab", "down", check=False)
            os.environ.clear()
            os.environ.update(saved)


def ec2(lab: dict) -> object:  # type: ignore[type-arg]
    return boto3.client(
        "ec2",
        region_name=lab["region"],
        endpoint_url=lab["endpoint_url"],
        aws_access_key_id=lab["env"]["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=lab["env"]["AWS_SECRET_ACCESS_KEY"],
    )


def test_lab_up_describes_what_a_spec_needs_and_is_idempotent(aws_stack: tuple[Cli, dict]) -> None:  # type: ignore[type-arg]
    cli, lab = aws_stack
    again = cli.json("lab", "up")["aws"]
    assert again["endpoint_url"] == lab["endpoint_url"]
    assert again["source"] == {
        "platform": "aws",
        "region": lab["region"],
        "endpoint_url": lab["endpoint_url"],
    }
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(lab["env"])
    assert cli.json("lab", "status")["aws"]["running"] is True


def test_lab_secret_printed_only_with_show_secrets(aws_stack: tuple[Cli, dict]) -> None:  # type: ignore[type-arg]
    """Issue 11: `lab up/status --json` printed the lab's secret key; now only with --show-secrets,
    and the output says it is hidden and how to see it."""
    cli, lab = aws_stack
    secret = lab["env"]["AWS_SECRET_ACCESS_KEY"]
    assert secret and len(secret) >= 16
    for verb in ("up", "status"):
        hidden = cli.json("lab", verb)["aws"]
        assert hidden["env"]["AWS_SECRET_ACCESS_KEY"] is None and hidden["hidden"] == [
            "AWS_SECRET_ACCESS_KEY"
        ]
        assert "--show-secrets" in hidden["hidden_note"]
        assert hidden["env"]["AWS_ACCESS_KEY_ID"] == lab["env"]["AWS_ACCESS_KEY_ID"]  # an id, not a secret
        text = cli.run("lab", verb).stdout
        assert secret not in text and "hidden; add --show-secrets" in text, text
        shown = cli.json("lab", verb, "--show-secrets")["aws"]
        assert shown["env"]["AWS_SECRET_ACCESS_KEY"] == secret and "hidden" not in shown
        assert f"AWS_SECRET_ACCESS_KEY={secret}" in cli.run("lab", verb, "--show-secrets").stdout


def test_kvm_to_aws_full_then_incremental_bit_exact(aws_stack: tuple[Cli, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    cli, lab = aws_stack
    d0 = make_qcow2(tmp_path / "root.qcow2", 48 * MiB)
    d1 = make_qcow2(tmp_path / "data.qcow2", 16 * MiB)
    qemu_io(d0, "write -P 0x11 0 5M", "write -P 0x12 40M 1M")
    qemu_io(d1, "write -P 0x21 3M 512k")
    ref0 = [to_raw(d, tmp_path / f"r0-{i}.raw") for i, d in enumerate((d0, d1))]
    spec = {
        "name": "e2e-kvm-aws",
        "source": {"platform": "kvm", "disks": [str(d0), str(d1)]},
        "target": {"platform": "aws", "region": lab["region"], "endpoint_url": lab["endpoint_url"]},
        "schedule": {"interval": "1h"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    cli.json("job", "create", "-f", str(tmp_path / "job.yaml"))
    st = cli.wait_point("e2e-kvm-aws", 1)
    assert st["last_sync"]["kind"] == "full" and st["last_sync"]["bytes_written"] == (5 + 1 + 0.5) * MiB
    p1 = st["last_point"]

    qemu_io(d0, "write -P 0x31 1M 4k", "write -z 40M 1M")  # one block changed, one zeroed over data
    qemu_io(d1, "write -P 0x41 10M 64k")
    ref1 = [to_raw(d, tmp_path / f"r1-{i}.raw") for i, d in enumerate((d0, d1))]
    r = cli.json("job", "sync-now", "e2e-kvm-aws", "--wait")
    assert r["kind"] == "incremental"
    assert r["bytes_written"] == 2 * BLOCK and r["bytes_zeroed"] == 2 * BLOCK  # whole 512 KiB blocks
    points = [p["point_id"] for p in cli.json("point", "list", "e2e-kvm-aws")]
    assert points == [r["point_id"], p1]
    for point, refs in ((p1, ref0), (r["point_id"], ref1)):  # read back through GetSnapshotBlock
        files = export_raw(cli, "e2e-kvm-aws", point, tmp_path / f"x-{point}")
        assert same(files["disk0"], refs[0]) and same(files["disk1"], refs[1])
    # the points are EBS snapshots tagged with the job; no credential went into the workflow
    snaps = ec2(lab).describe_snapshots(  # type: ignore[attr-defined]
        OwnerIds=["self"], Filters=[{"Name": "tag:sendense:job", "Values": ["e2e-kvm-aws"]}]
    )["Snapshots"]
    assert len(snaps) == 4 and all(s["State"] == "completed" for s in snaps)
    history = cli.run("job", "status", "e2e-kvm-aws", "--json").stdout
    assert lab["env"]["AWS_SECRET_ACCESS_KEY"] not in history
    cli.json("job", "delete", "e2e-kvm-aws", "--purge")
    left = ec2(lab).describe_snapshots(  # type: ignore[attr-defined]
        OwnerIds=["self"], Filters=[{"Name": "tag:sendense:job", "Values": ["e2e-kvm-aws"]}]
    )["Snapshots"]
    assert left == [] and not (cli.state / "aws-target" / "e2e-kvm-aws").exists()  # issue 9 item 21


def test_aws_to_kvm_full_then_incremental_bit_exact(aws_stack: tuple[Cli, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    cli, lab = aws_stack
    inst = cli.json("lab", "instance", "e2e-src", "--disk-gib", "1", "--disk-gib", "1", "--blank")
    (_, vol0), (_, vol1) = [(v["device"], v["volume_id"]) for v in inst["volumes"]]
    cli.run("lab", "write", vol0, "0", "--pattern", "17", "--length", str(3 * MiB))
    cli.run("lab", "write", vol1, str(100 * MiB + 5), "--pattern", "34", "--length", "1000")
    spec = {
        "name": "e2e-aws-kvm",
        "source": {
            "platform": "aws",
            "instance_id": inst["instance_id"],
            "region": lab["region"],
            "endpoint_url": lab["endpoint_url"],
        },
        "target": {"platform": "kvm", "path": str(tmp_path / "replicas")},
        "schedule": {"interval": "1h"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    cli.json("job", "create", "-f", str(tmp_path / "job.yaml"))
    st = cli.wait_point("e2e-aws-kvm", 1)
    assert st["last_sync"]["kind"] == "full"
    assert st["last_sync"]["bytes_read"] == 7 * BLOCK  # 6 blocks of 3 MiB + the one of 1000 bytes
    p1 = st["last_point"]
    files = export_raw(cli, "e2e-aws-kvm", p1, tmp_path / "x1")
    assert files["xvda"].stat().st_size == 1 << 30
    with open(files["xvda"], "rb") as f:
        assert f.read(3 * MiB) == b"\x11" * (3 * MiB) and f.read(BLOCK) == bytes(BLOCK)
    with open(files["sdf"], "rb") as f:
        f.seek(100 * MiB)
        assert f.read(BLOCK) == bytes(5) + b"\x22" * 1000 + bytes(BLOCK - 1005)

    # incremental: two blocks written (one with the bytes it had), 4 KiB of the guest's
    cli.run("lab", "write", vol0, str(2 * MiB), "--pattern", "17", "--length", "4096")
    cli.run("lab", "write", vol1, str(500 * MiB), "--pattern", "51", "--length", "4096")
    r = cli.json("job", "sync-now", "e2e-aws-kvm", "--wait")
    assert r["kind"] == "incremental"
    assert r["bytes_read"] == 2 * BLOCK  # exactly the changed blocks were listed and read
    assert r["bytes_written"] == 4096  # compared with the replica: only the 4 KiB that differ
    files2 = export_raw(cli, "e2e-aws-kvm", r["point_id"], tmp_path / "x2")
    with open(files2["sdf"], "rb") as f:
        f.seek(500 * MiB)
        assert f.read(8192) == b"\x33" * 4096 + bytes(4096)
    assert same(files2["xvda"], files["xvda"])
    # superseded source snapshots are released: one per volume is left, the last sync's
    snaps = ec2(lab).describe_snapshots(  # type: ignore[attr-defined]
        OwnerIds=["self"], Filters=[{"Name": "tag:sendense:job", "Values": ["e2e-aws-kvm"]}]
    )["Snapshots"]
    assert len(snaps) == 2
    cli.json("job", "delete", "e2e-aws-kvm")
    left = ec2(lab).describe_snapshots(  # type: ignore[attr-defined]
        OwnerIds=["self"], Filters=[{"Name": "tag:sendense:job", "Values": ["e2e-aws-kvm"]}]
    )["Snapshots"]
    assert left == []


def test_aws_to_aws_in_one_region_keeps_every_point(aws_stack: tuple[Cli, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    """Issue 9 item 1 as the user ran it: source and target on the same lab region. The second sync is
    an incremental of the one block written, and both points stay; the source keeps its newest
    snapshots only."""
    cli, lab = aws_stack
    inst = cli.json("lab", "instance", "e2e-a2a", "--disk-gib", "1", "--blank")
    vol = inst["volumes"][0]["volume_id"]
    cli.run("lab", "write", vol, "0", "--pattern", "17", "--length", str(3 * MiB))
    place = {"platform": "aws", "region": lab["region"], "endpoint_url": lab["endpoint_url"]}
    spec = {
        "name": "e2e-a2a",
        "source": {**place, "instance_id": inst["instance_id"]},
        "target": place,
        "schedule": {"interval": "1h"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    cli.json("job", "create", "-f", str(tmp_path / "job.yaml"))
    st = cli.wait_point("e2e-a2a", 1)
    assert st["last_sync"]["kind"] == "full" and st["last_sync"]["bytes_written"] == 3 * MiB
    cli.run("lab", "write", vol, str(5 * MiB), "--pattern", "34", "--length", str(BLOCK))
    r = cli.json("job", "sync-now", "e2e-a2a", "--wait")
    assert r["kind"] == "incremental" and r["bytes_read"] == BLOCK and r["bytes_written"] == BLOCK
    points = cli.json("point", "list", "e2e-a2a")
    assert [p["point_id"] for p in points] == [r["point_id"], st["last_point"]]
    snaps = ec2(lab).describe_snapshots(  # type: ignore[attr-defined]
        OwnerIds=["self"], Filters=[{"Name": "tag:sendense:job", "Values": ["e2e-a2a"]}]
    )["Snapshots"]
    roles = sorted(next(t["Value"] for t in s["Tags"] if t["Key"] == "sendense:role") for s in snaps)
    assert roles == ["source", "target", "target"]
    files = export_raw(cli, "e2e-a2a", r["point_id"], tmp_path / "x")
    with open(files["xvda"], "rb") as f:
        assert f.read(3 * MiB) == b"\x11" * (3 * MiB)
        f.seek(5 * MiB)
        assert f.read(BLOCK) == b"\x22" * BLOCK
    cli.json("job", "delete", "e2e-a2a", "--purge")
    left = ec2(lab).describe_snapshots(  # type: ignore[attr-defined]
        OwnerIds=["self"], Filters=[{"Name": "tag:sendense:job", "Values": ["e2e-a2a"]}]
    )["Snapshots"]
    assert left == []


def test_a_job_recreated_under_a_deleted_jobs_name_is_refused_while_its_points_are_kept(
    aws_stack: tuple[Cli, dict],  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    """Issue 9 item 10 as reported: `job delete` keeps the points; a new job of that name (another VM)
    is refused at create in one line naming them, instead of adopting them."""
    cli, lab = aws_stack
    target = {"platform": "aws", "region": lab["region"], "endpoint_url": lab["endpoint_url"]}
    specs = []
    for i in range(2):
        disk = make_qcow2(tmp_path / f"vm{i}.qcow2", 4 * MiB)
        qemu_io(disk, f"write -P 0x{i + 1}{i + 1} 0 1M")
        spec = {"name": "e2e-again", "source": {"platform": "kvm", "disks": [str(disk)]}, "target": target}
        specs.append(tmp_path / f"job{i}.yaml")
        specs[-1].write_text(yaml.safe_dump({**spec, "schedule": {"interval": "1h"}}))
    cli.json("job", "create", "-f", str(specs[0]))
    cli.wait_point("e2e-again", 1)
    cli.json("job", "delete", "e2e-again")  # without --purge: the point is kept
    (kept,) = ec2(lab).describe_snapshots(  # type: ignore[attr-defined]
        OwnerIds=["self"], Filters=[{"Name": "tag:sendense:job", "Values": ["e2e-again"]}]
    )["Snapshots"]
    p = cli.run("job", "create", "-f", str(specs[1]), check=False)
    assert p.returncode != 0
    err = (p.stderr + p.stdout).strip()
    assert err.endswith(
        f"target: region {lab['region']} holds 1 recovery point of an earlier job e2e-again "
        f"({kept['SnapshotId']}); delete them or use another job name"
    ), err
    assert len(err.splitlines()) == 1, err
    ec2(lab).delete_snapshot(SnapshotId=kept["SnapshotId"])  # type: ignore[attr-defined]


def test_a_lab_instance_is_a_real_os_whose_points_are_consistent(
    aws_stack: tuple[Cli, dict], tmp_path: Path
) -> None:  # type: ignore[type-arg]
    """Issue 10 item 6: `sendense lab instance` boots the bootable guest (its console says so, through
    GetConsoleOutput), and a point of it, replicated AWS -> KVM while it runs, holds a filesystem that
    passes e2fsck after journal replay."""
    cli, lab = aws_stack
    inst = cli.json("lab", "instance", "e2e-guest")
    assert inst["guest"] is True
    iid = inst["instance_id"]
    deadline = time.monotonic() + 180
    console = ""
    while "SENDENSE-GUEST-READY" not in console:
        assert time.monotonic() < deadline, f"the guest did not boot: {console[-400:]}"
        time.sleep(1)
        console = ec2(lab).get_console_output(InstanceId=iid).get("Output", "")  # type: ignore[attr-defined]
    spec = {
        "name": "e2e-guest",
        "source": {
            "platform": "aws",
            "instance_id": iid,
            "region": lab["region"],
            "endpoint_url": lab["endpoint_url"],
        },
        "target": {"platform": "kvm", "path": str(tmp_path / "replicas")},
        "schedule": {"interval": "1h"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    cli.json("job", "create", "-f", str(tmp_path / "job.yaml"))
    st = cli.wait_point("e2e-guest", 1)
    [root] = [d for d in cli.json("point", "list", "e2e-guest")[0]["disks"] if d["key"] == "xvda"]
    fs = check(Path(root["path"]))
    assert fs.ok, f"point {st['last_point']}: {fs.detail}"
    cli.json("job", "delete", "e2e-guest", "--purge")


def _drill_leftovers(lab: dict, job: str) -> list[str]:  # type: ignore[type-arg]
    """What a drill could leave on the lab for `job`: instances not terminated, images, groups, volumes."""
    c = ec2(lab)
    vm = [{"Name": "tag:sendense:job", "Values": [job]}, {"Name": "tag-key", "Values": ["sendense:vm"]}]
    return (
        [
            i["InstanceId"]
            for r in c.describe_instances(Filters=vm)["Reservations"]  # type: ignore[attr-defined]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]
        + [i["ImageId"] for i in c.describe_images(Owners=["self"], Filters=vm)["Images"]]  # type: ignore[attr-defined]
        + [g["GroupId"] for g in c.describe_security_groups(Filters=vm)["SecurityGroups"]]  # type: ignore[attr-defined]
        + [v["VolumeId"] for v in c.describe_volumes(Filters=vm)["Volumes"]]  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize("source", ["kvm", "aws"])
def test_a_drill_on_an_aws_target_boots_the_guest_and_leaves_nothing(
    aws_stack: tuple[Cli, dict],
    tmp_path: Path,
    source: str,  # type: ignore[type-arg]
) -> None:
    """Issue 12: KVM -> AWS and AWS -> AWS drills. The guest's point (EBS snapshots) becomes an
    instance in an isolated group; its console (GetConsoleOutput) shows the guest's ready marker;
    the instance, its image, volumes and group are gone afterwards and the hold is released."""
    from labs.guest.build import build
    from tools.qemu import qemu_img

    cli, lab = aws_stack
    job = f"drill-{source}-aws"
    place = {"region": lab["region"], "endpoint_url": lab["endpoint_url"]}
    if source == "aws":
        iid = cli.json("lab", "instance", f"{job}-src")["instance_id"]
        src: dict[str, object] = {"platform": "aws", "instance_id": iid, **place}
    else:
        disk = tmp_path / "guest.qcow2"
        qemu_img("convert", "-O", "qcow2", str(build()), str(disk))
        src = {"platform": "kvm", "disks": [str(disk)]}
    spec = {
        "name": job,
        "source": src,
        "target": {"platform": "aws", **place},
        "schedule": {"interval": "1h"},
        "recovery": {"boot_check": {"console_contains": "SENDENSE-GUEST-READY", "timeout": "4m"}},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    cli.json("job", "create", "-f", str(tmp_path / "job.yaml"))
    st = cli.wait_point(job, 1, timeout=300)
    r = cli.json("drill", "run", job, timeout=600)
    assert r["point_id"] == st["last_point"] and r["error"] is None
    assert r["boot"]["ok"] and "SENDENSE-GUEST-READY" in r["boot"]["evidence"], r["boot"]
    assert r["vm"]["platform"] == "aws" and r["vm"]["vm_id"].startswith("i-")
    assert r["cleaned"] and _drill_leftovers(lab, job) == []
    assert cli.json("point", "list", job)[0]["holds"] == []
    cli.json("job", "delete", job, "--purge")


def _console(spec: object, name: str) -> str:
    from sendense.platforms import vms_for

    return vms_for(spec).console(name)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("source, target", [("kvm", "aws"), ("aws", "aws"), ("aws", "kvm")])
def test_failover_and_failback_with_aws_bring_the_guests_writes_home(
    aws_stack: tuple[Cli, dict],  # type: ignore[type-arg]
    tmp_path: Path,
    source: str,
    target: str,
) -> None:
    """Issue 12, failback in the directions with AWS: the guest runs its filesystem workload on the
    source; failover makes the job's VM on the target, which continues the workload; failback writes
    its work back (EBS: new snapshots on the source volume's lineage, then volumes swapped in at the
    instance's devices; KVM: the qcow2 image in place), starts the source where the product can, and
    the guest continues from the failed-over VM's sequence; the job then syncs incrementally, and the
    failed-over VM is gone."""
    import asyncio
    import re

    from labs.guest.build import workload_image
    from tests.e2e.test_failback_e2e import _job_spec
    from tools.qemu import qemu_img

    cli, lab = aws_stack
    job = f"fb-{source}-{target}"
    place = {"region": lab["region"], "endpoint_url": lab["endpoint_url"]}
    disk = tmp_path / "guest.qcow2"
    iid = ""
    if source == "aws":
        iid = cli.json("lab", "instance", f"{job}-src", "--workload")["instance_id"]
        src: dict[str, object] = {"platform": "aws", "instance_id": iid, **place}
        deadline = time.monotonic() + 240
        while "SENDENSE-GUEST-SEQ 25" not in ec2(lab).get_console_output(InstanceId=iid).get("Output", ""):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the source guest does not write"
            time.sleep(1)
    else:
        qemu_img("convert", "-O", "qcow2", str(workload_image()), str(disk))
        src = {"platform": "kvm", "disks": [str(disk)]}
    tgt = (
        {"platform": "aws", **place} if target == "aws" else {"platform": "kvm", "path": str(tmp_path / "r")}
    )
    check_boot = {"console_contains": r"SENDENSE-GUEST-BOOTED mode=\w+ seq=\d+", "timeout": "4m"}
    recovery: dict[str, object] = {"memory_mib": 256, "boot_check": check_boot}
    if source == "aws":  # its production VM: in the source's own subnet on AWS, unconnected on KVM
        [res] = ec2(lab).describe_instances(InstanceIds=[iid])["Reservations"]  # type: ignore[attr-defined]
        subnet = res["Instances"][0]["SubnetId"]
        recovery["network_map"] = {f"subnet:{subnet}": subnet if target == "aws" else "sendense-isolated"}
    spec_doc = {
        "name": job,
        "source": src,
        "target": tgt,
        "schedule": {"interval": "1h"},
        "recovery": recovery,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_doc))
    cli.json("job", "create", "-f", str(tmp_path / "job.yaml"))
    try:
        cli.wait_point(job, 1, timeout=300)
        p = cli.run("failover", job, "--json", check=False, timeout=600)
        fo = json.loads(p.stdout)
        assert fo["error"] is None and fo["planned"] == (source == "aws"), fo
        spec = asyncio.run(_job_spec(job))
        seq0 = int(re.search(r"seq=(\d+)", fo["boot"]["evidence"]).group(1))  # type: ignore[union-attr]
        want = seq0 + 50 - seq0 % 25
        deadline = time.monotonic() + 300
        while f"SENDENSE-GUEST-SEQ {want}" not in _console(spec, job):  # the failed-over VM writes on
            assert time.monotonic() < deadline, _console(spec, job)[-400:]
            time.sleep(1)
        printed = max(int(n) for n in re.findall(r"SENDENSE-GUEST-SEQ (\d+)", _console(spec, job)))

        r = cli.json("failback", job, timeout=900)
        assert r["error"] is None, r
        assert all(s["compared_whole"] == [] for s in r["reverse_syncs"]), r
        assert r["started"] == (source == "aws"), r
        if source == "aws":  # the instance boots from the swapped-in volume and writes on from there
            deadline = time.monotonic() + 300
            while True:
                out = ec2(lab).get_console_output(InstanceId=iid).get("Output", "")  # type: ignore[attr-defined]
                booted = [int(n) for n in re.findall(r"SENDENSE-GUEST-BOOTED mode=\w+ seq=(\d+)", out)]
                if booted and booted[-1] >= printed:
                    break
                assert time.monotonic() < deadline, (booted, printed, out[-400:])
                time.sleep(1)
        else:
            fs = check(disk)
            assert fs.ok and fs.seq is not None and fs.seq >= printed, (fs, printed)
        st = cli.wait_point(job, 3 if source == "aws" else 2, timeout=300)
        assert st["failed_over"] is None and st["last_sync"]["kind"] == "incremental", st
        if target == "aws":
            assert _drill_leftovers(lab, job) == []
        assert cli.json("point", "list", job)[0]["holds"] == []
    finally:
        cli.run("job", "delete", job, "--purge", check=False)
