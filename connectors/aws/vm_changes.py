"""Failback on an AWS target (sendense.protocols.VmChanges): what a failed-over EC2 instance changed
since the point it was made from, read back through the EBS direct APIs.

The instance (`vms.AwsVmProvisioner.create_vm`) runs on volumes EC2 made from the point's snapshots,
one per disk (each volume's `SnapshotId` names the point's snapshot, which says the disk's key in the
point). A reverse snapshot is the AWS source's own (`source.AwsSourceConnector`, reused as it is):
`CreateSnapshots` of the instance, crash-consistent, running or stopped, a retried call finding its
snapshots by their tags; their role is `failback-vm` and they carry the VM's name and the job's
identity, so the job's own source snapshots (an AWS -> AWS job) are never touched, and destroying the VM
removes them too. What changed:

- since the point: `ListChangedBlocks(point's snapshot, reverse snapshot)`. A volume made from a
  snapshot continues its lineage (EBS user guide; the lab does the same), so EBS lists exactly the
  blocks the instance wrote. Where EBS refuses the pair, a checksum compare of both block lists
  (changed_blocks.py) lists the blocks that differ;
- since an earlier reverse snapshot (`base`, the previous committed one): `ListChangedBlocks` between
  the two, as the AWS source does. A base that is gone or of another volume falls back to the point.

Blocks are read with the source's snapshot reader. The snapshots this side made are in a local ledger
(`~/.sendense/aws-failback/<job>/vm-<name>/`): a committed reverse snapshot supersedes the earlier
ones (they go), an uncommitted one goes, `forget` removes them all.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from connectors.aws.blocks import BLOCK
from connectors.aws.changed_blocks import changed_between
from connectors.aws.client import Aws, aws_call
from connectors.aws.handles import AwsDisk, AwsVmDisk, AwsVmSnapshot
from connectors.aws.source import AwsSourceConnector, AwsSourceDisk, delete_snapshot, disk_key
from connectors.aws.spec import AwsSource, AwsTarget
from connectors.aws.tags import ROLE_FAILBACK_VM, TAG_JOB, TAG_JOB_ID, TAG_POINT, TAG_ROLE, TAG_VM, tags_of
from connectors.aws.vms import AwsVmProvisioner, failback_state
from sendense.datapath.extents import Extent, coalesce
from sendense.errors import ResourceNotFound, SendenseError
from sendense.models import DiskSnapshot, SnapshotRef
from sendense.protocols import POINT_BASE, point_base

log = logging.getLogger(__name__)

NO_INSTANCE = "i-00000000"  # where a verb needs no instance (release, forget): never called upon


class _VmSnapshots(AwsSourceConnector):
    """The AWS source on a failed-over instance, its snapshots tagged as the VM's reverse snapshots."""

    role = ROLE_FAILBACK_VM

    def __init__(self, job: str, job_id: str, vm: str, spec: AwsSource, work_dir: Path) -> None:
        super().__init__(job, spec, work_dir)
        self.job_id, self.vm = job_id, vm

    def _tags(self) -> dict[str, str]:
        return {**super()._tags(), TAG_VM: self.vm} | ({TAG_JOB_ID: self.job_id} if self.job_id else {})


