"""No error of a spec echoes the value given: a secret pasted into the wrong field (a region, an
interval, a URL, a path) must not reach a terminal, a log or workflow history through the message
that refuses it.

Every field of every registered platform's spec models (sendense.platforms.REGISTRY), and of the job
spec around them, is planted in turn with secret-looking values; the refusal must not contain them:
through the models (what the SDK path and the workers decode) and through `sendense job create`."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from sendense import platforms
from sendense.errors import InvalidSpec
from sendense.models import JobSpec, ReplicationInput
from sendense.spec import parse_spec

# Each holds a marker that must never appear in a message (the values are what is planted).
SECRETS = {
    "EXAMPLEKEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # an AWS secret access key's shape
    "AKIAIOSFODNN7": "AKIAIOSFODNN7EXAMPLE",  # an access key id
    "s3cr3tt0k3n": "s3cr3tt0k3n0123456789abcdef",  # lower-case letters and digits: many patterns' alphabet
    "hunter2": "hunter2-pw\n",  # with a newline
    "ZXhhbXBsZS1": "ZXhhbXBsZS1zZWNyZXQ=" * 100,  # longer than any field allows
    "pa55word": "https://user:pa55word@example.com/x",  # a URL with a password, in any field
}

# A valid end of each form for each platform, to plant into. A platform added to the registry
# without its examples here fails test_every_registered_platform_has_examples.
EXAMPLES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("kvm", "source"): [
        {
            "platform": "kvm",
            "disks": ["/img/a.qcow2"],
            "hardware": {"cpus": 2, "nics": [{"mac": "52:54:00:12:34:56", "network": "bridge:br0"}]},
        },
        {"platform": "kvm", "qmp": "/run/vm.qmp", "host": "kvm-1"},
        {"platform": "kvm", "libvirt": {"uri": "qemu:///system", "domain": "web"}},
    ],
    ("kvm", "target"): [
        {"platform": "kvm", "path": "/srv/r", "libvirt": {"uri": "qemu:///system"}, "host": "dr-1"},
    ],
    ("aws", "source"): [
        {
            "platform": "aws",
            "instance_id": "i-0123456789abcdef0",
            "region": "eu-west-1",
            "endpoint_url": "http://127.0.0.1:4566",
        },
    ],
    ("aws", "target"): [
        {
            "platform": "aws",
            "region": "eu-west-1",
            "availability_zone": "eu-west-1a",
            "endpoint_url": "http://127.0.0.1:4566",
            "instance": {
                "instance_type": "m5.large",
                "subnet_id": "subnet-0abc12345678def90",
                "security_group_ids": ["sg-0123456789abcdef0"],
                "key_name": "ops",
                "boot_mode": "uefi",
            },
        },
    ],
    ("vsphere", "source"): [
        {
            "platform": "vsphere",
            "server": "vcenter.example.com:443",
            "thumbprint": "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD",
            "login": "prod",
            "vm": "/DC1/vm/web/web01",
            "instance_uuid": "50123456-89ab-cdef-0123-456789abcdef",
            "datacenter": "DC1",
            "quiesce": True,
            "vddk": {"libdir": "/opt/vmware-vix-disklib-distrib", "transports": ["nbdssl", "nbd"]},
        },
        {"platform": "vsphere", "server": "esx1", "insecure": True, "vm": "vm-42"},
    ],
    ("vsphere", "target"): [
        {
            "platform": "vsphere",
            "server": "[fd00::1]:8443",
            "thumbprint": ":".join(["ab"] * 32),  # SHA-256
            "login": "dr",
            "datacenter": "DR",
            "datastore": "ds-dr-1",
            "cluster": "dr-cluster",
            "esx_host": "esx-dr-1.example.com",
            "folder": "replicas/web",
            "vm_name": "web01-replica",
            "vddk": {"transports": ["hotadd"]},
        },
    ],
    ("cloudstack", "source"): [
        {
            "platform": "cloudstack",
            "url": "https://cloud.example:8443/client/api",
            "zone": "zone-1",
            "login": "dr",
            "vm": "web-1",
            "vm_id": "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",
            "host": "kvm-1",
        },
    ],
    ("cloudstack", "target"): [
        {
            "platform": "cloudstack",
            "url": "http://10.0.0.5:8080/client/api",
            "zone": "dr-zone",
            "storage": "primary-1",
            "service_offering": "medium",
            "disk_offering": "custom",
            "template": "any-linux",
            "networks": [{"source": "web-net", "target": "dr-net"}],
            "drill_network": "drill-net",
            "vm_name": "web-1-dr",
            "host": "kvm-dr-1",
        },
    ],
    ("memory", "source"): [
        {"platform": "memory", "vm": "web", "store": "s1", "block_size": 65536},
        {"platform": "memory", "vm": "web", "directory": "/var/tmp/store"},
    ],
    ("memory", "target"): [{"platform": "memory", "store": "s1", "block_size": 4096}],
}
OTHER_END = {"source": EXAMPLES[("kvm", "source")][0], "target": EXAMPLES[("kvm", "target")][0]}
JOB = {
    "name": "web1",
    "schedule": {"interval": "5m"},
    "retention": {"points": 24},
    "tuning": {"chunk_size": 1 << 20, "bandwidth_limit": 1 << 30, "heartbeat_timeout": "20s"},
}

Path_ = tuple[str | int, ...]


def _shapes(ann: Any) -> Iterator[tuple[bool, Any]]:
    """(is a list, element type) for each form a field's annotation admits."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        yield from _shapes(typing.get_args(ann)[0])
    elif origin in (typing.Union, types.UnionType):
        for a in typing.get_args(ann):
            if a is not type(None):
                yield from _shapes(a)
    elif origin in (list, tuple, set):
        for _, inner in _shapes(typing.get_args(ann)[0]):
            yield True, inner
    else:
        yield False, ann


