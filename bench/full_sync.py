"""Full sync throughput: a real job's first sync against nbdcopy and qemu-img convert on the same image.

Each run copies the same source qcow2 (a 40/20/40 random/zero/text mix) four ways, in alternating
order, into a fresh qcow2 target each time:

- engine: a real job (new name per run) on the embedded stack; the copy_disk activity's own duration
  (its ActivityTaskStarted -> Completed events) and the whole sync (SyncResult.seconds);
- nbdcopy: from a `qemu-nbd -r` export into a writable `qemu-nbd` export of a fresh qcow2, with
  `--flush` (the engine flushes the target too) and `--destination-is-zero` (the engine knows a
  fresh replica reads as zeroes too);
- copy engine alone: `sendense.datapath.sync.copy_disk` in the bench process on the same pair of
  exports as nbdcopy, default tuning, flushing at every checkpoint: the data path without the job;
- qemu-img convert -W -m 8 from the same kind of export into a qcow2 file.

Both NBD exports use the engine's own qemu-nbd settings (tools.qemu.start_qemu_nbd), and every
target qcow2 is created with the engine's replica options (connectors.kvm.target.REPLICA_OPTIONS).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from bench.harness import Bench, GiB, RssSampler, median, mib, remove_job_bitmaps
from bench.images import make_mixed, qcow2, run, same_content
from connectors.kvm.offline import NbdSourceDisk
from connectors.kvm.target import REPLICA_OPTIONS, PendingDisk
from sendense.datapath.sync import copy_disk
from sendense.models import DiskSnapshot, Tuning
from tools.qemu import qemu_nbd


def source_image(bench: Bench) -> Path:
    """The shared mixed source image of `--size` (built once per benchmark run)."""
    if "source" not in bench.shared:
        path = bench.dir("src") / "src.qcow2"
        t0 = time.monotonic()
        bench.shared["source_mix"] = make_mixed(path, bench.opts.size)
        bench.shared["source_build_seconds"] = round(time.monotonic() - t0, 2)
        bench.shared["source"] = path
    return Path(bench.shared["source"])


async def engine_run(bench: Bench, src: Path, name: str, verify: bool, size: int) -> dict[str, Any]:
    """One real job's first (full) sync of `src` (virtual size `size`); deleted and purged afterwards."""
    target = bench.dir(f"t-{name}")
    try:
        with RssSampler(bench.worker_pid) as rss:
            # always through copy_disk, the task this measure times (a small disk would be copied
            # inside begin_and_copy: tuning.inline_copy_bytes)
            await bench.create(bench.spec(name, [src], target, inline_copy_bytes=0))
            res = await bench.wait_point(name, target)
        acts = await bench.copy_activities(name)
        act = acts[-1]
        stats = act["result"]["stats"]
        out: dict[str, Any] = {
            "kind": res.kind,
            "copy_seconds": round(act["seconds"], 3),
            "copy_inner_seconds": round(float(stats["seconds"]), 3),
            "sync_seconds": round(res.seconds, 3),
            "gibps": size / GiB / act["seconds"],
            "sync_gibps": size / GiB / res.seconds,
            "bytes_read": res.bytes_read,
            "bytes_written": res.bytes_written,
            "bytes_zeroed": res.bytes_zeroed,
            **rss.report(),
        }
        if verify:
            point = target / name / "disks" / "disk0" / f"{res.point_id}.qcow2"
            out["bit_exact"] = same_content(point, src)
        return out
    finally:
        await bench.delete(name, purge=True)
        remove_job_bitmaps(src, name)


def nbdcopy_run(bench: Bench, src: Path) -> tuple[float, float]:
    """(seconds, CPU seconds of nbdcopy itself)."""
    dst = qcow2(bench.dir("ref") / "nbdcopy.qcow2", bench.opts.size, REPLICA_OPTIONS)  # same kind of target
    try:
        with qemu_nbd(src, readonly=True) as s, qemu_nbd(dst, readonly=False) as d:
            c0 = _cpu(resource.RUSAGE_CHILDREN)  # the exports are reaped later, outside this window
            t0 = time.monotonic()
            run("nbdcopy", "--flush", "--destination-is-zero", s.uri, d.uri)
            return time.monotonic() - t0, _cpu(resource.RUSAGE_CHILDREN) - c0
    finally:
        dst.unlink(missing_ok=True)