class VmDisk(AwsSourceDisk):
    """A reverse snapshot's disk (SourceDisk): `extents(point_base)` is what changed since the point."""

    def __init__(self, aws: Aws, disk: DiskSnapshot, point: str, point_snapshot: str) -> None:
        super().__init__(aws, disk)
        self.point, self.point_snapshot = point, point_snapshot

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        if since != self.point:
            yield from super().extents(since, start)
            return
        yield from changed_between(self.aws, self.ebs, self.point_snapshot, self.snapshot_id, start // BLOCK)


class AwsVmChanges:
    platform = "aws"

    def __init__(self, job: str, spec: AwsTarget, job_id: str = "", state_dir: Path | None = None) -> None:
        self.job, self.spec, self.job_id = job, spec, job_id
        self.vms = AwsVmProvisioner(job, spec, job_id, state_dir)
        self.aws = self.vms.aws

    def _state(self, name: str) -> Path:
        return failback_state(self.job, name)

    def _source(self, name: str, instance_id: str) -> _VmSnapshots:
        spec = AwsSource(platform="aws", region=self.spec.region, endpoint_url=self.spec.endpoint_url,
                         instance_id=instance_id)  # fmt: skip
        return _VmSnapshots(self.job, self.job_id, name, spec, self._state(name))

    def _vm(self, name: str) -> tuple[dict[str, Any], str, dict[str, tuple[str, str]]]:
        """The VM's instance, its point and, per device key, (point's disk key, point's snapshot)."""
        inst = self.vms._instance(name)
        point = self.vms.target.get_point(tags_of(inst).get(TAG_POINT) or None)
        by_snapshot = {d.path: d.key for d in point.disks}
        mapped = inst.get("BlockDeviceMappings", [])
        vols = {m["Ebs"]["VolumeId"]: m["DeviceName"] for m in mapped if "Ebs" in m}
        with aws_call(self.aws, f"vm {name}: ec2 DescribeVolumes"):
            found = self.vms.ec2.describe_volumes(VolumeIds=list(vols))["Volumes"] if vols else []
        disks: dict[str, tuple[str, str]] = {}
        for v in found:
            key = by_snapshot.get(v.get("SnapshotId", ""))
            if key is None:
                raise ResourceNotFound(
                    f"vm {name}: volume {v['VolumeId']} at {vols[v['VolumeId']]} was not made from a "
                    f"snapshot of point {point.point_id}: its changes cannot be told"
                )
            disks[disk_key(vols[v["VolumeId"]])] = (key, v["SnapshotId"])
        return inst, point.point_id, disks

    # ------------------------------------------------------------------ protocol

    def snapshot_vm(self, name: str, snapshot_id: str, base: dict[str, str] | None = None) -> SnapshotRef:
        inst, point_id, disks = self._vm(name)
        src = self._source(name, inst["InstanceId"])
        bases: dict[str, str | None] = {
            dev: since
            for dev, (key, _) in disks.items()
            if (since := (base or {}).get(key)) and not since.startswith(POINT_BASE)
        }
        inner = src.create_snapshot(snapshot_id, bases)
        out = []
        for d in inner.disks:
            key, point_snapshot = disks[d.key]
            usable = d.base_change_id is not None and not d.tracking_lost
            if d.tracking_lost:
                log.warning("VM %s disk %s: %s; copying what changed since point %s", name, key,
                            d.tracking_lost, point_id)  # fmt: skip
            h = AwsDisk.parse(d.handle)
            handle = AwsVmDisk(volume_id=h.volume_id, device=h.device, point_snapshot=point_snapshot)
            out.append(DiskSnapshot(key=key, size=d.size, change_id=d.change_id,
                                    base_change_id=d.base_change_id if usable else point_base(point_id),
                                    handle=handle.dump()))  # fmt: skip
        log.info("job %s: reverse snapshot %s of VM %s (%s)", self.job, snapshot_id, name, inst["InstanceId"])
        sh = AwsVmSnapshot(vm=name, instance_id=inst["InstanceId"], point_id=point_id)
        return SnapshotRef(snapshot_id=snapshot_id, created_at=inner.created_at, disks=out, handle=sh.dump())

    @contextmanager
    def _open(self, ref: SnapshotRef, key: str) -> Iterator[VmDisk]:
        h = AwsVmSnapshot.parse(ref.handle)
        d = ref.disk(key)
        yield VmDisk(self.aws, d, point_base(h.point_id), AwsVmDisk.parse(d.handle).point_snapshot)

    def open_disk(self, ref: SnapshotRef, key: str) -> AbstractContextManager[VmDisk]:
        return self._open(ref, key)

    def changed_since_point(self, ref: SnapshotRef, key: str) -> Iterator[Extent]:
        point = point_base(AwsVmSnapshot.parse(ref.handle).point_id)
        with self._open(ref, key) as disk:
            yield from coalesce(disk.extents(point))

    def release(self, ref: SnapshotRef, committed: bool) -> None:
        """Committed: the VM's earlier reverse snapshots go (this one is the next base); not: this one
        goes. The source's release, on this VM's ledger (no instance needed: a VM gone is no error)."""
        h = AwsVmSnapshot.parse(ref.handle)
        inner = ref.model_copy(
            update={
                "disks": [
                    d.model_copy(update={"base_change_id": None})
                    if (d.base_change_id or "").startswith(POINT_BASE)
                    else d
                    for d in ref.disks
                ]
            }
        )
        self._source(h.vm, h.instance_id or NO_INSTANCE).release_snapshot(inner, committed)

    def forget(self, name: str) -> None:
        """Every reverse snapshot of VM `name`: the ledger's, and those tagged with the VM's name and
        this job's identity (a ledger lost with its machine); then the ledger."""
        src = self._source(name, NO_INSTANCE)  # (the ledger and tags say what: no instance needed)
        stays = src._delete(src.recorded())
        for s in self.tagged(name):
            why = delete_snapshot(self.aws, self.vms.ec2, s["SnapshotId"])
            if why is not None:
                stays[s["SnapshotId"]] = why
        if stays:
            what = "; ".join(f"{sid} ({why})" for sid, why in sorted(stays.items()))
            raise SendenseError(f"vm {name}: reverse snapshots of job {self.job} stay: {what}")
        shutil.rmtree(self._state(name), ignore_errors=True)

    def tagged(self, name: str) -> list[dict[str, Any]]:
        """The VM's reverse snapshots, by their tags (this job's identity, the VM's name)."""
        tags = {TAG_JOB: self.job, TAG_ROLE: ROLE_FAILBACK_VM, TAG_VM: name}
        f = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        with aws_call(self.aws, f"ec2 DescribeSnapshots of VM {name}"):
            found = self.vms.ec2.describe_snapshots(OwnerIds=["self"], Filters=f)["Snapshots"]
        return [s for s in found if tags_of(s).get(TAG_JOB_ID, "") == self.job_id]
