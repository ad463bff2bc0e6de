"""The contract suite: every platform's connectors held to sendense.protocols, the same tests for all.

- test_source_contract.py: a platform as a source (memory; kvm: a running QEMU over QMP, and a stopped
  VM's qcow2 images; aws: the lab; vsphere: the lab; cloudstack: a VM of the lab, read as the agent of
  the lab host that runs it: root, slow tier), into a memory target;
- test_target_contract.py: a platform as a target (memory, memory with whole-block writes, kvm, aws: the
  lab), from a memory VM.
- The VM contract comes next, in test_vm_contract.py: a `vms_rig` fixture over the platforms whose
  plug-in has `vms` (sendense.platforms.vms_for), on a point the target contract's rig commits:
  create a VM -> boot check -> destroy_vm, after which `list_vms()` is empty and the rig's `leftovers`
  are what they were before the VM.

Rigs (rigs.py, sides.py) say what a platform cannot do; tests skip that combination with the reason.
The AWS lab is started once per session (a few seconds), each KVM VM per test (a fraction of a second).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from contract.rigs import Rig
from contract.sides import (
    AwsReplicas,
    AwsVm,
    CloudStackRealReplicas,
    CloudStackReplicas,
    CloudStackVm,
    KvmReplicas,
    KvmStoppedVm,
    KvmVm,
    MemoryReplicas,
    MemoryVm,
    VsphereReplicas,
    VsphereVm,
    cloudstack_lab,
)
from helpers_aws import lab_in_env
from helpers_vsphere import vsphere_agent_env

from connectors.memory.store import Store
from labs.aws import AwsLab
from labs.vsphere import VsphereLab

# The real-endpoint tier: with a real AWS test instance configured (as for tests/connectors/aws:
# SENDENSE_AWS_TEST_INSTANCE, SENDENSE_AWS_TEST_REGION and credentials), the target contract runs
# against that region too (it makes and deletes its own snapshots; the source contract must write into
# volumes as a guest would, which only the lab can).
REAL_AWS_REGION = (
    os.environ.get("SENDENSE_AWS_TEST_REGION", "us-east-1")
    if os.environ.get("SENDENSE_AWS_TEST_INSTANCE")
    else None
)
# A real CloudStack target (its API, a file pool this machine mounts as one of its KVM hosts, keys):
# the target contract runs there too (CloudStackRealReplicas), writing only its own jobs' files.
REAL_CLOUDSTACK = {k: v for k, v in os.environ.items() if k.startswith("SENDENSE_CLOUDSTACK_TEST_")}
HAS_REAL_CLOUDSTACK = all(
    f"SENDENSE_CLOUDSTACK_TEST_{k}" in os.environ for k in ("URL", "ZONE", "STORAGE", "HOST")
)
# The CloudStack lab's hosts are private libvirtds (root) and its VMs boot under TCG (slow tier).
CLOUDSTACK = pytest.param("cloudstack", marks=[pytest.mark.root, pytest.mark.slow], id="cloudstack")
SOURCES: list[Any] = ["memory", "kvm-qmp", "kvm-stopped", "aws", "vsphere", CLOUDSTACK]
# What a platform's disks can do, for the tests of it (selected by parametrization, never skipped):
# EBS volumes never shrink (the resize test shrinks a disk and grows it back), and no EBS direct API
# or volume operation discards blocks (a guest's TRIM is the instance's business, not the snapshot's).
# vSphere disks never shrink either, and the lab's guest does not discard (a thin VMDK's UNMAP is the
# guest's and ESXi's business; CBT lists nothing for it).
# CloudStack resizes volumes in whole GiB (resizeVolume; its source's own tests grow one), and the lab's
# volumes are attached without discard=unmap, as CloudStack's KVM agent does unless the offering says
# so: a guest's discard is a no-op there.
RESIZABLE_SOURCES = [s for s in SOURCES if s not in ("aws", "vsphere", CLOUDSTACK)]
DISCARDING_SOURCES = [s for s in SOURCES if s not in ("aws", "vsphere", CLOUDSTACK)]
TARGETS = [
    "memory",
    "memory-blocks",
    "kvm",
    "aws",
    "vsphere",
    "cloudstack",
    *(["aws-real"] if REAL_AWS_REGION else []),
    *(["cloudstack-real"] if HAS_REAL_CLOUDSTACK else []),
]


@pytest.fixture(scope="session")
def contract_cloudstack_target_lab() -> Iterator[Any]:
    """The CloudStack lab without libvirtds, for the target's points (nothing boots)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="cslab-contract-", dir="/tmp"))
    yield from cloudstack_lab(root, "contract", libvirt=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def contract_aws_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsLab]:
    with lab_in_env(tmp_path_factory.mktemp("contract-awslab"), snapshot_delay=0.0) as lab:
        yield lab


