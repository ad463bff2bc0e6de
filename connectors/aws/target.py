"""AWS as a replication target: recovery points as EBS snapshots, written with the EBS direct APIs.

- prepare: one snapshot per disk, `StartSnapshot` with `ParentSnapshotId` = that disk's snapshot in
  the latest point (so only changed blocks are sent; the rest is inherited), tagged with the job, the
  sync and the disk. A ClientToken per (job, sync, disk) makes a retried prepare idempotent.
- writes: `PutSnapshotBlock` of whole 512 KiB blocks with their SHA256 checksums, several in flight
  (one per copy connection). The copy widens every range to whole blocks (`block_size`). A zero range
  is written as zero blocks only where the parent snapshot has data; elsewhere the block reads as
  zero already. Compare-mode reads (resync, dedupe) read the parent's blocks.
- Each written block's index and checksum go to a local record (fsynced at every copy checkpoint),
  so that a resumed copy still completes the snapshot with the exact count of distinct blocks and
  the LINEAR aggregate checksum that `CompleteSnapshot` checks.
- commit: `CompleteSnapshot` per disk, then tags that make the set a point (`sendense:point`, kind,
  times, sizes, change ids, stats). A point exists iff every one of its disks' snapshots is completed
  and tagged; a retried commit finishes what an interrupted one started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from connectors.aws.blocks import (
    BLOCK,
    ZERO_BLOCK,
    ZERO_CHECKSUM,
    BlockTokens,
    checksum,
    linear_checksum,
    list_blocks,
)
from connectors.aws.client import Aws, aws_call, error_code
from connectors.aws.source import GIB, TAG_JOB, TAG_SYNC, delete_snapshot, wait_completed
from sendense import config
from sendense.errors import DataPathError, ResourceNotFound, SendenseError, TargetError
from sendense.models import AwsTarget, CopyStats, DiskInfo, PointDisk, PointInfo

log = logging.getLogger(__name__)

TAG_DISK, TAG_SIZE, TAG_PARENT = "sendense:disk", "sendense:size", "sendense:parent"
TAG_POINT, TAG_DISKS, TAG_KIND = "sendense:point", "sendense:disks", "sendense:kind"
TAG_CREATED, TAG_COMMITTED = "sendense:created-at", "sendense:committed-at"
TAG_CHANGE, TAG_STATS = "sendense:change-id", "sendense:stats"
PENDING_TIMEOUT_MIN = 1440  # StartSnapshot Timeout: a pending snapshot left alone a day is cancelled
COMPLETE_WAIT = 15 * 60.0  # inside commit's task (20 min); a snapshot never sealed fails it, clearly


def _tags(snap: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in snap.get("Tags", [])}


class PendingSnapshot:
    """One disk's snapshot being written: its written blocks (index -> checksum), kept in a local
    record that survives the worker, and the parent's block map for zero writes."""

    def __init__(self, aws: Aws, ebs: Any, snapshot_id: str, parent: str | None, record: Path) -> None:
        self.aws, self.ebs, self.snapshot_id, self.parent, self.path = aws, ebs, snapshot_id, parent, record
        self.written: dict[int, str] = load_record(record)
        self._lock = threading.Lock()
        self._file = open(record, "a")  # noqa: SIM115 - closed by close()
        self._parent_blocks: bytearray | None = None
        self.parent_tokens = BlockTokens(aws, ebs, parent) if parent else None

    def put(self, index: int, data: bytes, digest: str) -> None:
        with aws_call(self.aws, f"ebs PutSnapshotBlock {self.snapshot_id} block {index}"):
            try:
                self.ebs.put_snapshot_block(
                    SnapshotId=self.snapshot_id,
                    BlockIndex=index,
                    BlockData=data,
                    DataLength=BLOCK,
                    Checksum=digest,
                    ChecksumAlgorithm="SHA256",
                )
            except ClientError as e:  # EBS answers a checksum mismatch (damage in transit) this way
                if error_code(e) == "InvalidSignatureException":
                    raise DataPathError(
                        f"snapshot {self.snapshot_id} block {index}: EBS refused the block's checksum"
                    ) from None
                raise
        with self._lock:
            self.written[index] = digest
            self._file.write(f"{index} {digest}\n")

    def parent_has(self, index: int) -> bool:
        with self._lock:
            if self._parent_blocks is None:
                bits = bytearray()
                if self.parent:
                    for i, _ in list_blocks(self.aws, self.ebs, self.parent):
                        if i // 8 >= len(bits):
                            bits.extend(bytes(i // 8 - len(bits) + 1))
                        bits[i // 8] |= 1 << (i % 8)
                self._parent_blocks = bits
            bits = self._parent_blocks
        return index // 8 < len(bits) and bool(bits[index // 8] & (1 << (index % 8)))

    def sync(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()


def load_record(path: Path) -> dict[int, str]:
    written: dict[int, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return written
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():  # a torn last line (crash mid-write) is skipped
            written[int(parts[0])] = parts[1]
    return written


class SnapshotWriter:
    """A BlockWriter into a pending snapshot (whole blocks; a short last block is padded with zeros)."""

    def __init__(self, snap: PendingSnapshot) -> None:
        self.snap = snap

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset % BLOCK:
            raise TargetError(f"snapshot {self.snap.snapshot_id}: write at {offset} is not 512 KiB aligned")
        for pos in range(0, len(data), BLOCK):
            block = bytes(data[pos : pos + BLOCK])
            if len(block) < BLOCK:
                block += bytes(BLOCK - len(block))
            self.snap.put((offset + pos) // BLOCK, block, checksum(block))

    def zero(self, offset: int, length: int) -> None:
        for index in range(offset // BLOCK, -(-(offset + length) // BLOCK)):
            if self.snap.parent_has(index):  # elsewhere the block is unwritten: it reads as zero
                self.snap.put(index, ZERO_BLOCK, ZERO_CHECKSUM)

    def read(self, offset: int, length: int) -> bytes:
        """What the replica holds before this sync's writes: the parent's blocks."""
        tokens = self.snap.parent_tokens
        return tokens.read(offset, length) if tokens is not None else bytes(length)

    def flush(self) -> None:
        self.snap.sync()

    def close(self) -> None:
        pass


class AwsTargetDisk:
    """TargetDisk for one pending snapshot."""

    block_size = BLOCK

    def __init__(self, snap: PendingSnapshot, size: int) -> None:
        self.snap, self.size, self.has_base = snap, size, snap.parent is not None

    def connect(self) -> SnapshotWriter:
        return SnapshotWriter(self.snap)


class AwsTargetConnector:
    """TargetConnector: EBS snapshots in one region."""

    platform = "aws"

    def __init__(self, job: str, spec: AwsTarget, state_dir: Path | None = None, job_id: str = "") -> None:
        self.job_id = job_id  # the job's identity (JobSpec.job_id); '' for jobs created before it
        self.job, self.spec = job, spec
        self.aws = Aws(spec.region, spec.endpoint_url)
        self.state = state_dir or config.home() / "aws-target" / job
        self._ec2: Any = None

    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = self.aws.client("ec2")
        return self._ec2

    def validate(self) -> None:
        zones = [self.spec.availability_zone] if self.spec.availability_zone else []
        try:
            with aws_call(self.aws, "ec2 DescribeAvailabilityZones"):
                found = self.ec2.describe_availability_zones(ZoneNames=zones)["AvailabilityZones"]
            if zones and zones[0] not in {z["ZoneName"] for z in found}:
                raise ResourceNotFound("not listed")
        except ResourceNotFound:
            raise ResourceNotFound(
                f"target.availability_zone: {self.spec.availability_zone} not found in {self.aws.where()}"
            ) from None
        except SendenseError as e:
            if "InvalidParameterValue" in e.message and zones:
                raise ResourceNotFound(
                    f"target.availability_zone: {zones[0]} is not a zone of {self.spec.region}"
                ) from None
            raise
        inst = self.spec.instance
        if inst.subnet_id:
            with aws_call(self.aws, f"target.instance.subnet_id: ec2 DescribeSubnets {inst.subnet_id}"):
                self.ec2.describe_subnets(SubnetIds=[inst.subnet_id])
        if inst.security_group_ids:
            what = f"target.instance.security_group_ids: ec2 DescribeSecurityGroups {inst.security_group_ids}"
            with aws_call(self.aws, what):
                self.ec2.describe_security_groups(GroupIds=inst.security_group_ids)

    # ------------------------------------------------------------------ snapshots of this job

    def _snapshots(self, *filters: tuple[str, str]) -> list[dict[str, Any]]:
        f = [{"Name": f"tag:{TAG_JOB}", "Values": [self.job]}]
        f += [{"Name": n, "Values": [v]} for n, v in filters]
        out: list[dict[str, Any]] = []
        with aws_call(self.aws, f"ec2 DescribeSnapshots of job {self.job}"):
            for page in self.ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=f):
                out += page["Snapshots"]
        return out

    def _sync_snapshots(self, sync_id: str) -> dict[str, dict[str, Any]]:
        """disk key -> this sync's snapshot (an error-state one from a failed attempt is ignored)."""
        snaps = self._snapshots((f"tag:{TAG_SYNC}", sync_id))
        return {_tags(s)[TAG_DISK]: s for s in snaps if s["State"] != "error" and TAG_DISK in _tags(s)}

    def _record(self, snapshot_id: str) -> Path:
        return self.state / f"{snapshot_id}.blocks"

    # ------------------------------------------------------------------ sync lifecycle

    def prepare(self, sync_id: str, disks: list[DiskInfo]) -> None:
        for s in self._snapshots(("status", "pending")):  # an abandoned sync's unfinished snapshots
            if _tags(s).get(TAG_SYNC) != sync_id and TAG_COMMITTED not in _tags(s):
                self._delete(s["SnapshotId"])
        latest = self.list_points()[:1]
        parents = {d.key: d for d in latest[0].disks} if latest else {}
        have = self._sync_snapshots(sync_id)
        ebs = self.aws.client("ebs")
        self.state.mkdir(parents=True, exist_ok=True)
        for d in disks:
            if d.key in have:
                continue
            gib = max(1, -(-d.size // GIB))
            parent = parents.get(d.key)
            parent_id = parent.path if parent and parent.size <= gib * GIB else None
            tags = {TAG_JOB: self.job, TAG_SYNC: sync_id, TAG_DISK: d.key, TAG_SIZE: str(d.size)}
            tags[TAG_PARENT] = parent_id or ""
            token = hashlib.sha256(f"{self.job}/{sync_id}/{d.key}".encode()).hexdigest()[:64]
            kw: dict[str, Any] = {
                "VolumeSize": gib,
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                "Description": f"sendense job {self.job} sync {sync_id} disk {d.key}",
                "ClientToken": token,
                "Timeout": PENDING_TIMEOUT_MIN,
            }
            if parent_id:
                kw["ParentSnapshotId"] = parent_id
            try:
                with aws_call(self.aws, f"ebs StartSnapshot for disk {d.key} of {self.job}"):
                    ebs.start_snapshot(**kw)
            except SendenseError as e:
                raise TargetError(
                    f"target {self.aws.where()}: cannot start the snapshot of disk {d.key}: {e.message}",
                    retryable=e.retryable,
                ) from None

    @contextmanager
    def open_disk(self, sync_id: str, key: str) -> Iterator[AwsTargetDisk]:
        snap = self._sync_snapshots(sync_id).get(key)
        if snap is None or snap["State"] != "pending":
            raise ResourceNotFound(
                f"target: no pending snapshot of disk {key} for sync {sync_id} (not prepared)"
            )
        parent = _tags(snap).get(TAG_PARENT) or None
        self.state.mkdir(parents=True, exist_ok=True)
        pending = PendingSnapshot(
            self.aws, self.aws.client("ebs"), snap["SnapshotId"], parent, self._record(snap["SnapshotId"])
        )
        try:
            yield AwsTargetDisk(pending, int(snap["VolumeSize"]) * GIB)
        finally:
            pending.close()

    def commit(self, sync_id: str, point: PointInfo) -> PointInfo:
        for p in self.list_points():
            if p.point_id == point.point_id:
                return p  # committed before (a retried commit)
        snaps = self._sync_snapshots(sync_id)
        missing = [d.key for d in point.disks if d.key not in snaps]
        if missing:
            raise TargetError(f"target: sync {sync_id} has no snapshot for disk {', '.join(missing)}")
        ebs = self.aws.client("ebs")
        for d in point.disks:
            s = snaps[d.key]
            if s["State"] == "pending":
                self._complete(ebs, s["SnapshotId"], d.key)
        wait_completed(
            self.aws,
            self.ec2,
            [snaps[d.key]["SnapshotId"] for d in point.disks],
            f"point {point.point_id} of {self.job}",
            COMPLETE_WAIT,
        )
        committed = point.model_copy(update={"committed_at": datetime.now(UTC)})
        disks = []
        for d in point.disks:  # the committed-at tag goes last: it is what makes the point visible
            sid = snaps[d.key]["SnapshotId"]
            tags = {
                TAG_POINT: point.point_id,
                TAG_DISKS: str(len(point.disks)),
                TAG_KIND: point.kind,
                TAG_CREATED: point.created_at.isoformat(),
                TAG_CHANGE: d.change_id,
                TAG_SIZE: str(d.size),
                TAG_STATS: point.stats.model_dump_json(exclude_defaults=True),
                TAG_COMMITTED: committed.committed_at.isoformat(),
            }
            with aws_call(self.aws, f"ec2 CreateTags {sid}"):
                self.ec2.create_tags(Resources=[sid], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
            self._record(sid).unlink(missing_ok=True)
            disks.append(d.model_copy(update={"path": sid}))
        return committed.model_copy(update={"disks": disks})

    def _complete(self, ebs: Any, snapshot_id: str, key: str) -> None:
        written = load_record(self._record(snapshot_id))
        kw: dict[str, Any] = {"SnapshotId": snapshot_id, "ChangedBlocksCount": len(written)}
        if written:  # the aggregate checksum of the blocks written, in block order
            kw["Checksum"] = linear_checksum([written[i] for i in sorted(written)])
            kw["ChecksumAlgorithm"], kw["ChecksumAggregationMethod"] = "SHA256", "LINEAR"
        with aws_call(self.aws, f"ebs CompleteSnapshot {snapshot_id}"):
            res = ebs.complete_snapshot(**kw)
        if res.get("Status") == "error":
            raise TargetError(
                f"target: EBS refused to complete snapshot {snapshot_id} of disk {key} "
                f"({len(written)} blocks: count or checksum mismatch)"
            )

    def abort(self, sync_id: str) -> None:
        for s in self._snapshots((f"tag:{TAG_SYNC}", sync_id)):
            if TAG_COMMITTED not in _tags(s):
                self._delete(s["SnapshotId"])
                self._record(s["SnapshotId"]).unlink(missing_ok=True)

    # ------------------------------------------------------------------ points

    def list_points(self) -> list[PointInfo]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for s in self._snapshots(("tag-key", TAG_COMMITTED)):
            if s["State"] == "completed":
                groups.setdefault(_tags(s)[TAG_POINT], []).append(s)
        points = []
        for pid, snaps in groups.items():
            t = _tags(snaps[0])
            if len(snaps) != int(t[TAG_DISKS]):
                continue  # an interrupted commit: not a point until the retry tags the rest
            disks = sorted(
                (
                    PointDisk(
                        key=_tags(s)[TAG_DISK],
                        size=int(_tags(s)[TAG_SIZE]),
                        change_id=_tags(s)[TAG_CHANGE],
                        path=s["SnapshotId"],
                    )
                    for s in snaps
                ),
                key=lambda d: d.key,
            )
            points.append(
                PointInfo(
                    point_id=pid,
                    job=self.job,
                    created_at=datetime.fromisoformat(t[TAG_CREATED]),
                    committed_at=max(datetime.fromisoformat(_tags(s)[TAG_COMMITTED]) for s in snaps),
                    kind=t[TAG_KIND],  # type: ignore[arg-type]
                    disks=disks,
                    stats=CopyStats.model_validate(json.loads(t.get(TAG_STATS) or "{}")),
                )
            )
        return sorted(points, key=lambda p: (p.committed_at, p.point_id), reverse=True)

    def get_point(self, point_id: str | None) -> PointInfo:
        pts = self.list_points()
        if not pts:
            raise ResourceNotFound(f"job {self.job}: no recovery point yet")
        for p in pts:
            if point_id is None or p.point_id == point_id:
                return p
        raise ResourceNotFound(f"job {self.job}: no recovery point {point_id}")

    def prune(self, keep: int) -> list[str]:
        removed = []
        for p in self.list_points()[keep:]:
            if all(self._delete(d.path) for d in p.disks):
                removed.append(p.point_id)
        return removed

    def export(self, point_id: str, fmt: str, out_dir: Path) -> list[tuple[str, Path]]:
        from connectors.aws.export import export_point

        point = next((p for p in self.list_points() if p.point_id == point_id), None)
        if point is None:
            raise ResourceNotFound(f"job {self.job}: no recovery point {point_id}")
        return export_point(self.aws, point, fmt, out_dir)

    def destroy(self) -> None:
        for s in self._snapshots():
            self._delete(s["SnapshotId"])
        if self.state.is_dir():
            for f in self.state.glob("*.blocks"):
                f.unlink()

    def _delete(self, snapshot_id: str) -> bool:
        return delete_snapshot(self.aws, self.ec2, snapshot_id)
