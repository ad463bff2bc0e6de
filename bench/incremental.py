"""Incremental syncs: bytes written to the target per byte the guest really changed.

After a job's full sync of the shared mixed source image, three rounds of guest-like churn (1%, 5%
and 20% of the disk as random 4 KiB writes at distinct aligned offsets, through qemu-io) are each
followed by `sync-now`. For each point: overhead = bytes_written / bytes changed, reduction =
1 - bytes_written / the full sync's bytes_written, and bit-exactness (the point exported raw with
KvmTarget.export, `qemu-img compare`d against a raw copy of the source).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.full_sync import source_image
from bench.harness import Bench, GiB, job_id, mib, remove_job_bitmaps
from bench.images import churn, info, same_content, to_raw
from connectors.kvm.target import KvmTarget

CHURN = (0.01, 0.05, 0.20)


def verify_point(job: str, target: Path, point_id: str, src: Path, work: Path) -> bool:
    """Export the point raw and compare it with a raw copy of the source, then delete both."""
    ref = to_raw(src, work / "ref.raw")
    files = KvmTarget(job, target, job_id=job_id(job)).export(point_id, "raw", work / "export")
    try:
        return all(same_content(path, ref) for _, path in files)
    finally:
        ref.unlink(missing_ok=True)
        for _, path in files:
            path.unlink(missing_ok=True)


def granularity(src: Path, job: str) -> int | None:
    data = info(src).get("format-specific", {}).get("data", {})
    for b in data.get("bitmaps", []):
        if b["name"].startswith(f"sendense.{job}."):
            return int(b["granularity"])
    return None


async def measure(bench: Bench) -> dict[str, Any]:
    src = source_image(bench)
    size = bench.opts.size
    name = f"incr-{int(time.time()) % 100000}"
    target = bench.dir(f"t-{name}")
    work = bench.dir("incr-work")
    jobs = await bench.client()
    points: dict[str, Any] = {}
    try:
        await bench.create(bench.spec(name, [src], target))
        full = await bench.wait_syncs(name, 1)
        gran = granularity(src, name)
        for i, frac in enumerate(CHURN):
            t0 = time.monotonic()
            changed = churn(src, size, frac, work, seed=100 + i)
            churn_s = time.monotonic() - t0
            res = await jobs.sync_now(name, wait=True)
            assert res is not None
            exact = verify_point(name, target, res.point_id, src, work)
            points[f"{round(frac * 100)}pct"] = {
                "churn_fraction": frac,
                "bytes_changed": changed,
                "bytes_written": res.bytes_written,
                "bytes_zeroed": res.bytes_zeroed,
                "bytes_read": res.bytes_read,
                "kind": res.kind,
                "sync_seconds": round(res.seconds, 3),
                "churn_write_seconds": round(churn_s, 2),
                "overhead_ratio": round(res.bytes_written / changed, 3),
                "reduction": round(1 - res.bytes_written / full.bytes_written, 4),
                "bit_exact": exact,
            }
    finally:
        await bench.delete(name, purge=True)
        remove_job_bitmaps(src, name)

    return {
        "size_gib": round(size / GiB, 3),
        "full_bytes_written": full.bytes_written,
        "full_sync_seconds": round(full.seconds, 3),
        "bitmap_granularity": gran,
        "overhead_ratio": max(p["overhead_ratio"] for p in points.values()),
        "reduction_1pct": points["1pct"]["reduction"],
        "bit_exact": all(p["bit_exact"] for p in points.values()),
        "changed_mib": {k: mib(p["bytes_changed"]) for k, p in points.items()},
        "written_mib": {k: mib(p["bytes_written"]) for k, p in points.items()},
        "notes": "overhead = bytes_written / bytes actually changed (distinct 4 KiB blocks); zeroes have no "
        "payload (bytes_zeroed reported apart); reduction = 1 - bytes_written / full sync bytes_written",
        "churn": points,
    }
