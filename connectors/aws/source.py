"""AWS EC2 as a replication source: an instance's EBS volumes, snapshotted together, diffed and read
through the EBS direct APIs.

- A sync takes crash-consistent snapshots of all the instance's volumes at one instant
  (`CreateSnapshots` for the instance), tagged with the job and the sync, and waits until they are
  completed. A retried snapshot step finds the sync's snapshots by their tags instead of taking more
  (an EBS snapshot is an instant whatever became of the attempt that took it; hours of a first
  snapshot are not lost), unless one of them failed or the volumes changed: then it takes new ones.
- A disk's change id is its snapshot id. The next sync lists the blocks that changed between the two
  snapshots (`ListChangedBlocks`); the first lists every block of its snapshot (`ListSnapshotBlocks`);
  blocks never written read as zero and are not sent.
- Blocks are read with `GetSnapshotBlock`, several in flight (one per copy connection), each checked
  against its SHA256 checksum.
- A previous snapshot that is gone, or of another volume (the volume was replaced), is change
  tracking lost: the disk is resynced by digest compare against the replica, never silently skipped.
- Whose: snapshots are tagged with the job and the source role (a target of a job in the same region
  tags its own role), and every snapshot this side creates goes into a local ledger in the job's work
  directory. Only what the ledger holds (or a base snapshot whose tags say it is this job's source
  side) is ever deleted: committing releases the superseded snapshots, an abandoned sync's go,
  `forget` removes the ledger's. Volume tags are not copied onto the snapshots (a volume made from a
  point's snapshot carries the target's tags).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from connectors.aws.blocks import BLOCK, BlockTokens, list_blocks, list_changed
from connectors.aws.client import Aws, aws_call, is_not_found
from connectors.aws.handles import AwsDisk
from connectors.aws.hardware import instance_hardware
from connectors.aws.spec import AwsSource
from connectors.aws.tags import ROLE_SOURCE, TAG_JOB, TAG_REPLACES, TAG_ROLE, TAG_SYNC, role_of, tags_of
from sendense import config
from sendense.datapath.extents import Extent
from sendense.errors import ResourceNotFound, SendenseError
from sendense.models import DiskInfo, DiskSnapshot, SnapshotRef, VmInfo

log = logging.getLogger(__name__)

GIB = 1 << 30
SNAPSHOT_WAIT = 12 * 3600.0  # a first snapshot of a large volume takes hours on AWS


def disk_key(device: str) -> str:
    """A disk's key is its device name without /dev/ (xvda, sdf): stable while it stays attached there."""
    return device.removeprefix("/dev/").replace("/", "-")


