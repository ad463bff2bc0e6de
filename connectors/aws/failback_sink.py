"""Failback on an AWS source (sendense.protocols.FailbackSink): the job's original EC2 instance, stopped,
gets the failed-over VM's content back.

The EBS direct APIs cannot write a volume, only snapshots. So per disk:

- the *head*: at first a snapshot of the source volume taken now (the instance stopped: nothing
  writes it any more), then each reverse sync's written snapshot;
- a reverse sync (`open_disk`) writes a new snapshot on the head: `StartSnapshot(ParentSnapshotId=
  head)` + `PutSnapshotBlock` of whole 512 KiB blocks (the AWS target's own writer, pending.py: its
  TargetDisk reads the head for compare mode, `has_base`), `CompleteSnapshot` when the copy returns;
  it becomes the head, and the head before it (a written one) goes. A copy that fails leaves the
  snapshot pending with its local record: the next `open_disk` goes on writing it;
- `diverged(key, since)`: `ListChangedBlocks(since, head)`: since the job's change id (the failover
  point's snapshot of the volume) what the source wrote (the head's first snapshot holds it) and what
  the reverse syncs wrote (they descend from it: one lineage);
- `cut_over()` (cutover.py): a volume made from each head replaces the source volume at its device
  (the instance stopped: EC2 detaches a root volume only then); the old volume stays, tagged, for
  `undo_cut_over()`; `cleanup()` removes what failback made and what the cutover kept.

The job's change tracking afterwards: the new volume continues the old one's lineage, and carries
`sendense:replaces=<old volume>`, so the job's failover-point base still diffs against its next
snapshot (source.py accepts it); `rebase` is simply the job's own snapshot of the instance now.
State: `<work dir>/aws-failback/state.json` (per disk: volume, device, size, heads, pending) and the
pending snapshots' block records beside it; every snapshot and volume made is tagged with the job and
the role `failback`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from connectors.aws.blocks import list_changed
from connectors.aws.client import aws_call
from connectors.aws.pending import AwsTargetDisk, PendingSnapshot, complete_snapshot
from connectors.aws.power import AwsSourcePower
from connectors.aws.records import TargetRecords
from connectors.aws.source import GIB, AwsSourceConnector, delete_snapshot, wait_completed
from connectors.aws.spec import AwsSource
from connectors.aws.tags import ROLE_FAILBACK, TAG_DISK, TAG_JOB, TAG_ROLE, as_list, tags_of
from connectors.aws.target import PENDING_TIMEOUT_MIN
from sendense.datapath.extents import Extent, coalesce
from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError, TargetError
from sendense.models import DiskInfo, SnapshotRef

log = logging.getLogger(__name__)

BLOCK_SHIFT = 19  # 512 KiB
SNAPSHOT_WAIT = 12 * 3600.0


class FailbackState:
    """The sink's local record (JSON, replaced atomically)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "state.json"

    def load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        data.setdefault("disks", {})
        data.setdefault("cutover", {})
        data.setdefault("snapshots", [])
        data.setdefault("volumes", [])
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


