"""Activity inputs and results stay small whatever the disk count: every payload of a sync, built
with the largest values the spec's caps and the connectors allow, serialized as the workers do
(temporalio.contrib.pydantic.pydantic_data_converter), stays far below Temporal's 2 MB payload limit.

Largest values: the longest job name (63), every path a spec may give at its cap (MAX_PATH_BYTES)
and every path a connector derives from one a little longer, the longest bitmap names (job, sync id,
tag), 64 NICs whose networks are of the longest name allowed, long error texts, and for each
source form (stopped VM, QMP, libvirt, AWS, memory) its own snapshot handles with each field at its
largest. Sizes: 60 disks (the largest real VMs) under 256 KiB per payload; MAX_DISKS under 640 KiB
(under a third of the limit)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from temporalio.contrib.pydantic import pydantic_data_converter

from connectors.aws.handles import AwsDisk
from connectors.kvm.handles import LibvirtDisk, LibvirtSnapshot, OfflineDisk, QmpDisk, QmpSnapshot
from connectors.kvm.identity import bitmap_name, bitmap_prefix
from connectors.kvm.spec import KvmHardware, KvmNic, KvmSource, KvmTarget
from connectors.memory.handles import MemoryDisk, MemorySnapshot
from sendense.models import (
    MAX_DISKS,
    MAX_NICS,
    MAX_PATH_BYTES,
    BeginResult,
    CarriedState,
    CommitRequest,
    CopyRequest,
    CopyStats,
    CopyToken,
    DiskCopyResult,
    DiskInfo,
    DiskSnapshot,
    FinishResult,
    JobSpec,
    JobStatus,
    NicInfo,
    PointDisk,
    PointInfo,
    PrepareRequest,
    ReleaseRequest,
    ReplicationInput,
    SnapshotRef,
    SnapshotRequest,
    SyncResult,
    VmInfo,
)
from tools.qemu import UNIX_PATH_MAX

KiB = 1 << 10
JOB = "j" * 63  # JOB_NAME's longest
SYNC = "20991231T235959Z-9999"  # the workflow's sync ids: f"{now:%Y%m%dT%H%M%SZ}-{seq:04d}"
WHEN = datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
BIG = 2**63 - 1  # every counter at its largest (JSON digits)
KEY = "k" * 64  # a disk key: QEMU's qdev ids and node names, libvirt's target devs are shorter
QEMU_NAME = "q" * 31  # QEMU's node names and job ids (live_qemu: at most 31 characters)
NAME = "n" * 128  # a memory store's blob, a VM's OS name: all shorter
CHECKPOINT = bitmap_prefix(JOB) + SYNC  # a libvirt checkpoint's name (libvirt_source)
LIBVIRT_ID = f"{'0' * 8}.{'0' * 8}.{'0' * 16}"  # libvirt_identity: uuid hash, disk tag, inode
ERROR = "e" * 1000  # an error text (a retry's reason, a resync's reason)
DERIVED = MAX_PATH_BYTES + 256  # a path a connector makes under one given (a point's file) or the agent's


def path(i: int, kind: str, length: int = MAX_PATH_BYTES) -> str:
    """A path of exactly `length` bytes (components of at most 255), distinct per disk and kind."""
    tail = f"/{kind}-{i:04d}.qcow2"
    head = ""
    while len(head) + len(tail) < length:
        head += "/" + "p" * min(254, length - len(head) - len(tail) - 1)
    return head + tail


def sock(i: int) -> str:
    return path(i, "s", UNIX_PATH_MAX)


def bitmap(i: int) -> str:
    return bitmap_name(JOB, SYNC, f"{i:08x}")


def spec(n: int) -> JobSpec:
    """The largest spec: n disks at the path cap, the most NICs, every string of them at its longest."""
    nic = KvmNic(mac="52:54:00:12:34:56", network="b" * 255, model="m" * 32)  # (their caps)
    return JobSpec(
        name=JOB,
        job_id="i" * 64,
        source=KvmSource(
            platform="kvm",
            disks=[path(i, "src") for i in range(n)],  # type: ignore[misc]
            hardware=KvmHardware(cpus=1024, memory_mib=16 << 20, nics=[nic] * MAX_NICS),
            host="h" * 63,
        ),
        target=KvmTarget(platform="kvm", path=path(0, "target"), host="h" * 63),  # type: ignore[arg-type]
    )


def handles(form: str, i: int) -> dict[str, Any]:
    """A disk's snapshot handle of each source form, every field at its largest."""
    if form == "offline":
        return OfflineDisk(path=path(i, "src"), regrown=BIG).dump()
    if form == "qmp":
        return QmpDisk(
            qmp=sock(0),
            node=QEMU_NAME,
            socket=sock(1),
            export=QEMU_NAME,
            export_id=QEMU_NAME,
            job_id=QEMU_NAME,
            fleece_node=QEMU_NAME,
            fleece_file=path(i, "fleece", DERIVED),  # in the agent's work directory
            temp_bitmap=f"sendense-tmp/{JOB}/{SYNC}/abcdef",
            regrown=BIG,
            prev_bitmaps=[bitmap(i), bitmap(i + 1)],
        ).dump()
    if form == "libvirt":
        return LibvirtDisk(
            socket=sock(2),
            export=KEY,  # (libvirt names an export after its disk: vda)
            scratch=path(i, "scratch", DERIVED),
            checkpoint=CHECKPOINT,
            source=path(i, "src"),  # the domain's own path: not capped by sendense, realistic at the cap
            bitmap=bitmap(i),
        ).dump()
    if form == "aws":
        return AwsDisk(volume_id="vol-0123456789abcdef0", device="/dev/sdzz").dump()
    assert form == "memory"
    return MemoryDisk(copy_of=NAME).dump()