def wait_completed(
    aws: Aws, ec2: Any, snapshot_ids: list[str], what: str, timeout: float, retry_failed: bool = False
) -> None:
    """Poll DescribeSnapshots until every snapshot is completed (backing off to 5 s). A failed one is
    an error, retryable when a retry takes new snapshots (`retry_failed`)."""
    deadline, delay = time.monotonic() + timeout, 0.1
    pending = list(snapshot_ids)
    while pending:
        with aws_call(aws, f"ec2 DescribeSnapshots {what}"):
            snaps = ec2.describe_snapshots(SnapshotIds=pending)["Snapshots"]
        for s in snaps:
            if s["State"] == "error":
                raise SendenseError(
                    f"{what}: snapshot {s['SnapshotId']} failed: {s.get('StateMessage', '')}",
                    retryable=retry_failed,
                )
        pending = [s["SnapshotId"] for s in snaps if s["State"] != "completed"]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise SendenseError(f"{what}: snapshots {', '.join(pending)} not completed in {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


class AwsSourceDisk:
    """One volume's snapshot, opened for reading (SourceDisk)."""

    tracks_resize = True  # EBS volumes only grow: ListChangedBlocks misses no shrink (datapath.sync)

    def __init__(self, aws: Aws, disk: DiskSnapshot) -> None:
        self.aws, self.size, self.snapshot_id = aws, disk.size, disk.change_id
        self.ebs = aws.client("ebs")
        self.tokens = BlockTokens(aws, self.ebs, self.snapshot_id)

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        first = start // BLOCK
        if since is not None:
            for idx, token in list_changed(self.aws, self.ebs, since, self.snapshot_id, first):
                yield Extent(idx * BLOCK, BLOCK, zero=token is None)
            return
        pos, end = first, -(-self.size // BLOCK)
        for idx, _ in list_blocks(self.aws, self.ebs, self.snapshot_id, first):
            if idx > pos:
                yield Extent(pos * BLOCK, (idx - pos) * BLOCK, zero=True)
            yield Extent(idx * BLOCK, BLOCK)
            pos = idx + 1
        if pos < end:
            yield Extent(pos * BLOCK, (end - pos) * BLOCK, zero=True)

    def connect(self) -> SnapshotReader:
        return SnapshotReader(self)


class SnapshotReader:
    """A BlockReader over a snapshot (any range; blocks not in it read as zero)."""

    def __init__(self, disk: AwsSourceDisk) -> None:
        self.blocks = disk.tokens

    def read(self, offset: int, length: int) -> bytes:
        return self.blocks.read(offset, length)

    def wire(self) -> None:
        """Blocks come in as GetSnapshotBlock answers with their checksums: nothing to splice."""
        return None

    def close(self) -> None:
        pass


class AwsSourceConnector:
    """SourceConnector for an EC2 instance."""

    platform = "aws"
    role = ROLE_SOURCE  # the side its snapshots are tagged with (a failed-over VM's reverse source: its own)

    def __init__(self, job: str, spec: AwsSource, work_dir: Path | None = None) -> None:
        self.job, self.spec = job, spec
        self.aws = Aws(spec.region, spec.endpoint_url)
        self._ec2: Any = None
        self.snapshot_wait = SNAPSHOT_WAIT
        self.ledger = (work_dir or config.home() / "work" / job) / "aws-source-snapshots"

    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = self.aws.client("ec2")
        return self._ec2

    # ------------------------------------------------------------------ inventory

    def _instance(self) -> dict[str, Any]:
        iid = self.spec.instance_id
        try:
            with aws_call(self.aws, f"ec2 DescribeInstances {iid}"):
                res = self.ec2.describe_instances(InstanceIds=[iid])
        except ResourceNotFound:
            raise ResourceNotFound(f"source.instance_id: no instance {iid} in {self.aws.where()}") from None
        insts = [i for r in res.get("Reservations", []) for i in r.get("Instances", [])]
        if not insts or insts[0]["State"]["Name"] in ("terminated", "shutting-down"):
            raise ResourceNotFound(
                f"source.instance_id: no instance {iid} in {self.aws.where()} (terminated)"
            )
        return dict(insts[0])

    def _volumes(self, inst: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(key, device, volume id) of the instance's EBS volumes, the root device first."""
        root = inst.get("RootDeviceName")
        vols = [
            (disk_key(m["DeviceName"]), m["DeviceName"], m["Ebs"]["VolumeId"])
            for m in inst.get("BlockDeviceMappings", [])
            if "Ebs" in m
        ]
        if not vols:
            raise ResourceNotFound(f"source.instance_id: instance {self.spec.instance_id} has no EBS volume")
        return sorted(vols, key=lambda v: (v[1] != root, v[1]))

    def _sizes(self, volume_ids: list[str]) -> dict[str, int]:
        with aws_call(self.aws, f"ec2 DescribeVolumes of {self.spec.instance_id}"):
            vols = self.ec2.describe_volumes(VolumeIds=volume_ids)["Volumes"]
        return {v["VolumeId"]: int(v["Size"]) * GIB for v in vols}

    def validate(self) -> None:
        self._volumes(self._instance())

    def discover(self) -> VmInfo:
        inst = self._instance()
        vols = self._volumes(inst)
        sizes = self._sizes([v for _, _, v in vols])
        name = next((t["Value"] for t in inst.get("Tags", []) if t["Key"] == "Name"), self.spec.instance_id)
        disks = [DiskInfo(key=k, size=sizes[v], ref=v) for k, _, v in vols]
        return VmInfo(name=name, platform="aws", **instance_hardware(self.aws, self.ec2, inst, disks))

    # ------------------------------------------------------------------ snapshots

    def _tags(self) -> dict[str, str]:
        """The tags that say a snapshot is this side's (a sync's adds its id)."""
        return {TAG_JOB: self.job, TAG_ROLE: self.role}

    def _tagged(self, sync: str) -> list[dict[str, Any]]:
        """The sync's snapshots on this side, found by their tags (a retried snapshot step)."""
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in {**self._tags(), TAG_SYNC: sync}.items()]
        out: list[dict[str, Any]] = []
        with aws_call(self.aws, f"ec2 DescribeSnapshots of job {self.job}"):
            for page in self.ec2.get_paginator("describe_snapshots").paginate(
                OwnerIds=["self"], Filters=filters
            ):
                out += page["Snapshots"]
        return out

    def recorded(self) -> list[str]:
        """The snapshots this side created and has not deleted (the ledger)."""
        try:
            return sorted(set(self.ledger.read_text().split()))
        except FileNotFoundError:
            return []

    def _record(self, ids: set[str]) -> None:
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ledger.with_suffix(".tmp")
        tmp.write_text("".join(f"{i}\n" for i in sorted(ids)))
        os.replace(tmp, self.ledger)

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        inst = self._instance()
        vols = self._volumes(inst)
        sizes = self._sizes([v for _, _, v in vols])
        found = self._tagged(snapshot_id)
        self._record(set(self.recorded()) | {s["SnapshotId"] for s in found})  # this sync's: ours
        by_volume = {s["VolumeId"]: s for s in found}
        failed = any(s["State"] == "error" for s in found)
        if failed or set(by_volume) != {v for _, _, v in vols}:  # none yet, failed, or volumes changed
            self._delete([s["SnapshotId"] for s in found])
            by_volume = self._create(snapshot_id)
        what = f"snapshot {snapshot_id} of {self.spec.instance_id}"
        ids = [s["SnapshotId"] for s in by_volume.values()]
        wait_completed(self.aws, self.ec2, ids, what, self.snapshot_wait, retry_failed=True)
        created = min(_utc(s["StartTime"]) for s in by_volume.values())
        disks = []
        for key, device, vol in vols:
            since = base.get(key)
            disks.append(
                DiskSnapshot(
                    key=key,
                    size=sizes[vol],
                    change_id=by_volume[vol]["SnapshotId"],
                    base_change_id=since,
                    tracking_lost=self._tracking_problem(since, vol, key) if since else None,
                    handle=AwsDisk(volume_id=vol, device=device).dump(),
                )
            )
        return SnapshotRef(snapshot_id=snapshot_id, created_at=created, disks=disks)

    def _create(self, snapshot_id: str) -> dict[str, dict[str, Any]]:
        tags = [{"Key": k, "Value": v} for k, v in {**self._tags(), TAG_SYNC: snapshot_id}.items()]
        with aws_call(self.aws, f"ec2 CreateSnapshots {self.spec.instance_id}"):
            res = self.ec2.create_snapshots(
                InstanceSpecification={"InstanceId": self.spec.instance_id, "ExcludeBootVolume": False},
                Description=f"sendense job {self.job} sync {snapshot_id}",
                TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}],
            )
        self._record(set(self.recorded()) | {s["SnapshotId"] for s in res["Snapshots"]})
        return {s["VolumeId"]: s for s in res["Snapshots"]}

    def _tracking_problem(self, since: str, volume_id: str, key: str) -> str | None:
        try:
            with aws_call(self.aws, f"ec2 DescribeSnapshots {since}"):
                prev = self.ec2.describe_snapshots(SnapshotIds=[since])["Snapshots"]
        except ResourceNotFound:
            prev = []
        if not prev:
            return f"the previous snapshot {since} of disk {key} is gone"
        if prev[0]["VolumeId"] != volume_id and prev[0]["VolumeId"] not in self._replaced(volume_id):
            return f"disk {key} is another volume now ({prev[0]['VolumeId']} -> {volume_id})"
        if prev[0]["State"] != "completed":
            return f"the previous snapshot {since} of disk {key} is {prev[0]['State']}"
        return None

    def _replaced(self, volume_id: str, depth: int = 8) -> list[str]:
        """The volumes `volume_id` replaced in failback cutovers of this job (its `sendense:replaces` tag,
        followed back): a volume made from the snapshot a failback wrote on a snapshot of the volume it
        replaced continues that volume's lineage, so a base snapshot of it still diffs (and if EBS says
        otherwise, ListChangedBlocks' UNRELATED_SNAPSHOTS is change tracking lost all the same)."""
        out: list[str] = []
        while depth > 0:
            try:
                with aws_call(self.aws, f"ec2 DescribeVolumes {volume_id}"):
                    vols = self.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
            except ResourceNotFound:  # a replaced volume deleted (failback's cleanup): the chain ends here
                return out
            tags = tags_of(vols[0]) if vols else {}
            before = tags.get(TAG_REPLACES)
            if not before or tags.get(TAG_JOB) != self.job or before in out:
                return out
            out.append(before)
            volume_id, depth = before, depth - 1
        return out

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[AwsSourceDisk]:
        yield AwsSourceDisk(self.aws, snap.disk(key))

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        """Committed: the snapshots this side made before are superseded. Not committed: this sync's go."""
        mine = {d.change_id for d in snap.disks}
        if committed:
            recorded = set(self.recorded())
            bases = {d.base_change_id for d in snap.disks if d.base_change_id} - mine - recorded
            self._delete(sorted((recorded | {b for b in bases if self._is_ours(b)}) - mine))
        else:
            self._delete(sorted(mine & set(self.recorded())))

    def _is_ours(self, snapshot_id: str) -> bool:
        """A base snapshot the ledger does not hold (made before the ledger): this job's source side?"""
        try:
            with aws_call(self.aws, f"ec2 DescribeSnapshots {snapshot_id}"):
                found = self.ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        except ResourceNotFound:
            return False
        return any(tags_of(s).get(TAG_JOB) == self.job and role_of(tags_of(s)) == self.role for s in found)

    def forget(self) -> None:
        """This side's snapshots go (the ledger's); one an image uses stays, and is named in a one-line
        error. Others tagged as this job's source side (a ledger lost with its machine) are named in
        the log, never deleted by their tags."""
        stays = self._delete(self.recorded())
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in self._tags().items()]
        with aws_call(self.aws, f"ec2 DescribeSnapshots of job {self.job}"):
            left = self.ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]
        unrecorded = sorted(s["SnapshotId"] for s in left if s["SnapshotId"] not in stays)
        if unrecorded:
            log.warning(
                "job %s: snapshots tagged as its source side but not in its ledger stay: %s",
                self.job,
                ", ".join(unrecorded),
            )
        if stays:
            what = "; ".join(f"{sid} ({why})" for sid, why in sorted(stays.items()))
            raise SendenseError(f"source {self.aws.where()}: snapshots of job {self.job} stay: {what}")

    def _delete(self, snapshot_ids: list[str]) -> dict[str, str]:
        """Delete snapshots this side made; those that stay (an image uses them) stay in the ledger,
        and are returned with why."""
        stays: dict[str, str] = {}
        for sid in snapshot_ids:
            why = delete_snapshot(self.aws, self.ec2, sid)
            if why is not None:
                stays[sid] = why
        gone = set(snapshot_ids) - set(stays)
        if gone:
            self._record(set(self.recorded()) - gone)
        return stays


def delete_snapshot(aws: Aws, ec2: Any, snapshot_id: str) -> str | None:
    """Delete a snapshot (gone already: fine). If an image uses it, it stays: returns why ("in use by
    image ami-..."), None when it is gone."""
    try:
        with aws_call(aws, f"ec2 DeleteSnapshot {snapshot_id}"):
            try:
                ec2.delete_snapshot(SnapshotId=snapshot_id)
            except ClientError as e:
                if not is_not_found(e):
                    raise
    except SendenseError as e:
        if "InUse" in e.message:  # an image someone registered from it
            log.warning("snapshot %s stays: %s", snapshot_id, e.message)
            image = in_use_by(e.message)
            return f"in use by image {image}" if image else "in use by an image"
        raise
    return None


def in_use_by(message: str) -> str | None:
    """The image named in EC2's InvalidSnapshot.InUse message ("... is currently in use by ami-...")."""
    for word in message.replace(")", " ").replace("(", " ").split():
        if word.startswith("ami-"):
            return word.rstrip(".,;:")
    return None


def _utc(t: Any) -> datetime:
    return t.astimezone(UTC) if isinstance(t, datetime) else datetime.now(UTC)
