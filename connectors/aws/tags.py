"""The tags that say whose an EBS snapshot is, and which side of a job made it.

A source and a target of jobs may share one region (AWS -> AWS, or one job's source beside another's
target), so a snapshot's owner is never judged by the job's name alone: each side tags its role, the
target tags the job's identity (JobSpec.job_id), and each side deletes only snapshots it can show it
made (its local record, or for a committed point the snapshot's own id in its tags, which a copy of the
snapshot does not match). Snapshots made before roles existed have no role tag: the target's carry
`sendense:disk`, the source's never do.
"""

from __future__ import annotations

from typing import Any

TAG_JOB, TAG_SYNC = "sendense:job", "sendense:sync"
TAG_ROLE, TAG_JOB_ID = "sendense:role", "sendense:job-id"
ROLE_SOURCE, ROLE_TARGET = "source", "target"

TAG_DISK, TAG_SIZE, TAG_PARENT = "sendense:disk", "sendense:size", "sendense:parent"
TAG_POINT, TAG_DISKS, TAG_KIND = "sendense:point", "sendense:disks", "sendense:kind"
TAG_CREATED, TAG_COMMITTED = "sendense:created-at", "sendense:committed-at"
TAG_CHANGE, TAG_STATS = "sendense:change-id", "sendense:stats"
TAG_SELF = "sendense:snapshot"  # a committed point's snapshot carries its own id: copies do not match
TAG_PRUNING = "sendense:pruning"  # set on all of a point's snapshots at once before they are deleted
TAG_HOLD = "sendense:hold:"  # + hold id, on all of a point's snapshots: prune and destroy leave it
TAG_VM, TAG_MODE = "sendense:vm", "sendense:mode"  # on what a VM from a point is made of (vms.py)
# failback (vm_changes.py, failback_sink.py): the failed-over VM's reverse snapshots, and on the source
# side the snapshots and volumes a failback writes and swaps in
ROLE_FAILBACK_VM, ROLE_FAILBACK = "failback-vm", "failback"
TAG_REPLACES = "sendense:replaces"  # on a volume a cutover attached: the volume it replaced
TAG_CUTOVER = "sendense:cutover"  # on both volumes of a cutover: "old" (kept for an undo), "new", "undone"
TAG_FROM = "sendense:from-snapshot"  # on a cutover's new volume: the failback snapshot it was made from


def holds_of(tags: dict[str, str]) -> list[str]:
    return sorted(k.removeprefix(TAG_HOLD) for k in tags if k.startswith(TAG_HOLD))


def tags_of(snap: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in snap.get("Tags", [])}


def role_of(tags: dict[str, str]) -> str:
    """The side that made a snapshot; one made before roles existed is told by its target-only tag."""
    if TAG_ROLE in tags:
        return tags[TAG_ROLE]
    return ROLE_TARGET if TAG_DISK in tags else ROLE_SOURCE


def as_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]
