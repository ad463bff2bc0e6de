"""A point's EBS snapshots as standalone images: blocks read with GetSnapshotBlock (checksums checked),
unwritten blocks left as holes, then converted with qemu-img to the asked format."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from connectors.aws.blocks import BLOCK, get_block, list_blocks
from connectors.aws.client import Aws
from sendense.errors import InvalidSpec
from sendense.models import PointInfo
from tools.exports import EXPORT_FORMATS, export_name, finish_export, staging

READERS = 8


def read_snapshot(aws: Aws, snapshot_id: str, size: int, dst: Path) -> None:
    """The snapshot's first `size` bytes into a sparse raw file."""
    ebs = aws.client("ebs")
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)  # the VM's data: private
    os.fchmod(fd, 0o600)
    try:
        os.ftruncate(fd, size)

        def one(item: tuple[int, str]) -> None:
            idx, token = item
            if idx * BLOCK < size:
                data = get_block(aws, ebs, snapshot_id, idx, token)
                os.pwrite(fd, data[: size - idx * BLOCK], idx * BLOCK)

        with ThreadPoolExecutor(READERS) as pool:
            for _ in pool.map(one, list_blocks(aws, ebs, snapshot_id)):
                pass
        os.fsync(fd)
    finally:
        os.close(fd)


def export_point(aws: Aws, point: PointInfo, fmt: str, out_dir: Path) -> list[tuple[str, Path]]:
    """Every disk of the point, or nothing: a failed export removes its partial files (a 1 GiB
    `.raw.part` of a half-read snapshot) and the disks it had finished."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidSpec(f"--format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    files: list[tuple[str, Path]] = []
    try:
        with staging(out_dir) as stage:
            for d in point.disks:
                dst = export_name(out_dir, point.job, point.point_id, d.key, fmt)
                raw = stage / f"{dst.name}.raw"
                read_snapshot(aws, d.path, d.size, raw)
                finish_export(raw, dst, fmt)
                files.append((d.key, dst))
    except BaseException:
        for _, f in files:
            f.unlink(missing_ok=True)
        raise
    return files
