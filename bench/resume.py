"""Resume: bytes copied again after the worker is killed mid-sync.

A full sync of an all-random disk (256 MiB; quick: 128 MiB) throttled to last ~10 s (quick: ~4 s),
heartbeat_timeout 5s (quick: 8 MiB checkpoints too, or the copy is over before a heartbeat shows).

Kill 1 (the figure `recopied_mib`): as soon as the copy's heartbeat shows an offset past 30%, the worker
is SIGKILLed (stack.restart_worker) and the pending overlay mapped at once (`qemu-img map -U`): what
attempt 1 had written. The offset each retry resumed from is read from the worker log (the server's
token can be older: the worker keeps its own), the last one checked against the final copy_disk
result's `resumed_from`. Re-copied = data in the overlay at or beyond that offset. A lower bound:
qcow2 metadata cached in the killed qemu-nbd never reached the file, so data written after the last
flush does not show in the map; `recopied_estimate_mib` adds the overlay file's tail beyond its last
mapped cluster (qcow2 appends new clusters), i.e. that unflushed data.

A heartbeat is published right after a flush, so kill 1 is the best case. Kill 2 (`mid_window`) hits
attempt 2 half a checkpoint window after its first heartbeat, the expected case. The point is then
checked bit-exact.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

from app import stack
from bench.harness import Bench, MiB, mib, remove_job_bitmaps
from bench.images import bytes_at_or_beyond, data_ranges, make_random, unmapped_tail
from bench.incremental import verify_point
from sendense.datapath.copy import CopyPlan
from sendense.models import CopyToken, Tuning

KILL_AT = 0.30


async def _wait_offset(bench: Bench, name: str, lo: float, size: int) -> CopyToken:
    """Poll the copy's heartbeat until its offset is in [lo, size); fail if the copy got past it."""
    jobs = await bench.client()
    h = jobs.handle(name)
    deadline = time.monotonic() + 120
    while True:
        tok = (await jobs.copy_progress(h)).get("disk0")
        if tok is not None and lo <= tok.offset < size:
            return tok
        if tok is not None and tok.offset >= size or time.monotonic() > deadline:
            raise TimeoutError(f"job {name}: no heartbeat caught the copy between {lo / size:.0%} and 100%")
        await asyncio.sleep(0.1)


async def _kill(bench: Bench, name: str, pending: Path) -> dict[str, Any]:
    """SIGKILL the worker (a new one starts), map the pending overlay at once, read the resume token."""
    t0, wall = time.monotonic(), time.time()
    stack.restart_worker(bench.state, signal.SIGKILL)
    ranges = data_ranges(pending)
    tail = unmapped_tail(pending)
    mapped_after = time.monotonic() - t0
    jobs = await bench.client()
    # the token the server holds (no attempt runs before heartbeat_timeout); the retry may resume
    # from a newer one (the worker also keeps it locally): its log line says, see _resume_offsets
    tok = (await jobs.copy_progress(jobs.handle(name))).get("disk0")
    return {
        "wall": wall,
        "ranges": ranges,
        "tail": tail,
        "mapped_after": mapped_after,
        "server_token": tok.offset if tok else 0,
    }


def _resume_offsets(bench: Bench, sync_id: str) -> list[int]:
    """Offsets the retries of this sync's copy resumed from, in order, from the worker log."""
    log = bench.state / "logs" / "worker.log"
    pat = re.compile(rf"resuming disk disk0 of {re.escape(sync_id)} at offset (\d+)")
    return [int(m.group(1)) for m in pat.finditer(log.read_text(errors="replace"))]


