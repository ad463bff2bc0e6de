"""Whoever reaches Temporal does not command the root agent (issue 11, finding 1).

The embedded stack runs as root with a narrow agent policy. `nobody`, a local user who can reach the
Temporal port and even holds the payload key (a copy given to it: the codec keeps payloads secret, it
is not an authority), starts jobs straight through the SDK (no CLI and its checks): one copies a root-only
image into a directory it can read, one points a job at a root-owned directory and purges it. The
agent refuses both on their first activity, in one line naming the spec field, and touches nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers_kvm import MiB, make_qcow2, qemu_io

from app import stack
from sendense import config
from tests.e2e.conftest import Cli, free_port

pytestmark = pytest.mark.root

ATTACK = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from temporalio.client import Client, WorkflowFailureError
    from workers.codec import data_converter, load_codec
    from sendense.models import DeleteRequest, JobSpec, ReplicationInput
    from workflows.replication import ReplicationWorkflow

    async def main(address, queue, spec, purge):
        client = await Client.connect(address, data_converter=data_converter(load_codec()))
        spec = JobSpec.model_validate(spec)
        h = await client.start_workflow(
            ReplicationWorkflow.run,
            ReplicationInput(spec=spec, source_queue=queue, target_queue=queue, search_attributes=False),
            id="job-" + spec.name, task_queue="sendense-control",
        )
        if purge:
            try:
                await h.execute_update(ReplicationWorkflow.delete, DeleteRequest(purge=True))
            except Exception as e:
                pass
        try:
            await asyncio.wait_for(h.result(), 120)
            return "completed"
        except WorkflowFailureError as e:
            cause = e.cause
            while getattr(cause, "cause", None) is not None:
                cause = cause.cause
            return getattr(cause, "message", str(cause))

    a = json.loads(sys.argv[1])
    outcome = asyncio.run(main(a["address"], a["queue"], a["spec"], a["purge"]))
    print(json.dumps({"outcome": outcome}), flush=True)
    os._exit(0)  # the SDK's runtime threads may abort a normal interpreter exit
    """
)


@pytest.fixture(scope="module")
def narrow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, Path]]:
    base = tmp_path_factory.mktemp("policy")
    base.chmod(0o755)  # nobody may look around, as on a host
    for d in ("images", "replicas"):
        (base / d).mkdir()
    policy = base / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "platforms": ["kvm"],
                "source_roots": [str(base / "images")],
                "target_roots": [str(base / "replicas")],
            }
        )
    )
    state = base / "state"
    port = free_port()
    keys = ("SENDENSE_HOME", "SENDENSE_HOST_ID", "SENDENSE_POLICY")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(SENDENSE_HOME=str(state), SENDENSE_HOST_ID=f"pol{port}", SENDENSE_POLICY=str(policy))
    env = dict(os.environ)
    env.pop("SENDENSE_TEMPORAL", None)
    try:
        stack.up(state, port=port, ui_port=free_port())
        yield Cli(env=env, state=state), base
    finally:
        stack.down(state)
        given = base / "key-given-to-nobody"
        if given.is_symlink():
            shutil.rmtree(given.resolve().parent, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def attack_as_nobody(cli: Cli, spec: dict[str, object], purge: bool = False) -> str:
    info = json.loads((cli.state / "stack.json").read_text())
    key = cli.state.parent / "key-given-to-nobody"
    if not key.exists():  # (the pytest base directory is root's 0700: a directory of nobody's in /tmp)
        d = Path(tempfile.mkdtemp(prefix="sendense-nobody-key-"))
        os.chown(d, 65534, 65534)
        shutil.copy(cli.state / "codec.key", d / "codec.key")
        os.chown(d / "codec.key", 65534, 65534)
        key.symlink_to(d / "codec.key")
    key = key.resolve()
    arg = json.dumps({"address": info["address"], "queue": config.host_queue(), "spec": spec, "purge": purge})
    p = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", ATTACK, arg],
        capture_output=True,
        text=True,
        timeout=180,
        env={
            "PATH": os.environ["PATH"],
            "HOME": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1",
            "SENDENSE_CODEC_KEY": str(key),
        },
        cwd="/",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return str(json.loads(p.stdout)["outcome"])


def test_nobody_cannot_copy_a_root_only_image_through_the_sdk(narrow_stack: tuple[Cli, Path]) -> None:
    cli, base = narrow_stack
    secret = base / "secret"
    secret.mkdir(mode=0o700)
    qemu_io(make_qcow2(secret / "disk.qcow2", 4 * MiB), "write -P 0x5E 0 4M")
    loot = base / "loot"
    loot.mkdir()
    loot.chmod(0o777)
    outcome = attack_as_nobody(
        cli,
        {
            "name": "steal",
            "source": {"platform": "kvm", "disks": [str(secret / "disk.qcow2")]},
            "target": {"platform": "kvm", "path": str(loot)},
        },
    )
    assert outcome.startswith(
        f"job steal: source.disks[0] {secret}/disk.qcow2 is outside this agent's source roots"
    ), outcome
    assert "\n" not in outcome
    assert list(loot.iterdir()) == []


def test_nobody_cannot_purge_a_root_owned_directory_through_the_sdk(narrow_stack: tuple[Cli, Path]) -> None:
    cli, base = narrow_stack
    owned = base / "owned"
    owned.mkdir()
    (owned / "keep.txt").write_text("root's data\n")
    qemu_io(make_qcow2(base / "images" / "a.qcow2", 4 * MiB), "write -P 0x11 0 4M")
    outcome = attack_as_nobody(
        cli,
        {
            "name": "purge",
            "source": {"platform": "kvm", "disks": [str(base / "images" / "a.qcow2")]},
            "target": {"platform": "kvm", "path": str(owned)},
        },
        purge=True,
    )
    assert outcome.startswith(f"job purge: target.path {owned} is outside this agent's target roots"), outcome
    assert (owned / "keep.txt").read_text() == "root's data\n"
    assert sorted(p.name for p in owned.iterdir()) == ["keep.txt"]


def test_the_same_job_inside_the_roots_runs(narrow_stack: tuple[Cli, Path]) -> None:
    """The policy refuses what it must and nothing more: a job within the roots syncs, through the CLI."""
    cli, base = narrow_stack
    disk = base / "images" / "ok.qcow2"
    qemu_io(make_qcow2(disk, 4 * MiB), "write -P 0x22 0 4M")
    spec = base / "ok.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "ok",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(base / "replicas")},
            }
        )
    )
    cli.run("job", "create", "-f", str(spec))
    cli.wait_point("ok")
    points = cli.json("point", "list", "ok")
    assert len(points) == 1


def test_the_cli_says_what_the_agent_refused_in_one_line(
    narrow_stack: tuple[Cli, Path], tmp_path: Path
) -> None:
    cli, base = narrow_stack
    disk = make_qcow2(tmp_path / "elsewhere.qcow2", 4 * MiB)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "elsewhere",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(base / "replicas")},
            }
        )
    )
    p = cli.run("job", "create", "-f", str(spec), check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert f"source.disks[0] {disk} is outside this agent's source roots ({base}/images)" in lines[0]
