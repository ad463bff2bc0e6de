"""One disk of one sync: choose full / incremental / resync, plan the extents, run the copy.

- full: the target starts empty; only the source's data ranges are copied (zero ranges are
  already zero on a fresh replica).
- incremental: only ranges changed since the base change id; changed ranges that read as zero are
  written as zero ranges.
- resync: change tracking was lost (or never existed for this target): every range is read, its
  digest compared with the replica's current block, and only differing blocks are written.

Incrementals compare too (`tuning.dedupe_incremental`): a bitmap marks 64 KiB dirty for a 4 KiB guest
write, so the changed range is compared block by block with the replica and only differing
`compare_block`s are sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from sendense.datapath.copy import CopyPlan, Mode, run_copy
from sendense.datapath.extents import Extent, align, clip, coalesce, fill, intersect
from sendense.datapath.throttle import Throttle
from sendense.models import CopyStats, DiskCopyResult, DiskSnapshot, SyncKind, Tuning
from sendense.protocols import SourceDisk, TargetDisk

log = logging.getLogger(__name__)

Checkpoint = Callable[[int, int, int, CopyStats], None]  # offset, done, total, stats


def sync_kind(disk: DiskSnapshot, target_has_base: bool) -> SyncKind:
    if not target_has_base:
        return "full"
    if disk.base_change_id is None or disk.tracking_lost:
        return "resync"
    return "incremental"


def _mode(kind: SyncKind, tuning: Tuning) -> Mode:
    return "compare" if kind == "resync" or (kind == "incremental" and tuning.dedupe_incremental) else "copy"


def untracked_ranges(src: SourceDisk, dst: TargetDisk, start: int, end: int) -> list[Extent]:
    """Where the replica may hold data but the source now reads zero, outside what change tracking
    lists: an incremental must check these too. Dirty bitmaps may record no shrink: a disk shrunk
    and grown back between two syncs (or between a snapshot and its copy) reads zeros beyond the
    shrunk size while its bits there are clean, and the replica would keep the old bytes. The ranges
    come back as data, so that a compare copy (dedupe_incremental, the default) reads both sides and
    writes only what differs: a replica that is zero there already costs two reads, no write. A
    source whose tracking covers shrinks says so (`tracks_resize`: cloud volumes that never shrink);
    a target that can say where its replica holds data (`data_extents`) keeps the list short."""
    if src.tracks_resize:
        return []
    zeros = [e for e in coalesce(clip(src.extents(None, start), start, end)) if e.zero]
    if not zeros:
        return []
    return list(intersect(zeros, (e for e in dst.data_extents(start, end) if not e.zero), zero=False))


def plan_extents(
    src: SourceDisk,
    kind: SyncKind,
    since: str | None,
    start: int,
    end: int,
    block: int = 1,
    untracked: list[Extent] | None = None,
) -> Iterator[Extent]:
    """The ranges to copy from `start`; widened to whole `block`s for a target that writes only
    whole blocks (`start` is then a multiple of it: every chunk is). An incremental also copies
    `untracked` (untracked_ranges) where change tracking lists nothing."""
    if kind == "incremental":
        raw = src.extents(since, start)
        if untracked:
            raw = fill(coalesce(clip(raw, start)), untracked)
    else:
        raw = src.extents(None, start)
        if kind == "full":
            raw = (e for e in raw if not e.zero)
    if block > 1:
        return clip(align(coalesce(clip(raw, start)), block), start, end)
    return coalesce(clip(raw, start, end))


def target_block(dst: TargetDisk) -> int:
    """The unit a target writes in: 1 (any byte range) unless it says otherwise (a snapshot API's block)."""
    return max(1, dst.block_size)


def planned_bytes(src: SourceDisk, dst: TargetDisk, disk: DiskSnapshot, start: int = 0) -> int:
    """The data bytes a copy of `disk` from `start` will read (zero ranges excluded)."""
    kind = sync_kind(disk, dst.has_base)
    end = min(src.size, dst.size)
    ext = plan_extents(src, kind, disk.base_change_id, start, end, target_block(dst))
    return sum(e.length for e in ext if not e.zero)


def copy_disk(
    src: SourceDisk,
    dst: TargetDisk,
    disk: DiskSnapshot,
    tuning: Tuning,
    *,
    start: int = 0,
    on_checkpoint: Checkpoint | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    throttle: Throttle | None = None,
    total: int | None = None,
) -> DiskCopyResult:
    """Copy one disk; `total` is planned_bytes() when the caller has it already."""
    kind = sync_kind(disk, dst.has_base)
    end = min(src.size, dst.size)
    planned = planned_bytes(src, dst, disk, start) if total is None else total
    log.info("disk %s: %s sync from %d, %d bytes to read", disk.key, kind, start, planned)

    def ck(offset: int, done: int, stats: CopyStats) -> None:
        if on_checkpoint is not None:
            on_checkpoint(offset, done, planned, stats)

    block = target_block(dst)
    chunk = -(-tuning.chunk_size // block) * block  # whole target blocks per request
    untracked = untracked_ranges(src, dst, start, end) if kind == "incremental" else None
    plan = CopyPlan(
        extents=plan_extents(src, kind, disk.base_change_id, start, end, block, untracked),
        open_reader=src.connect,
        open_writer=dst.connect,
        mode=_mode(kind, tuning),
        compare_block=-(-tuning.compare_block // block) * block,
        chunk_size=chunk,
        connections=max(1, min(tuning.connections, -(-planned // chunk))),  # small: few conns
        checkpoint_bytes=tuning.checkpoint_bytes,
        throttle=throttle or (Throttle(tuning.bandwidth_limit) if tuning.bandwidth_limit else None),
        on_checkpoint=ck,
        cancelled=cancelled,
    )
    stats, _ = run_copy(plan)
    return DiskCopyResult(key=disk.key, kind=kind, stats=stats, resumed_from=start)