def copy_engine_run(bench: Bench, src: Path) -> tuple[float, float]:
    """The copy engine alone (`sendense.datapath.sync.copy_disk`, as a job's copy_disk runs it, with
    default tuning and a checkpoint callback, so the target is flushed at each checkpoint) on the
    same pair as nbdcopy: (seconds, CPU seconds of this process, which does nothing else)."""
    size = bench.opts.size
    dst = qcow2(bench.dir("ref") / "engine.qcow2", size, REPLICA_OPTIONS)
    disk = DiskSnapshot(key="disk0", size=size, change_id="bench")
    try:
        with qemu_nbd(src, readonly=True) as s, qemu_nbd(dst, readonly=False) as d:
            c0 = _cpu(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            with NbdSourceDisk(s.uri, size) as source:
                target = PendingDisk(d.uri, size, has_base=False)
                copy_disk(source, target, disk, Tuning(), on_checkpoint=_no_op)
            return time.monotonic() - t0, _cpu(resource.RUSAGE_SELF) - c0
    finally:
        dst.unlink(missing_ok=True)


def _no_op(*_: object) -> None:
    pass


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def qemu_img_run(bench: Bench, src: Path) -> float:
    dst = bench.dir("ref") / "convert.qcow2"
    try:
        with qemu_nbd(src, readonly=True) as s:
            t0 = time.monotonic()
            run("qemu-img", "convert", "-W", "-m", "8", "-f", "raw", s.uri,
                "-O", "qcow2", "-o", REPLICA_OPTIONS, dst)  # fmt: skip
            return time.monotonic() - t0
    finally:
        dst.unlink(missing_ok=True)


async def measure(bench: Bench) -> dict[str, Any]:
    src = source_image(bench)
    size = bench.opts.size
    runs: list[dict[str, Any]] = []
    tag = int(time.time()) % 100000
    for i in range(bench.opts.runs):
        order = ["engine", "nbdcopy", "copy_engine", "qemu_img"]
        if i % 2:
            order.reverse()
        r: dict[str, Any] = {"order": order}
        for tool in order:
            if tool == "engine":
                r["engine"] = await engine_run(bench, src, f"full-{tag}-{i}", verify=(i == 0), size=size)
            elif tool == "nbdcopy":
                r["nbdcopy_seconds"], r["nbdcopy_cpu_seconds"] = nbdcopy_run(bench, src)
            elif tool == "copy_engine":
                r["copy_engine_seconds"], r["copy_engine_cpu_seconds"] = copy_engine_run(bench, src)
            else:
                r["qemu_img_seconds"] = round(qemu_img_run(bench, src), 3)
        r["nbdcopy_gibps"] = size / GiB / r["nbdcopy_seconds"]
        r["qemu_img_gibps"] = size / GiB / r["qemu_img_seconds"]
        r["ratio_vs_nbdcopy"] = r["engine"]["gibps"] / r["nbdcopy_gibps"]
        r["copy_engine_ratio_vs_nbdcopy"] = r["nbdcopy_seconds"] / r["copy_engine_seconds"]
        runs.append(r)

    bench.shared["full_sync_rss"] = [r["engine"] for r in runs]
    first = runs[0]["engine"]
    return {
        "size_gib": round(size / GiB, 3),
        "source_mix_mib": {k: mib(v) for k, v in bench.shared["source_mix"].items()},
        "runs_count": len(runs),
        "engine_gibps": round(median([r["engine"]["gibps"] for r in runs]), 3),
        "engine_sync_gibps": round(median([r["engine"]["sync_gibps"] for r in runs]), 3),
        "nbdcopy_gibps": round(median([r["nbdcopy_gibps"] for r in runs]), 3),
        "qemu_img_gibps": round(median([r["qemu_img_gibps"] for r in runs]), 3),
        "ratio_vs_nbdcopy": round(median([r["ratio_vs_nbdcopy"] for r in runs]), 3),
        "ratio_vs_qemu_img": round(median([r["engine"]["gibps"] / r["qemu_img_gibps"] for r in runs]), 3),
        "copy_engine_gibps": round(median([size / GiB / r["copy_engine_seconds"] for r in runs]), 3),
        "copy_engine_ratio_vs_nbdcopy": round(median([r["copy_engine_ratio_vs_nbdcopy"] for r in runs]), 3),
        "copy_engine_cpu_seconds": round(median([r["copy_engine_cpu_seconds"] for r in runs]), 3),
        "nbdcopy_cpu_seconds": round(median([r["nbdcopy_cpu_seconds"] for r in runs]), 3),
        "copy_seconds_median": round(median([r["engine"]["copy_seconds"] for r in runs]), 3),
        "sync_seconds_median": round(median([r["engine"]["sync_seconds"] for r in runs]), 3),
        "bytes_written": first["bytes_written"],
        "bit_exact": bool(first.get("bit_exact")),
        "notes": "GiB/s = virtual size / seconds; engine_gibps uses the copy_disk activity's own duration "
        "(history events), engine_sync_gibps the whole sync; ratio = median of per-run ratios; "
        "nbdcopy runs with --flush --destination-is-zero; copy_engine = sync.copy_disk alone on the same "
        "pair as nbdcopy (no job: no snapshot, export start/stop or heartbeats); *_cpu_seconds = the "
        "copier's own CPU (not the qemu-nbd exports')",
        "runs": [_round(r) for r in runs],
    }


def _round(d: Any) -> Any:
    if isinstance(d, float):
        return round(d, 3)
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_round(v) for v in d]
    return d