def snapshot_handle(form: str) -> dict[str, Any]:
    return {
        "qmp": lambda: QmpSnapshot(qmp=sock(0), socket=sock(1), job=JOB).dump(),
        "libvirt": lambda: LibvirtSnapshot(domain="d" * 1024, checkpoint=CHECKPOINT, socket=sock(2)).dump(),
        "memory": lambda: MemorySnapshot(nonce=NAME).dump(),
    }.get(form, dict)()


def change_id(form: str, i: int) -> str:
    return f"{CHECKPOINT}@{LIBVIRT_ID}" if form == "libvirt" else bitmap(i)  # libvirt: checkpoint@identity


def payloads(form: str, n: int) -> dict[str, BaseModel]:
    """Every model a sync of an n-disk VM puts into history, at its largest."""
    sp = spec(n)
    snap = SnapshotRef(
        snapshot_id=SYNC,
        created_at=WHEN,
        disks=[
            DiskSnapshot(
                key=f"{KEY}{i:04d}"[-64:],
                size=BIG,
                change_id=change_id(form, i),
                base_change_id=change_id(form, i + 1),
                tracking_lost=ERROR,
                handle=handles(form, i),
            )
            for i in range(n)
        ],
        handle=snapshot_handle(form),
    )
    stats = CopyStats(
        bytes_read=BIG,
        bytes_written=BIG,
        bytes_zeroed=BIG,
        bytes_skipped=BIG,
        extents=BIG,
        seconds=1e300,
        recopied=BIG,
    )
    results = [
        DiskCopyResult(key=d.key, kind="incremental", stats=stats, resumed_from=BIG) for d in snap.disks
    ]
    point = PointInfo(
        point_id=SYNC,
        job=JOB,
        created_at=WHEN,
        committed_at=WHEN,
        kind="incremental",
        disks=[
            PointDisk(key=d.key, size=BIG, change_id=d.change_id, path=path(i, "point", DERIVED))
            for i, d in enumerate(snap.disks)
        ],
        stats=stats,
        holds=[f"{'h' * 60}{i:04d}" for i in range(16)],
    )
    sync = SyncResult(
        point_id=SYNC,
        kind="resync",
        bytes_read=BIG,
        bytes_written=BIG,
        bytes_zeroed=BIG,
        bytes_skipped=BIG,
        seconds=1e300,
        created_at=WHEN,
        resync_reason=ERROR,
    )
    base = {d.key: d.change_id for d in snap.disks}
    vm = VmInfo(
        name=NAME,
        platform="kvm",
        disks=[
            DiskInfo(key=d.key, size=BIG, ref=path(i, "src"), bus="virtio", boot_order=i + 1)
            for i, d in enumerate(snap.disks)
        ],
        cpus=1024,
        memory_mib=16 << 20,
        firmware="uefi",
        nics=[NicInfo(mac="52:54:00:12:34:56", network="b" * 255, model="m" * 32)] * MAX_NICS,
        os_hint=NAME,
    )
    return {
        "validate_job result (VmInfo)": vm,
        "SnapshotRequest": SnapshotRequest(spec=sp, snapshot_id=SYNC, base=base, copy_up_to=BIG, finish=True),
        "SnapshotRef": snap,
        "BeginResult": BeginResult(
            snapshot=snap, copied=results, finished=FinishResult(point=point, release_error=ERROR)
        ),
        "PrepareRequest": PrepareRequest(spec=sp, sync_id=SYNC, disks=vm.disks),
        "CopyRequest": CopyRequest(  # the workflow sends the snapshot with the disk to copy only
            spec=sp,
            sync_id=SYNC,
            snapshot=snap.model_copy(update={"disks": snap.disks[-1:]}),
            disk=snap.disks[-1].key,
        ),
        "CopyToken (heartbeat)": CopyToken(
            sync_id=SYNC, disk=KEY, offset=BIG, snapshot_at=WHEN, done=BIG, total=BIG, stats=stats
        ),
        "CommitRequest": CommitRequest(spec=sp, sync_id=SYNC, snapshot=snap, results=results, keep=10000),
        "ReleaseRequest": ReleaseRequest(spec=sp, snapshot=snap, committed=True),
        "FinishResult": FinishResult(point=point, release_error=ERROR),
        "ReplicationInput (continue-as-new)": ReplicationInput(
            spec=sp,
            state=CarriedState(
                seq=BIG,
                base=base,
                last_point=point,
                last_sync=sync,
                last_error=ERROR,
                last_resync_reason=ERROR,
                last_sync_started_at=WHEN,
            ),
            source_queue=f"host-{'h' * 63}",
            target_queue=f"host-{'h' * 63}",
        ),
        "JobStatus (query)": JobStatus(
            name=JOB,
            state="syncing",
            source=sp.source.describe(),
            target=sp.target.describe(),
            interval_seconds=30 * 86400,
            retention_points=10000,
            last_point=SYNC,
            last_point_at=WHEN,
            last_sync=sync,
            next_sync_at=WHEN + timedelta(days=30),
            rpo_lag_seconds=1e300,
            last_error=ERROR,
            last_resync_reason=ERROR,
            current_sync=SYNC,
            left_behind=[p.path for p in point.disks],
        ),
    }


