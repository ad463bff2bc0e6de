"""A CloudStack target over the CloudStack lab for the connector tests: a lab in this process, the
agent's keys in the environment, job specs with a stopped KVM VM as the source, and what a VM from a
point could leave behind (VMs, volumes, files at the top of the pool) as the API and the pool's
directory show it."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers_kvm import sync_point

from connectors.cloudstack.client import CloudStackClient
from connectors.kvm.source import make_kvm_source
from connectors.kvm.spec import KvmSource
from labs.cloudstack.server import LabServer
from sendense.models import JobSpec
from sendense.platforms import target_for
from sendense.protocols import TargetConnector

HOST = "cs-lab-host-1"


def use_lab(lab: LabServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDENSE_CLOUDSTACK_API_KEY", lab.info["api_key"])
    monkeypatch.setenv("SENDENSE_CLOUDSTACK_SECRET_KEY", lab.info["secret_key"])


def target(lab: LabServer, **kw: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "platform": "cloudstack",
        "url": lab.url,
        "zone": lab.info["zone"],
        "storage": "lab-primary-1",
        "template": "sendense-guest",
        "drill_network": "lab-isolated",
        "networks": [{"source": "*", "target": "lab-shared"}],
        "host": HOST,
    }
    t.update(kw)
    return {k: v for k, v in t.items() if v is not None}


def job_spec(lab: LabServer, disk: Path | list[Path], **kw: Any) -> JobSpec:
    disks = disk if isinstance(disk, list) else [disk]
    return JobSpec.model_validate(
        {
            "name": f"cst{uuid.uuid4().hex[:6]}",
            "job_id": uuid.uuid4().hex[:12],
            "source": {"platform": "kvm", "disks": [str(d) for d in disks]},
            "target": target(lab, **kw),
        }
    )


def guest_disk(path: Path, size: str = "16M", writes: tuple[tuple[int, int, int], ...] = ()) -> Path:
    """A stopped VM's qcow2 with `writes` (byte, offset, length) of known bytes."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    for byte, offset, length in writes:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} {offset} {length}", str(path)],
            check=True,
            capture_output=True,
        )
    return path


def point(spec: JobSpec, work: Path, point_id: str = "p1") -> TargetConnector:
    """Point `point_id` of the spec's stopped KVM VM on its target, as a sync writes it."""
    tgt = target_for(spec)
    assert isinstance(spec.source, KvmSource)
    sync_point(make_kvm_source(spec.name, spec.source, work), tgt, point_id)
    return tgt


def api(lab: LabServer) -> CloudStackClient:
    return CloudStackClient(lab.url, lab.info["api_key"], lab.info["secret_key"], poll_interval=0.05)


def leftovers(lab: LabServer) -> list[str]:
    """VMs, volumes and files at the top of the pool (where flat copies go) the lab holds: the API's
    lists (and listVolumesForImport: files that are no volume's), and the pool's directory."""
    c = api(lab)
    pool = lab.cloud.state.pool
    vms = [f"vm {v['name']} {v['state']}" for v in c.list("listVirtualMachines", "virtualmachine")]
    vols = [f"volume {v['name']} {v['state']}" for v in c.list("listVolumes", "volume")]
    loose = [
        f"unmanaged {v['path']}" for v in c.list("listVolumesForImport", "volumeforimport", storageid=pool.id)
    ]
    files = sorted(f"file {f.name}" for f in pool.path.iterdir() if f.name != "sendense")
    return sorted(vms + vols + loose + files)