@pytest.fixture(scope="session")
def contract_vsphere_lab() -> Iterator[VsphereLab]:
    """The vSphere lab, and the agent's environment for it: the lab's login, its VDDK stand-in."""
    with VsphereLab(vms=1) as lab, vsphere_agent_env(lab):
        yield lab


@pytest.fixture(scope="session")
def contract_cloudstack_lab(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The CloudStack lab in this process (its two hosts' libvirtds run as root)."""
    from helpers_cloudstack import cloudstack_lab, lab_cache

    with cloudstack_lab(lab_cache(request), stop_timeout=1) as lab:
        yield lab


@pytest.fixture(autouse=True)
def sendense_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Connectors keep local records under SENDENSE_HOME: the test's own."""
    home = tmp_path / "home"
    monkeypatch.setenv("SENDENSE_HOME", str(home))
    return home


@pytest.fixture
def store() -> Iterator[Store]:
    """A memory store of the test's own, gone after it."""
    s = Store.named(f"contract-{uuid.uuid4().hex[:8]}")
    try:
        yield s
    finally:
        Store.discard(s)


@pytest.fixture(params=SOURCES)
def source_rig(request: pytest.FixtureRequest, tmp_path: Path, store: Store) -> Iterator[Rig]:
    """The platform under test as the source, into a memory target."""
    p = request.param
    vm = (
        MemoryVm(store)
        if p == "memory"
        else KvmVm(tmp_path / "work")
        if p == "kvm-qmp"
        else KvmStoppedVm(tmp_path)
        if p == "kvm-stopped"
        else VsphereVm(request.getfixturevalue("contract_vsphere_lab"))
        if p == "vsphere"
        else CloudStackVm(
            request.getfixturevalue("contract_cloudstack_lab"), request.getfixturevalue("monkeypatch")
        )
        if p == "cloudstack"
        else AwsVm(request.getfixturevalue("contract_aws_lab"))
    )
    rig = Rig(tmp_path, vm, MemoryReplicas(store))
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture(params=TARGETS)
def target_rig(request: pytest.FixtureRequest, tmp_path: Path, store: Store) -> Iterator[Rig]:
    """The platform under test as the target, from a memory VM."""
    p = request.param
    replicas = (
        MemoryReplicas(store)
        if p == "memory"
        else MemoryReplicas(store, block=64 << 10)
        if p == "memory-blocks"
        else KvmReplicas(tmp_path / "replicas")
        if p == "kvm"
        else AwsReplicas(None, REAL_AWS_REGION)
        if p == "aws-real"
        else CloudStackRealReplicas(REAL_CLOUDSTACK)
        if p == "cloudstack-real"
        else VsphereReplicas(request.getfixturevalue("contract_vsphere_lab"))
        if p == "vsphere"
        else CloudStackReplicas(request.getfixturevalue("contract_cloudstack_target_lab"), "contract")
        if p == "cloudstack"
        else AwsReplicas(request.getfixturevalue("contract_aws_lab"))
    )
    rig = Rig(tmp_path, MemoryVm(store), replicas)
    try:
        yield rig
    finally:
        rig.close()