class AwsFailbackSink:
    platform = "aws"
    snapshot_wait = SNAPSHOT_WAIT

    def __init__(self, job: str, spec: AwsSource, work_dir: Path) -> None:
        self.job, self.spec, self.work_dir = job, spec, Path(work_dir)
        self.source = AwsSourceConnector(job, spec, self.work_dir)
        self.aws = self.source.aws
        self.state = FailbackState(self.work_dir / "aws-failback")
        self.records = TargetRecords(self.state.root)
        self.power = AwsSourcePower(job, spec)

    @property
    def ec2(self) -> Any:
        return self.source.ec2

    def tags(self, key: str, **more: str) -> dict[str, str]:
        return {TAG_JOB: self.job, TAG_ROLE: ROLE_FAILBACK, TAG_DISK: key, **more}

    # ------------------------------------------------------------------ the instance

    def volumes(self) -> dict[str, tuple[str, str]]:
        """key -> (device, volume id) of the instance as it is now."""
        return {k: (dev, vol) for k, dev, vol in self.source._volumes(self.source._instance())}

    def check_off(self) -> None:
        state = self.power.power_state()
        if state == "unreachable":
            raise ResourceUnavailable(
                f"source instance {self.spec.instance_id} of job {self.job} does not answer"
            )
        if state != "stopped":
            raise TargetError(
                f"source instance {self.spec.instance_id} of job {self.job} is {state}: power it off before "
                "a failback writes its disks"
            )

    def _head(self, key: str) -> str:
        """The disk's head snapshot: the last one written, or at first a snapshot of the volume now."""
        data = self.state.load()
        d = data["disks"].get(key)
        if d and d["heads"]:
            return str(d["heads"][-1])
        self.check_off()  # the first head is the volume as it stays: nothing may write it after
        vols = self.volumes()
        if key not in vols:
            raise ResourceNotFound(f"source disk {key}: not a disk of instance {self.spec.instance_id}")
        device, vol = vols[key]
        size = self.source._sizes([vol])[vol]
        with aws_call(self.aws, f"ec2 CreateSnapshot {vol}"):
            sid = self.ec2.create_snapshot(
                VolumeId=vol,
                Description=f"sendense job {self.job} failback: disk {key} before the reverse syncs",
                TagSpecifications=[{"ResourceType": "snapshot", "Tags": as_list(self.tags(key))}],
            )["SnapshotId"]
        data["snapshots"].append(sid)
        data["disks"][key] = {"volume": vol, "device": device, "size": size, "heads": [sid], "pending": None}
        self.state.save(data)
        wait_completed(self.aws, self.ec2, [sid], f"failback snapshot of disk {key}", self.snapshot_wait)
        return str(sid)

    # ------------------------------------------------------------------ protocol

    def disks(self) -> list[DiskInfo]:
        return self.source.discover().disks

    @contextmanager
    def open_disk(self, key: str) -> Iterator[AwsTargetDisk]:
        self.check_off()
        head = self._head(key)
        data = self.state.load()
        d = data["disks"][key]
        sid = d["pending"]
        if not sid or not self.records.started_here(sid) or self._state_of(sid) != "pending":
            sid = self._start(key, head, int(d["size"]))
        ebs = self.aws.client("ebs")
        pending = PendingSnapshot(self.aws, ebs, sid, head, self.records.blocks(sid))
        try:
            yield AwsTargetDisk(pending, int(d["size"]))
            pending.sync()
        finally:
            pending.close()
        complete_snapshot(self.aws, ebs, sid, self.records.blocks(sid), f"source disk {key} (failback)")
        wait_completed(self.aws, self.ec2, [sid], f"failback snapshot of disk {key}", self.snapshot_wait)
        data = self.state.load()
        d = data["disks"][key]
        superseded = d["heads"][1:]  # the first head (the volume before) stays until cleanup
        d["heads"], d["pending"] = [d["heads"][0], sid], None
        self.state.save(data)
        self.records.drop(sid)
        for old in superseded:
            if old != sid:
                self._delete_snapshot(old)

    def _start(self, key: str, head: str, size: int) -> str:
        kw: dict[str, Any] = {
            "VolumeSize": max(1, -(-size // GIB)),
            "ParentSnapshotId": head,
            "Tags": as_list(self.tags(key)),
            "Description": f"sendense job {self.job} failback: disk {key}",
            "ClientToken": uuid.uuid4().hex,
            "Timeout": PENDING_TIMEOUT_MIN,
        }
        intent = self.records.starting(kw)
        with aws_call(self.aws, f"ebs StartSnapshot for failback of disk {key}"):
            sid = str(self.aws.client("ebs").start_snapshot(**kw)["SnapshotId"])
        self.records.started(sid, intent)
        data = self.state.load()
        data["snapshots"].append(sid)
        data["disks"][key]["pending"] = sid
        self.state.save(data)
        return sid

    def _state_of(self, snapshot_id: str) -> str:
        try:
            with aws_call(self.aws, f"ec2 DescribeSnapshots {snapshot_id}"):
                found = self.ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        except ResourceNotFound:
            return "gone"
        return str(found[0]["State"]) if found else "gone"

    def diverged(self, key: str, since: str) -> Iterator[Extent]:
        head = self._head(key)
        ebs = self.aws.client("ebs")
        yield from coalesce(
            Extent(i << BLOCK_SHIFT, 1 << BLOCK_SHIFT) for i, _ in list_changed(self.aws, ebs, since, head)
        )

    def rebase(self, snapshot_id: str) -> SnapshotRef:
        """The job's own snapshot of the instance now (as its next sync would take): the base of a
        forward sync whose target point reads what the volumes hold now."""
        ref = self.source.create_snapshot(snapshot_id, {})
        log.info("job %s: failback rebased the source's change tracking at %s", self.job, snapshot_id)
        return ref

    def drop_base(self, ref: SnapshotRef) -> None:
        self.source.release_snapshot(ref, committed=False)

    def cut_over(self) -> None:
        from connectors.aws.cutover import cut_over

        cut_over(self)

    def undo_cut_over(self) -> None:
        from connectors.aws.cutover import undo_cut_over

        undo_cut_over(self)

    def cleanup(self) -> None:
        """What failback made and kept goes: its snapshots (the job's own never), volumes that no
        instance uses (an undone cutover's new ones; after a cutover, the old ones it kept); then the
        state. A volume attached is never deleted. Idempotent."""
        from connectors.aws.cutover import unused_volumes

        data = self.state.load()
        stays: list[str] = []
        for vol in unused_volumes(self, data):
            try:
                with aws_call(self.aws, f"ec2 DeleteVolume {vol}"):
                    self.ec2.delete_volume(VolumeId=vol)
            except ResourceNotFound:
                pass
            except SendenseError as e:
                stays.append(f"volume {vol} ({e.message})")
        for sid in sorted(set(data["snapshots"]) | {s["SnapshotId"] for s in self.tagged_snapshots()}):
            why = self._delete_snapshot(sid)
            if why is not None:
                stays.append(f"snapshot {sid} ({why})")
        if stays:
            raise TargetError(f"failback of job {self.job}: what it made stays: {'; '.join(stays)}")
        shutil.rmtree(self.state.root, ignore_errors=True)

    def tagged_snapshots(self) -> list[dict[str, Any]]:
        f = [
            {"Name": f"tag:{TAG_JOB}", "Values": [self.job]},
            {"Name": f"tag:{TAG_ROLE}", "Values": [ROLE_FAILBACK]},
        ]
        with aws_call(self.aws, f"ec2 DescribeSnapshots of job {self.job}'s failback"):
            found = self.ec2.describe_snapshots(OwnerIds=["self"], Filters=f)["Snapshots"]
        return [s for s in found if tags_of(s).get(TAG_ROLE) == ROLE_FAILBACK]

    def _delete_snapshot(self, sid: str) -> str | None:
        why = delete_snapshot(self.aws, self.ec2, sid)
        if why is None:
            self.records.deleted(sid)
            data = self.state.load()
            if sid in data["snapshots"]:
                data["snapshots"].remove(sid)
                self.state.save(data)
        return why
