"""AWS as a replication target: recovery points as EBS snapshots, written with the EBS direct APIs.

- Whose: every snapshot is tagged with the job's name, its identity (`sendense:job-id`, JobSpec.job_id)
  and the target role, so that a source side in the same region (AWS -> AWS) and a later job of the
  same name never count as this job's. Deleting needs more than tags: the local record of a snapshot
  the target started, or a committed point's own id in its tags (tags.py).
- prepare starts afresh: whatever an earlier attempt of the sync (or an abandoned sync) left pending
  is deleted with its record, and one new snapshot per disk is started with `StartSnapshot`,
  `ParentSnapshotId` = that disk's snapshot in the latest point (only changed blocks are sent; the rest
  is inherited). Where the disk is now smaller than the parent's, every parent block from the new end
  on is zeroed, so that a disk grown again reads zeros there.
- writes: `PutSnapshotBlock` of whole 512 KiB blocks with their SHA256 checksums, several in flight
  (pending.py). Compare-mode reads (resync, dedupe) read the parent's blocks.
- commit: `CompleteSnapshot` per disk, the per-disk tags, then one `CreateTags` over all the point's
  snapshots with the tags that make the set a point. A point is listed only when every disk of it is
  completed and tagged; a retried commit finishes what an interrupted one started, and an abort removes
  every snapshot of a sync that is not a whole point.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.aws.client import AccessDenied, Aws, aws_call
from connectors.aws.pending import AwsTargetDisk, PendingSnapshot, complete_snapshot
from connectors.aws.points import committed_by_us, group_points, job_id_of, point_of, target_snapshots
from connectors.aws.records import TargetRecords
from connectors.aws.source import GIB, delete_snapshot, wait_completed
from connectors.aws.spec import AwsTarget
from connectors.aws.tags import (
    ROLE_TARGET,
    TAG_CHANGE,
    TAG_COMMITTED,
    TAG_CREATED,
    TAG_DISK,
    TAG_DISKS,
    TAG_HOLD,
    TAG_JOB,
    TAG_JOB_ID,
    TAG_KIND,
    TAG_PARENT,
    TAG_POINT,
    TAG_PRUNING,
    TAG_ROLE,
    TAG_SELF,
    TAG_SIZE,
    TAG_STATS,
    TAG_SYNC,
    as_list,
    tags_of,
)
from sendense import config
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import DiskInfo, PointInfo, check_hold_id
from sendense.protocols import pick_point

log = logging.getLogger(__name__)

PENDING_TIMEOUT_MIN = 1440  # StartSnapshot Timeout: a pending snapshot left alone a day is cancelled
COMPLETE_WAIT = 15 * 60.0  # inside commit's task (20 min); a snapshot never sealed fails it, clearly


class AwsTargetConnector:
    """TargetConnector: EBS snapshots in one region."""

    platform = "aws"

    def __init__(self, job: str, spec: AwsTarget, state_dir: Path | None = None, job_id: str = "") -> None:
        self.job_id = job_id  # the job's identity (JobSpec.job_id); '' for jobs created before it
        self.job, self.spec = job, spec
        self.aws = Aws(spec.region, spec.endpoint_url)
        self.state = state_dir or config.home() / "aws-target" / job
        self.records = TargetRecords(self.state)
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
        self._refuse_earlier_jobs_points()

    def _refuse_earlier_jobs_points(self) -> None:
        """Points belong to a job's identity: a job re-created under a deleted job's name (whose points
        were kept) must not adopt them, nor prune them."""
        others = [s for s in target_snapshots(self._named()) if job_id_of(s) != self.job_id]
        points, _ = group_points(others)
        if points:
            ids = sorted(s["SnapshotId"] for g in points.values() for s in g)
            shown = ", ".join(ids[:4]) + (f", ... ({len(ids)} snapshots)" if len(ids) > 4 else "")
            raise TargetError(
                f"target: region {self.spec.region} holds {len(points)} recovery point"
                f"{'s' if len(points) != 1 else ''} of an earlier job {self.job} ({shown}); "
                "delete them or use another job name"
            )

    # ------------------------------------------------------------------ snapshots of this job

    def _named(self, *filters: tuple[str, str]) -> list[dict[str, Any]]:
        """Every snapshot tagged with this job's name (any side, any identity), all pages."""
        f = [{"Name": f"tag:{TAG_JOB}", "Values": [self.job]}]
        f += [{"Name": n, "Values": [v]} for n, v in filters]
        out: list[dict[str, Any]] = []
        with aws_call(self.aws, f"ec2 DescribeSnapshots of job {self.job}"):
            for page in self.ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=f):
                out += page["Snapshots"]
        return out

    def _snapshots(self, *filters: tuple[str, str]) -> list[dict[str, Any]]:
        """This job's target snapshots: the target role and this job's identity."""
        return [s for s in target_snapshots(self._named(*filters)) if job_id_of(s) == self.job_id]

    def _ours(self, snap: dict[str, Any]) -> bool:
        """Made by this side: started here (deleted since or not), or a committed point's."""
        return self.records.known(snap["SnapshotId"]) or committed_by_us(snap)

    def _gone(self, snapshot_id: str) -> None:
        """Delete a snapshot this side made. Its record becomes a tombstone: EC2 may list a deleted
        snapshot that was still pending for a while (the deletion takes effect when it completes),
        and it is still this side's to delete again, never another's to complain about."""
        if self._delete(snapshot_id) is None:
            self.records.deleted(snapshot_id)

    def _sync_snapshots(self, sync_id: str) -> dict[str, dict[str, Any]]:
        """disk key -> the snapshot this side started for the sync (failed or foreign ones ignored)."""
        out: dict[str, dict[str, Any]] = {}
        for s in self._snapshots((f"tag:{TAG_SYNC}", sync_id)):
            ours = self.records.started_here(s["SnapshotId"]) or committed_by_us(s)
            if s["State"] != "error" and TAG_DISK in tags_of(s) and ours:
                out[tags_of(s)[TAG_DISK]] = s
        return out

    def _settle_intents(self) -> None:
        """StartSnapshot calls whose answer an earlier attempt never recorded (its worker died in
        between): the same call with the same ClientToken answers the same snapshot (or starts one, if
        the first never happened), which is then this side's to delete."""
        for intent, kw in self.records.unanswered():
            with aws_call(self.aws, f"ebs StartSnapshot (again) for {intent.stem}"):
                sid = self.aws.client("ebs").start_snapshot(**kw)["SnapshotId"]
            self.records.started(sid, intent)
            self._gone(sid)

    # ------------------------------------------------------------------ sync lifecycle

    def prepare(self, sync_id: str, disks: list[DiskInfo]) -> None:
        self._settle_intents()
        listed = self._snapshots()
        for s in listed:  # this sync's earlier attempts, abandoned syncs (and prunes): all go
            t = tags_of(s)
            if (TAG_COMMITTED not in t or TAG_PRUNING in t) and self._ours(s):
                self._gone(s["SnapshotId"])
        self.records.forget_tombstones({s["SnapshotId"] for s in listed})
        latest = self.list_points()[:1]
        parents = {d.key: d for d in latest[0].disks} if latest else {}
        ebs = self.aws.client("ebs")
        self.state.mkdir(parents=True, exist_ok=True)
        for d in disks:
            gib = max(1, -(-d.size // GIB))
            parent = parents.get(d.key)
            parent_id = parent.path if parent and parent.size <= gib * GIB else None
            tags = {
                TAG_JOB: self.job,
                TAG_JOB_ID: self.job_id,
                TAG_ROLE: ROLE_TARGET,
                TAG_SYNC: sync_id,
                TAG_DISK: d.key,
                TAG_SIZE: str(d.size),
                TAG_PARENT: parent_id or "",
            }
            kw: dict[str, Any] = {
                "VolumeSize": gib,
                "Tags": as_list(tags),
                "Description": f"sendense job {self.job} sync {sync_id} disk {d.key}",
                # one per attempt: botocore's retries of this call get the same snapshot, a new attempt
                # of the sync a new one
                "ClientToken": uuid.uuid4().hex,
                "Timeout": PENDING_TIMEOUT_MIN,
            }
            if parent_id:
                kw["ParentSnapshotId"] = parent_id
            intent = self.records.starting(kw)
            try:
                with aws_call(self.aws, f"ebs StartSnapshot for disk {d.key} of {self.job}"):
                    sid = ebs.start_snapshot(**kw)["SnapshotId"]
            except SendenseError as e:
                raise TargetError(
                    f"target {self.aws.where()}: cannot start the snapshot of disk {d.key}: {e.message}",
                    retryable=e.retryable,
                ) from None
            self.records.started(sid, intent)
            if parent_id and parent is not None and parent.size != d.size:  # resized since the parent
                pending = PendingSnapshot(self.aws, ebs, sid, parent_id, self.records.blocks(sid))
                try:
                    pending.clear_beyond(min(d.size, parent.size))
                    pending.sync()
                finally:
                    pending.close()

    @contextmanager
    def open_disk(self, sync_id: str, key: str) -> Iterator[AwsTargetDisk]:
        snap = self._sync_snapshots(sync_id).get(key)
        if snap is None or snap["State"] != "pending" or not self.records.started_here(snap["SnapshotId"]):
            raise ResourceNotFound(
                f"target: no pending snapshot of disk {key} for sync {sync_id} (not prepared)"
            )
        parent = tags_of(snap).get(TAG_PARENT) or None
        sid = snap["SnapshotId"]
        pending = PendingSnapshot(self.aws, self.aws.client("ebs"), sid, parent, self.records.blocks(sid))
        try:
            yield AwsTargetDisk(pending, int(snap["VolumeSize"]) * GIB)
        finally:
            pending.close()

    def commit(self, sync_id: str, point: PointInfo) -> PointInfo:
        for p in self.list_points():
            if p.point_id == point.point_id:
                for d in p.disks:  # committed before (a retried commit)
                    self.records.drop(d.path)
                return p
        snaps = self._sync_snapshots(sync_id)
        missing = [d.key for d in point.disks if d.key not in snaps]
        if missing:
            raise TargetError(f"target: sync {sync_id} has no snapshot for disk {', '.join(missing)}")
        ebs = self.aws.client("ebs")
        for d in point.disks:
            s = snaps[d.key]
            if s["State"] == "pending":
                self._complete(ebs, s["SnapshotId"], d.key)
        sids = [snaps[d.key]["SnapshotId"] for d in point.disks]
        wait_completed(self.aws, self.ec2, sids, f"point {point.point_id} of {self.job}", COMPLETE_WAIT)
        committed = point.model_copy(update={"committed_at": datetime.now(UTC)})
        for d, sid in zip(point.disks, sids, strict=True):  # what differs per disk: not a point yet
            own = {TAG_SELF: sid, TAG_CHANGE: d.change_id, TAG_SIZE: str(d.size)}
            with aws_call(self.aws, f"ec2 CreateTags {sid}"):
                self.ec2.create_tags(Resources=[sid], Tags=as_list(own))
        shared = {
            TAG_POINT: point.point_id,
            TAG_DISKS: str(len(point.disks)),
            TAG_KIND: point.kind,
            TAG_CREATED: point.created_at.isoformat(),
            TAG_STATS: point.stats.model_dump_json(exclude_defaults=True),
            TAG_COMMITTED: committed.committed_at.isoformat(),
        }
        with aws_call(self.aws, f"ec2 CreateTags {' '.join(sids)}"):  # all disks at once: the point
            self.ec2.create_tags(Resources=sids, Tags=as_list(shared))
        for sid in sids:
            self.records.drop(sid)
        disks = [d.model_copy(update={"path": sid}) for d, sid in zip(point.disks, sids, strict=True)]
        return committed.model_copy(update={"disks": disks})

    def _complete(self, ebs: Any, snapshot_id: str, key: str) -> None:
        complete_snapshot(self.aws, ebs, snapshot_id, self.records.blocks(snapshot_id), f"disk {key}")

    def abort(self, sync_id: str) -> None:
        """Every snapshot of the sync goes unless the sync is a whole point: also those an interrupted
        commit tagged as committed (invisible as a point, and to retention)."""
        if any(p.point_id == sync_id for p in self.list_points()):
            return
        for s in self._snapshots((f"tag:{TAG_SYNC}", sync_id)):
            if self._ours(s):
                self._gone(s["SnapshotId"])

    # ------------------------------------------------------------------ points

    def list_points(self) -> list[PointInfo]:
        whole, _ = group_points(self._snapshots(("tag-key", TAG_COMMITTED)))
        points = [point_of(self.job, pid, group) for pid, group in whole.items()]
        return sorted(points, key=lambda p: (p.committed_at, p.point_id), reverse=True)

    def get_point(self, point_id: str | None) -> PointInfo:
        return pick_point(self.job, self.list_points(), point_id)

    def prune(self, keep: int) -> list[str]:
        """The oldest points beyond `keep` go, except those an image uses (all of a point's snapshots
        stay then, so that it stays a whole point, listed and pruned later)."""
        old = self.list_points()[keep:]
        used = self._used_by_images({d.path for p in old for d in p.disks})
        removed = []
        for p in old:
            if p.holds:  # a drill's or failover's VM runs on it: kept whatever the retention
                log.info("job %s: point %s stays: held by %s", self.job, p.point_id, ", ".join(p.holds))
                continue
            held = {d.path: used[d.path] for d in p.disks if d.path in used}
            if held:
                log.warning("job %s: point %s stays: %s", self.job, p.point_id, _named_images(held))
                continue
            sids = [d.path for d in p.disks]
            with aws_call(self.aws, f"ec2 CreateTags {' '.join(sids)}"):  # no point from here on
                self.ec2.create_tags(Resources=sids, Tags=as_list({TAG_PRUNING: p.point_id}))
            if not [sid for sid in sids if self._delete(sid) is not None]:
                removed.append(p.point_id)
        return removed

    def hold(self, point_id: str, hold_id: str, reason: str) -> None:
        """A tag on every snapshot of the point (one CreateTags: all or none); idempotent by id."""
        sids = [d.path for d in self.get_point(point_id).disks]
        with aws_call(self.aws, f"ec2 CreateTags {' '.join(sids)}"):
            self.ec2.create_tags(Resources=sids, Tags=as_list({TAG_HOLD + _hold_id(hold_id): reason[:250]}))

    def release(self, point_id: str, hold_id: str) -> None:
        try:
            sids = [d.path for d in self.get_point(point_id).disks]
        except ResourceNotFound:
            return  # the point is gone: no hold stands on it
        with aws_call(self.aws, f"ec2 DeleteTags {' '.join(sids)}"):
            self.ec2.delete_tags(Resources=sids, Tags=[{"Key": TAG_HOLD + _hold_id(hold_id)}])

    def _used_by_images(self, snapshot_ids: set[str]) -> dict[str, str]:
        """snapshot id -> the image of this account that maps it, for the given snapshots."""
        if not snapshot_ids:
            return {}
        try:
            with aws_call(self.aws, "ec2 DescribeImages of this account"):
                images = self.ec2.describe_images(Owners=["self"])["Images"]
        except AccessDenied as e:  # an agent without ec2:DescribeImages: the deletes will tell
            log.warning("job %s: cannot tell which points images use: %s", self.job, e.message)
            return {}
        return {
            m["Ebs"]["SnapshotId"]: img["ImageId"]
            for img in images
            for m in img.get("BlockDeviceMappings", [])
            if m.get("Ebs", {}).get("SnapshotId") in snapshot_ids
        }

    def export(self, point_id: str, fmt: str, out_dir: Path) -> list[tuple[str, Path]]:
        from connectors.aws.export import export_point

        point = next((p for p in self.list_points() if p.point_id == point_id), None)
        if point is None:
            raise ResourceNotFound(f"job {self.job}: no recovery point {point_id}")
        return export_point(self.aws, point, fmt, out_dir)

    def destroy(self) -> None:
        """Every snapshot of this job's identity that the target made goes, and its local records; what
        cannot go (an image uses it; no local record shows the target started it) is named in one line."""
        held = [f"{p.point_id} ({', '.join(p.holds)})" for p in self.list_points() if p.holds]
        if held:
            raise TargetError(
                f"purge of job {self.job}: refused while points are held by a drill or failover: "
                f"{'; '.join(held)}; end those first"
            )
        stays: dict[str, str] = {}
        self._settle_intents()
        for s in self._snapshots():
            sid = s["SnapshotId"]
            if not self._ours(s):
                stays[sid] = "not started by this agent (no local record)"
                continue
            why = self._delete(sid)
            if why is not None:
                stays[sid] = why
        self.records.clear(keep=set(stays))
        if stays:
            raise TargetError(
                f"target {self.aws.where()}: {len(stays)} snapshot{'s' if len(stays) != 1 else ''} of job "
                f"{self.job} stay{'s' if len(stays) == 1 else ''}: {_named_images(stays)}"
            )

    def _delete(self, snapshot_id: str) -> str | None:
        return delete_snapshot(self.aws, self.ec2, snapshot_id)


def _named_images(why: dict[str, str]) -> str:
    """'snap-a, snap-b (in use by image ami-1)': snapshots grouped by why they stay."""
    by: dict[str, list[str]] = {}
    for sid, reason in why.items():
        by.setdefault(reason, []).append(sid)
    return "; ".join(f"{', '.join(sorted(sids))} ({reason})" for reason, sids in by.items())


def _hold_id(hold_id: str) -> str:
    try:
        return check_hold_id(hold_id)
    except ValueError as e:
        raise InvalidSpec(str(e)) from None
