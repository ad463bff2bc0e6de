"""A failback's cutover on AWS (failback_sink.py): the written snapshots become the instance's volumes.

Per disk a reverse sync wrote: a volume made from its head snapshot (same zone, type and size as the
volume it replaces; tagged with the job, the role `failback`, the disk, `sendense:replaces=<old>` and
`sendense:from-snapshot=<head>`, so a retried cutover finds it rather than making another), then, the
instance stopped, the old volume detached and the new one attached at the same device. The old volume
stays, tagged `sendense:cutover=old`, for `undo_cut_over` (which swaps back and tags the new one
`undone`) and until `cleanup`. The swap is recorded before it is made, so an undo or a retry after a
worker died half-way sees which volume belongs where; each step looks at what the device holds and
does only what is left. The instance's own settings are not changed: an attached volume gets
DeleteOnTermination false (EC2's default for AttachVolume).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from connectors.aws.client import aws_call
from connectors.aws.tags import TAG_CUTOVER, TAG_FROM, TAG_REPLACES, as_list, tags_of
from sendense.errors import TargetError

if TYPE_CHECKING:
    from connectors.aws.failback_sink import AwsFailbackSink

log = logging.getLogger(__name__)

VOLUME_WAIT = 600.0


def attached(sink: AwsFailbackSink) -> dict[str, str]:
    """device -> volume id of what the instance has attached now."""
    inst = sink.source._instance()
    return {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", []) if "Ebs" in m}


def _volume(sink: AwsFailbackSink, volume_id: str) -> dict[str, Any]:
    with aws_call(sink.aws, f"ec2 DescribeVolumes {volume_id}"):
        return dict(sink.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0])


def _wait(sink: AwsFailbackSink, volume_id: str, state: str) -> None:
    deadline, delay = time.monotonic() + VOLUME_WAIT, 0.1
    while (now := _volume(sink, volume_id)["State"]) != state:
        if time.monotonic() > deadline:
            raise TargetError(
                f"volume {volume_id} is still {now} after {VOLUME_WAIT:.0f} s (waiting for {state})",
                retryable=True,
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def _tag(sink: AwsFailbackSink, volume_id: str, **tags: str) -> None:
    with aws_call(sink.aws, f"ec2 CreateTags {volume_id}"):
        sink.ec2.create_tags(Resources=[volume_id], Tags=as_list(tags))


def _new_volume(sink: AwsFailbackSink, key: str, old: str, head: str) -> str:
    """The volume made from `head` for disk `key`: one a retried cutover made already, or a new one."""
    f = [{"Name": f"tag:{k}", "Values": [v]} for k, v in sink.tags(key, **{TAG_FROM: head}).items()]
    with aws_call(sink.aws, f"ec2 DescribeVolumes of job {sink.job}'s failback"):
        found = sink.ec2.describe_volumes(Filters=f)["Volumes"]
    for v in found:
        if tags_of(v).get(TAG_CUTOVER) != "undone" and v["State"] in ("creating", "available", "in-use"):
            return str(v["VolumeId"])
    before = _volume(sink, old)
    kw: dict[str, Any] = {
        "SnapshotId": head,
        "AvailabilityZone": before["AvailabilityZone"],
        "Size": int(before["Size"]),
        "VolumeType": before.get("VolumeType", "gp3"),
        "TagSpecifications": [
            {"ResourceType": "volume",
             "Tags": as_list(sink.tags(key, **{TAG_REPLACES: old, TAG_FROM: head, TAG_CUTOVER: "new"}))}
        ],
    }  # fmt: skip
    if kw["VolumeType"] in ("io1", "io2") and before.get("Iops"):
        kw["Iops"] = before["Iops"]
    with aws_call(sink.aws, f"ec2 CreateVolume from {head} (failback of disk {key})"):
        vol = str(sink.ec2.create_volume(**kw)["VolumeId"])
    data = sink.state.load()
    data["volumes"].append(vol)
    sink.state.save(data)
    return vol


def cut_over(sink: AwsFailbackSink) -> None:
    sink.check_off()
    data = sink.state.load()
    written = {k: d for k, d in data["disks"].items() if len(d["heads"]) > 1}
    if not written:
        raise TargetError(
            f"failback of job {sink.job}: no reverse sync wrote a disk yet: nothing to cut over"
        )
    unfinished = [f"{k} ({d['pending']})" for k, d in data["disks"].items() if d["pending"]]
    if unfinished:
        raise TargetError(
            f"failback of job {sink.job}: the reverse sync of disk {', '.join(unfinished)} did not finish: "
            "run it again before the cutover"
        )
    iid = sink.spec.instance_id
    for key, d in sorted(written.items()):
        old, device, head = d["volume"], d["device"], d["heads"][-1]
        c = data["cutover"].get(key)
        new = c["new"] if c and c["from"] == head else _new_volume(sink, key, old, head)
        data = sink.state.load()
        data["cutover"][key] = {"old": old, "new": new, "from": head, "device": device}
        sink.state.save(data)
        _wait_either(sink, new)
        _swap(sink, iid, device, old, new)
        _tag(sink, old, **{TAG_CUTOVER: "old"})
        _tag(sink, new, **{TAG_CUTOVER: "new"})
        log.info("failback of job %s: disk %s at %s is volume %s now (from %s; %s kept)", sink.job, key,
                 device, new, head, old)  # fmt: skip


def undo_cut_over(sink: AwsFailbackSink) -> None:
    """Swap back: the old volumes at their devices again; the new ones stay (tagged `undone`) until
    `cleanup`. Nothing cut over: nothing to do."""
    data = sink.state.load()
    if not data["cutover"]:
        return
    sink.check_off()
    for key, c in sorted(data["cutover"].items()):
        _swap(sink, sink.spec.instance_id, c["device"], c["new"], c["old"])
        _tag(sink, c["new"], **{TAG_CUTOVER: "undone"})
        data = sink.state.load()
        del data["cutover"][key]
        sink.state.save(data)
        log.info("failback of job %s: cutover of disk %s undone (%s back at %s)", sink.job, key, c["old"],
                 c["device"])  # fmt: skip


def _wait_either(sink: AwsFailbackSink, volume_id: str) -> None:
    if _volume(sink, volume_id)["State"] != "in-use":
        _wait(sink, volume_id, "available")


def _swap(sink: AwsFailbackSink, iid: str, device: str, out: str, into: str) -> None:
    """`into` attached at `device` instead of `out`, whatever part of that was done already."""
    at = attached(sink).get(device)
    if at == into:
        return
    if at is not None:
        if at != out:
            raise TargetError(
                f"instance {iid}: device {device} holds volume {at}, neither {out} nor {into}: "
                "the failback leaves it as it is"
            )
        with aws_call(sink.aws, f"ec2 DetachVolume {out} from {iid}"):
            sink.ec2.detach_volume(VolumeId=out, InstanceId=iid, Device=device)
        _wait(sink, out, "available")
    with aws_call(sink.aws, f"ec2 AttachVolume {into} to {iid} at {device}"):
        sink.ec2.attach_volume(VolumeId=into, InstanceId=iid, Device=device)
    _wait(sink, into, "in-use")


def unused_volumes(sink: AwsFailbackSink, data: dict[str, Any]) -> list[str]:
    """Volumes `cleanup` may delete: those failback made, and those a cutover in effect kept, that no
    instance has attached."""
    candidates = set(data["volumes"]) | {c["old"] for c in data["cutover"].values()}
    if not candidates:
        return []
    with aws_call(sink.aws, "ec2 DescribeVolumes of the failback"):
        found = sink.ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": sorted(candidates)}])[
            "Volumes"
        ]
    return sorted(v["VolumeId"] for v in found if v["State"] == "available")