def leaf_paths(model: type[BaseModel], prefix: Path_ = ()) -> Iterator[Path_]:
    """Every field of `model` and of the models it holds that a user writes a value into (a list's
    items as its item 0)."""
    for name, field in model.model_fields.items():
        for is_list, inner in _shapes(field.annotation):
            here = (*prefix, name, 0) if is_list else (*prefix, name)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from leaf_paths(inner, here)
            else:
                yield here
                if is_list:
                    yield (*prefix, name)  # the value where a list is expected


def planted(data: dict[str, Any], path: Path_, value: str) -> dict[str, Any]:
    d = copy.deepcopy(data)
    node: Any = d
    for key, nxt in zip(path, path[1:], strict=False):
        if isinstance(node, list):
            while len(node) <= int(key):
                node.append({} if not isinstance(nxt, int) else [])
            node = node[int(key)]
        else:
            if not isinstance(node.get(key), dict | list):
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
    last = path[-1]
    if isinstance(node, list):
        if len(node) <= int(last):
            node.append(value)
        else:
            node[int(last)] = value
    else:
        node[last] = value
    return d


def cases() -> list[tuple[str, dict[str, Any]]]:
    """(where the secret is, a job spec carrying it) for every field of every example, every secret."""
    out = []
    for (name, kind), examples in EXAMPLES.items():
        model = platforms.spec_model(kind, name)
        assert model is not None, (name, kind)
        other = "target" if kind == "source" else "source"
        for n, example in enumerate(examples):
            job = {**JOB, kind: example, other: OTHER_END[other]}
            for path in leaf_paths(model, (kind,)):
                out.append((f"{name}{n}:{'.'.join(map(str, path))}", planted(job, path, "?")))
    for path in leaf_paths(JobSpec):
        if path[0] not in ("source", "target"):
            job = {**JOB, "source": OTHER_END["source"], "target": OTHER_END["target"]}
            out.append((f"job:{'.'.join(map(str, path))}", planted(job, path, "?")))
    return out


def with_secret(data: Any, secret: str) -> Any:
    """`data` with its planted "?" replaced by `secret`."""
    if data == "?":
        return secret
    if isinstance(data, dict):
        return {k: with_secret(v, secret) for k, v in data.items()}
    if isinstance(data, list):
        return [with_secret(v, secret) for v in data]
    return data


CASES = cases()


@pytest.fixture(autouse=True)
def developer_platforms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDENSE_DEVELOPER_PLATFORMS", "1")  # the memory platform's fields too


