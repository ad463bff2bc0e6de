"""Worker memory: peak RSS during the mixed full sync (from full_sync) and during a big sparse one.

The sampler reads the worker process's RSS every 0.1 s, and apart from it the sum over its children
(the qemu-nbd exports and qemu-img runs it spawns). The sparse disk is 8 GiB (quick: 1 GiB) with
256 MiB (quick: 32 MiB) of random data in 1 MiB pieces spread evenly.
"""

from __future__ import annotations

import time
from typing import Any

from bench.full_sync import engine_run, source_image
from bench.harness import Bench, GiB, MiB, mib
from bench.images import make_sparse


async def measure(bench: Bench) -> dict[str, Any]:
    tag = int(time.time()) % 100000
    mixed_runs = bench.shared.get("full_sync_rss")
    if not mixed_runs:
        mixed_runs = [await engine_run(bench, source_image(bench), f"mem-{tag}-a", False, bench.opts.size)]
    mixed = {
        "size_gib": round(bench.opts.size / GiB, 3),
        "runs": len(mixed_runs),
        "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] for r in mixed_runs),
        "children_peak_rss_mib": max(r["children_peak_rss_mib"] for r in mixed_runs),
        "worker_and_children_peak_rss_mib": max(r["worker_and_children_peak_rss_mib"] for r in mixed_runs),
    }

    size, data = (1 * GiB, 32 * MiB) if bench.opts.quick else (8 * GiB, 256 * MiB)
    path = bench.dir("sparse") / "sparse.qcow2"
    written = make_sparse(path, size, data)
    pid = bench.worker_pid()
    baseline = mib(_rss(pid)) if pid else None
    try:
        r = await engine_run(bench, path, f"mem-{tag}-sparse", True, size)
    finally:
        path.unlink(missing_ok=True)
    sparse = {
        "size_gib": round(size / GiB, 3),
        "data_mib": mib(written),
        "worker_rss_before_mib": baseline,
        "worker_peak_rss_mib": r["worker_peak_rss_mib"],
        "children_peak_rss_mib": r["children_peak_rss_mib"],
        "worker_and_children_peak_rss_mib": r["worker_and_children_peak_rss_mib"],
        "sync_seconds": r["sync_seconds"],
        "bytes_written": r["bytes_written"],
        "bit_exact": r.get("bit_exact"),
    }
    return {
        "peak_rss_mib": max(mixed["worker_peak_rss_mib"], sparse["worker_peak_rss_mib"]),
        "peak_rss_with_children_mib": max(
            mixed["worker_and_children_peak_rss_mib"], sparse["worker_and_children_peak_rss_mib"]
        ),
        "notes": "peak_rss_mib is the worker process alone (max of both syncs); children = qemu-nbd/qemu-img",
        "mixed": mixed,
        "sparse": sparse,
    }


def _rss(pid: int) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0