async def measure(bench: Bench) -> dict[str, Any]:
    size, seconds = (128 * MiB, 4.0) if bench.opts.quick else (256 * MiB, 10.0)
    limit = max(MiB, int(size / seconds))
    # the default checkpoints (64 MiB or 2 s) are too coarse to catch a 4 s copy mid-way, twice
    # inline_copy_bytes=0: the copy runs in copy_disk (resume tokens), whatever the disk's size
    tuning: dict[str, Any] = {"bandwidth_limit": limit, "heartbeat_timeout": "5s", "inline_copy_bytes": 0}
    if bench.opts.quick:
        tuning["checkpoint_bytes"] = 8 * MiB
    ck_bytes = tuning.get("checkpoint_bytes", Tuning().checkpoint_bytes)
    window = min(ck_bytes / limit, float(getattr(CopyPlan, "checkpoint_seconds", 2.0)))
    work = bench.dir("resume")
    src = make_random(work / "disk.qcow2", size)
    name = f"resume-{int(time.time()) % 100000}"
    target = bench.dir(f"t-{name}")
    try:
        await bench.create(bench.spec(name, [src], target, **tuning))
        # kill 1, as specified: as soon as the heartbeat shows an offset past 30%
        tok = await _wait_offset(bench, name, KILL_AT * size, size)
        pending = sorted((target / name / "disks" / "disk0").glob("*.pending.qcow2"))[-1]
        k1 = await _kill(bench, name, pending)
        # kill 2: once the retry has heartbeated, half a checkpoint window later
        tok2 = await _wait_offset(bench, name, k1["server_token"] + 1, size)
        await asyncio.sleep(window / 2)
        k2 = await _kill(bench, name, pending)

        res = await bench.wait_syncs(name, 1, timeout=300, poll=0.1)
        done_after = time.time() - k2["wall"]
        act = (await bench.copy_activities(name))[-1]
        if act["attempt"] < 3:
            raise RuntimeError(
                f"job {name}: a kill missed the copy (it completed in attempt {act['attempt']})"
            )
        resumed_from = int(act["result"]["resumed_from"])
        logged = _resume_offsets(bench, pending.name.removesuffix(".pending.qcow2"))
        r1 = logged[0] if logged else k1["server_token"]
        r2 = logged[1] if len(logged) > 1 else resumed_from
        recopied = bytes_at_or_beyond(k1["ranges"], r1)
        # kill 2: count only what attempt 2 wrote (not attempt 1's leftovers) beyond its resume point
        recopied2 = max(0, bytes_at_or_beyond(k2["ranges"], r2) - bytes_at_or_beyond(k1["ranges"], r2))
        exact = verify_point(name, target, res.point_id, src, work)
    finally:
        await bench.delete(name, purge=True)
        remove_job_bitmaps(src, name)
        src.unlink(missing_ok=True)

    return {
        "recopied_mib": mib(recopied),
        "recopied_is_lower_bound": True,
        "recopied_estimate_mib": mib(recopied + k1["tail"]),
        "recopied_mid_window_estimate_mib": mib(recopied2 + k2["tail"]),
        "disk_mib": mib(size),
        "bandwidth_limit_mib_s": mib(limit),
        "tuning": tuning,
        "heartbeat_offset_at_kill_mib": mib(tok.offset),
        "pending_data_at_kill_mib": mib(sum(n for _, n in k1["ranges"])),
        "unflushed_tail_at_kill_mib": mib(k1["tail"]),
        "mapped_seconds_after_kill": round(k1["mapped_after"], 2),
        "resumed_from_mib": mib(r1),
        "server_token_at_kill_mib": mib(k1["server_token"]),
        "mid_window": {
            "kill_delay_after_heartbeat_s": round(window / 2, 3),
            "checkpoint_window_s": round(window, 3),
            "heartbeat_offset_mib": mib(tok2.offset),
            "recopied_mib": mib(recopied2),
            "unflushed_tail_mib": mib(k2["tail"]),
            "resumed_from_mib": mib(r2),
            "server_token_at_kill_mib": mib(k2["server_token"]),
        },
        "resume_offsets_logged_mib": [mib(x) for x in logged],
        "final_resumed_from_mib": mib(resumed_from),
        "resume_token_consistent": resumed_from == r2,
        "copy_attempt": act["attempt"],
        "engine_reported_recopied_mib": mib(int(act["result"]["stats"].get("recopied", 0))),
        "sync_seconds": round(res.seconds, 2),
        "after_kill_seconds": {
            "retry_started": round(act["started"] - k2["wall"], 2),
            "copy_completed": round(act["completed"] - k2["wall"], 2),
            "sync_seen_done": round(done_after, 2),
        },
        "bytes_written": res.bytes_written,
        "bit_exact": exact,
        "notes": "re-copied = data the killed attempt had in the pending overlay at or beyond resumed_from "
        "(qemu-img map -U right after the kill); a lower bound: qcow2 metadata cached in the killed "
        "qemu-nbd is lost, so unflushed writes may not show; recopied_estimate_mib adds the overlay "
        "file's tail beyond its last mapped cluster (data written after the last flush); kill 1 follows "
        "a heartbeat (= a flush) at once, the best case; mid_window kills half a checkpoint window later",
    }
