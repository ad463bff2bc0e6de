"""The AWS connector's contract tests run against the AWS lab always, and against real AWS when the
environment names a test instance:

    SENDENSE_AWS_TEST_INSTANCE=i-0123...  SENDENSE_AWS_TEST_REGION=eu-west-1  (+ AWS credentials in
    the standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)

Against real AWS the tests that must write into a volume as its guest would are skipped (the lab
writes through its control API; a real instance would need a login); everything else runs, and
creates and deletes its own snapshots (tagged sendense:job=<the test's job>).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_aws import Backend, lab_in_env
from helpers_kvm import MiB, make_qcow2, qemu_io

from labs.aws import AwsLab


@pytest.fixture(scope="session")
def aws_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsLab]:
    with lab_in_env(tmp_path_factory.mktemp("awslab"), snapshot_delay=0.2) as lab:
        yield lab


REAL = os.environ.get("SENDENSE_AWS_TEST_INSTANCE")  # real AWS too (test_real_aws.py says it is off)


@pytest.fixture(params=["lab", "real"] if REAL else ["lab"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "real":
        assert REAL is not None
        return Backend("real", os.environ.get("SENDENSE_AWS_TEST_REGION", "us-east-1"), None, REAL)
    lab: AwsLab = request.getfixturevalue("aws_lab")
    inst = lab.make_instance(f"t-{uuid.uuid4().hex[:6]}", [1, 1])
    return Backend("lab", lab.region, lab.endpoint_url, inst.instance_id, list(inst.volumes), lab)


@pytest.fixture(autouse=True)
def sendense_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Connectors keep local records (the source's snapshot ledger, the target's block records) under
    SENDENSE_HOME: a test's own."""
    home = tmp_path / "home"
    monkeypatch.setenv("SENDENSE_HOME", str(home))
    return home


@pytest.fixture
def job() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def vm(tmp_path: Path) -> list[Path]:
    """Two qcow2 disks of a stopped VM: data, a written-zero range and holes; the second disk's size
    is no multiple of a 512 KiB block."""
    disks = [make_qcow2(tmp_path / "d0.qcow2", 24 * MiB), make_qcow2(tmp_path / "d1.qcow2", 5 * MiB + 4096)]
    qemu_io(disks[0], "write -P 0x11 0 3M", "write -P 0x22 10M 1M", "write -z 12M 1M")
    qemu_io(disks[1], "write -P 0x33 4096 8192")
    return disks


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "aws-state"
