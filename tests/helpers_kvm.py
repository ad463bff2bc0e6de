"""Helpers shared by the data path and KVM tests: small qcow2 images, qemu-io writes, content
comparisons, and one whole sync (snapshot -> copy every disk -> commit -> release) as the workflow runs it.

A plain module (not a conftest): tests import it as `from helpers_kvm import ...`; pytest puts `tests/`
on sys.path through `pythonpath` in pyproject.toml.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sendense.datapath.sync import copy_disk
from sendense.models import DiskCopyResult, DiskInfo, PointDisk, PointInfo, SnapshotRef, Tuning

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB  # qcow2 cluster size and dirty bitmap granularity of the images made here


def run(*args: object) -> str:
    """Run a command; fail the test with its stderr if it fails."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def make_qcow2(path: Path, size: int, *, bitmaps: tuple[str, ...] = ()) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, size)
    for b in bitmaps:
        run("qemu-img", "bitmap", "--add", "--enable", path, b)
    return path


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    """Write to an image as a VM would (persistent dirty bitmaps record the writes)."""
    args: list[object] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def to_raw(src: Path, dst: Path) -> Path:
    run("qemu-img", "convert", "-U", "-O", "raw", src, dst)
    return dst


def virtual_size(path: Path) -> int:
    return int(image_info(path)["virtual-size"])


def image_info(path: Path) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", path))


def all_bitmap_names(path: Path) -> list[str]:
    data = image_info(path).get("format-specific", {}).get("data", {})
    return sorted(b["name"] for b in data.get("bitmaps", []))


SHRINK_MARKER = "sendense-shrink."  # the stopped-VM source's shrink markers (connectors/kvm/offline.py)


def bitmap_names(path: Path) -> list[str]:
    """The image's bitmaps but the shrink markers that go with the job bitmaps (`all_bitmap_names`)."""
    return [n for n in all_bitmap_names(path) if not n.startswith(SHRINK_MARKER)]


def same_content(a: Path, b: Path) -> bool:
    """True when both images read the same bytes and have the same virtual size."""
    if virtual_size(a) != virtual_size(b):
        return False
    p = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True)
    if p.returncode not in (0, 1):
        raise AssertionError(f"qemu-img compare {a} {b}: {p.stderr.strip()}")
    return p.returncode == 0


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def content_digest(path: Path, scratch: Path) -> str:
    """sha256 of the image's guest-visible bytes (exported to a raw file in `scratch`)."""
    raw = scratch / f"{path.name}.{hashlib.md5(str(path).encode()).hexdigest()[:8]}.digest.raw"
    to_raw(path, raw)
    try:
        return file_digest(raw)
    finally:
        raw.unlink()


def allocation_map(path: Path) -> list[dict[str, Any]]:
    """`qemu-img map` of the image itself (not its backing chain)."""
    return json.loads(run("qemu-img", "map", "-U", "--output=json", path))


def fast_tuning(**kw: Any) -> Tuning:
    """Small chunks and checkpoints so that small test images still exercise several requests."""
    base: dict[str, Any] = {"chunk_size": 1 * MiB, "connections": 2, "checkpoint_bytes": 1 * MiB}
    base.update(kw)
    return Tuning(**base)


@dataclass
class Synced:
    snap: SnapshotRef
    results: dict[str, DiskCopyResult]
    point: PointInfo

    @property
    def base(self) -> dict[str, str | None]:
        """Change ids to hand to the next create_snapshot."""
        return {d.key: d.change_id for d in self.snap.disks}


def sync_point(
    src: Any,
    tgt: Any,
    sync_id: str,
    base: dict[str, str | None] | None = None,
    *,
    tuning: Tuning | None = None,
    before_copy: Any = None,
) -> Synced:
    """One sync as the workflow does it; `before_copy(snap)` runs between snapshot and copy."""
    snap = src.create_snapshot(sync_id, base or {})
    if before_copy is not None:
        before_copy(snap)
    tgt.prepare(sync_id, [DiskInfo(key=d.key, size=d.size) for d in snap.disks])
    results: dict[str, DiskCopyResult] = {}
    try:
        for ds in snap.disks:
            with src.open_disk(snap, ds.key) as sd, tgt.open_disk(sync_id, ds.key) as td:
                results[ds.key] = copy_disk(sd, td, ds, tuning or fast_tuning())
    except BaseException:
        src.release_snapshot(snap, committed=False)
        tgt.abort(sync_id)
        raise
    kinds = {r.kind for r in results.values()}
    point = tgt.commit(
        sync_id,
        PointInfo(
            point_id=sync_id,
            job=getattr(tgt, "job", "job"),
            created_at=snap.created_at,
            committed_at=datetime.now(UTC),
            kind="full" if kinds == {"full"} else "resync" if "resync" in kinds else "incremental",
            disks=[PointDisk(key=d.key, size=d.size, change_id=d.change_id) for d in snap.disks],
        ),
    )
    src.release_snapshot(snap, committed=True)
    return Synced(snap=snap, results=results, point=point)