def size(value: BaseModel) -> int:
    [payload] = pydantic_data_converter.payload_converter.to_payloads([value])
    return payload.ByteSize()


FORMS = ["offline", "qmp", "libvirt", "aws", "memory"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("disks", "limit"), [(60, 256 * KiB), (MAX_DISKS, 640 * KiB)])
def test_every_payload_of_a_sync_stays_small(form: str, disks: int, limit: int) -> None:
    sizes = {name: size(v) for name, v in payloads(form, disks).items()}
    over = {name: f"{s / KiB:.0f} KiB" for name, s in sizes.items() if s >= limit}
    assert not over, f"{form}, {disks} disks: over {limit // KiB} KiB: {over}"
    # and each round-trips as the workers decode it (a payload the models would refuse is no bound)
    for name, v in payloads(form, 2).items():
        [p] = pydantic_data_converter.payload_converter.to_payloads([v])
        [back] = pydantic_data_converter.payload_converter.from_payloads([p], [type(v)])
        assert back == v, name


def test_the_largest_payload_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a bound: the figures, for the README and for whoever raises MAX_DISKS."""
    worst = max(
        ((size(v), form, name) for form in FORMS for name, v in payloads(form, MAX_DISKS).items()),
    )
    with capsys.disabled():
        print(f"\nlargest payload at {MAX_DISKS} disks: {worst[2]} ({worst[1]}), {worst[0] / KiB:.0f} KiB")
    assert worst[0] < 2_000_000
