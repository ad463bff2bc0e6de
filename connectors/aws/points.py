"""Recovery points out of a job's target snapshots: which snapshots are whose, and which sets are
whole points. Pure functions over DescribeSnapshots entries (no AWS calls), shared by the target's
list, prune, abort, destroy and validate."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from connectors.aws.tags import (
    ROLE_TARGET,
    TAG_CHANGE,
    TAG_COMMITTED,
    TAG_CREATED,
    TAG_DISK,
    TAG_DISKS,
    TAG_JOB_ID,
    TAG_KIND,
    TAG_POINT,
    TAG_PRUNING,
    TAG_SELF,
    TAG_SIZE,
    TAG_STATS,
    holds_of,
    role_of,
    tags_of,
)
from sendense.models import CopyStats, PointDisk, PointInfo


def target_snapshots(snaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The target side's snapshots among a job name's (the source side of a job of that name, or a
    volume's snapshot that copied our tags, are not)."""
    return [s for s in snaps if role_of(tags_of(s)) == ROLE_TARGET]


def job_id_of(snap: dict[str, Any]) -> str:
    return tags_of(snap).get(TAG_JOB_ID, "")  # snapshots made before job ids: '' (old jobs' own id)


def committed_by_us(snap: dict[str, Any]) -> bool:
    """Tagged as a committed point's snapshot by the target itself: the snapshot's own id is in its tags
    (a copy carries the original's), or the snapshot predates that tag."""
    t = tags_of(snap)
    return TAG_COMMITTED in t and TAG_POINT in t and t.get(TAG_SELF, snap["SnapshotId"]) == snap["SnapshotId"]


def group_points(snaps: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], set[str]]:
    """(point id -> its snapshots) of the whole points among `snaps`, and the ids of the snapshots of
    incomplete ones (an interrupted commit or prune, a point a disk snapshot of which was deleted)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in snaps:
        if committed_by_us(s):
            groups.setdefault(tags_of(s)[TAG_POINT], []).append(s)
    whole: dict[str, list[dict[str, Any]]] = {}
    broken: set[str] = set()
    for pid, group in groups.items():
        keys = [tags_of(s).get(TAG_DISK) for s in group]
        complete = (
            all(s["State"] == "completed" for s in group)
            and len(set(keys)) == len(keys)
            and all(tags_of(s).get(TAG_DISKS) == str(len(group)) for s in group)
            and not any(TAG_PRUNING in tags_of(s) for s in group)
        )
        if complete:
            whole[pid] = group
        else:
            broken.update(s["SnapshotId"] for s in group)
    return whole, broken


def point_of(job: str, pid: str, group: list[dict[str, Any]]) -> PointInfo:
    t = tags_of(group[0])
    disks = sorted(
        (
            PointDisk(
                key=tags_of(s)[TAG_DISK],
                size=int(tags_of(s)[TAG_SIZE]),
                change_id=tags_of(s)[TAG_CHANGE],
                path=s["SnapshotId"],
            )
            for s in group
        ),
        key=lambda d: d.key,
    )
    return PointInfo(
        point_id=pid,
        job=job,
        created_at=datetime.fromisoformat(t[TAG_CREATED]),
        committed_at=max(datetime.fromisoformat(tags_of(s)[TAG_COMMITTED]) for s in group),
        kind=t[TAG_KIND],  # type: ignore[arg-type]
        disks=disks,
        stats=CopyStats.model_validate(json.loads(t.get(TAG_STATS) or "{}")),
        holds=sorted({h for s in group for h in holds_of(tags_of(s))}),
    )