def test_every_registered_platform_has_examples() -> None:
    for name in platforms.REGISTRY:
        p = platforms.get(name)
        assert p is not None
        for kind, model in (("source", p.source_spec), ("target", p.target_spec)):
            if model is not None:
                assert (name, kind) in EXAMPLES, f"add examples of a {name} {kind} to this test"


def test_the_examples_are_valid_and_cover_every_field() -> None:
    for (_, kind), examples in EXAMPLES.items():
        for ex in examples:
            job = {**JOB, "source": OTHER_END["source"], "target": OTHER_END["target"], kind: ex}
            parse_spec(job)
    fields = {c[0].split(":", 1)[1] for c in CASES}
    for expected in (
        "source.region",
        "target.endpoint_url",
        "source.libvirt.uri",
        "target.path",
        "target.instance.security_group_ids.0",
        "schedule.interval",
        "source.disks.0",
        "source.hardware.nics.0.network",
        "source.directory",
        "source.platform",
        "name",
    ):
        assert expected in fields, expected


def no_secret_in(msg: str, what: str) -> None:
    for marker in SECRETS:
        assert marker not in msg, f"{what}: the message echoes the value: {msg}"


@pytest.mark.parametrize("secret", list(SECRETS.values()), ids=list(SECRETS))
def test_no_model_error_echoes_a_planted_secret(secret: str) -> None:
    """Every field, through parse_spec (its one line), JobSpec and ReplicationInput (what a worker
    decodes: str(ValidationError), which Temporal would put into history as a failure message)."""
    refused = 0
    for where, job in CASES:
        data = with_secret(job, secret)
        try:
            parse_spec(data, "job.yaml")
        except InvalidSpec as e:
            refused += 1
            assert "\n" not in str(e), (where, str(e))
            no_secret_in(str(e), where)
        for model, value in ((JobSpec, data), (ReplicationInput, {"spec": data})):
            try:
                model.model_validate(value)
            except ValidationError as e:
                no_secret_in(str(e), f"{where} ({model.__name__})")
    assert refused > len(CASES) // 2  # most fields refuse such values: the test sees real refusals


# ---------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SENDENSE_TEMPORAL", "127.0.0.1:1")  # never reached: the spec is refused first
    return tmp_path


@pytest.mark.parametrize("secret", list(SECRETS.values()), ids=list(SECRETS))
def test_job_create_never_echoes_a_planted_secret(cli_env: Path, secret: str) -> None:
    """Every field, through `sendense job create -f` (the CLI in this process; the binary below)."""
    from app.cli.main import app

    runner = CliRunner()
    spec = cli_env / "job.yaml"
    for where, job in CASES:
        spec.write_text(yaml.safe_dump(with_secret(job, secret)))
        r = runner.invoke(app, ["job", "create", "-f", str(spec)])
        assert r.exit_code != 0, where
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (where, r.stderr, r.exception)
        no_secret_in(r.stderr + r.stdout, where)


def test_the_cli_binary_does_not_echo_a_secret_in_a_region(tmp_path: Path) -> None:
    """The installed binary, for one field of each kind (a pattern, a URL, a duration)."""
    sendense = str(Path(sys.executable).with_name("sendense"))
    env = dict(os.environ, SENDENSE_HOME=str(tmp_path), SENDENSE_TEMPORAL="127.0.0.1:1")
    base = {**JOB, "source": EXAMPLES[("aws", "source")][0], "target": OTHER_END["target"]}
    for path, expected in [
        (("source", "region"), "job.yaml: source.region: not an AWS region name"),
        (("source", "endpoint_url"), "job.yaml: source.endpoint_url: "),
        (("schedule", "interval"), "job.yaml: schedule.interval: not a duration"),
    ]:
        spec = tmp_path / "job.yaml"
        spec.write_text(yaml.safe_dump(planted(base, path, SECRETS["EXAMPLEKEY"])))
        p = subprocess.run(
            [sendense, "job", "create", "-f", str(spec)], capture_output=True, text=True, env=env, timeout=60
        )
        assert p.returncode != 0 and "EXAMPLEKEY" not in p.stderr + p.stdout, p.stderr
        assert p.stderr.startswith(f"error: {spec.parent}/{expected}"), p.stderr
