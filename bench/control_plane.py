"""Control plane: many concurrent jobs against one worker and the embedded server.

For each N: N small offline qcow2 disks (16 MiB, 1 MiB of data), N jobs created at once (interval 1h),
all first syncs awaited; then a 64 KiB change on every disk and `sync_now(wait=True)` fired on all jobs
concurrently. Measured over that one cycle: wall time until all finished, per-job cycle time (sync-now
call to result) p50/p95, worker CPU seconds (worker + children, psutil before/after, also apart) and peak RSS
(worker alone; its children apart), the Temporal server's CPU seconds, and from the histories the
queue wait and run time of every step (`where_time_goes`). The jobs are deleted (purged) afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from app import stack
from bench.harness import Bench, KiB, MiB, RssSampler, median, percentile, split_cpu_seconds, tree_cpu_seconds
from bench.history import breakdown, summarize
from bench.images import qcow2, qemu_io, write_small

DISK = 16 * MiB
CHANGE = 64 * KiB


def make_disks(bench: Bench, n: int) -> list[Path]:
    d = bench.dir(f"cp-{n}")
    template = qcow2(d / "template.qcow2", DISK)
    qemu_io(template, ["write -q -P 0x33 0 512k", "write -q -P 0x44 8M 512k"])
    disks = []
    for i in range(n):
        p = d / f"vm{i:03d}.qcow2"
        shutil.copyfile(template, p)
        disks.append(p)
    return disks


def _own_cpu() -> float:
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def _failed(names: list[str], results: list[Any], what: str) -> list[str]:
    return [f"{n} {what}: {r!r}" for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)]


async def one_n(bench: Bench, n: int) -> dict[str, Any]:
    jobs = await bench.client()
    disks = make_disks(bench, n)
    target = bench.dir(f"cp-{n}-rep")
    names = [f"cp{n}-{i:03d}" for i in range(n)]
    failures: list[str] = []
    out: dict[str, Any] = {"jobs": n}
    try:
        t0 = time.monotonic()
        await asyncio.gather(
            *(bench.create(bench.spec(nm, [dk], target)) for nm, dk in zip(names, disks, strict=True))
        )
        poll = 0.5 if n <= 20 else 2.0
        seeds = await asyncio.gather(
            *(bench.wait_syncs(nm, 1, timeout=1200, poll=poll) for nm in names), return_exceptions=True
        )
        failures += _failed(names, seeds, "seed")
        out["seed_wall_seconds"] = round(time.monotonic() - t0, 2)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: write_small(p, 4 * MiB, CHANGE, 0x5A), disks))

        async def cycle(nm: str) -> float:
            s = time.monotonic()
            res = await jobs.sync_now(nm, wait=True)
            if res is None or res.kind != "incremental" or res.bytes_written < CHANGE:
                raise RuntimeError(f"unexpected result {res}")
            return time.monotonic() - s

        pid, server = bench.worker_pid(), stack.status(bench.state).get("server_pid")
        assert pid is not None
        cpu0, srv0, own0 = split_cpu_seconds(pid), tree_cpu_seconds(server or 0), _own_cpu()
        with RssSampler(bench.worker_pid) as rss:
            t1, since = time.monotonic(), time.time()
            results = await asyncio.gather(*(cycle(nm) for nm in names), return_exceptions=True)
            wall = time.monotonic() - t1
        cpu1 = split_cpu_seconds(pid)
        wself, wkids = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        cpu = wself + wkids
        srv_cpu, own_cpu = tree_cpu_seconds(server or 0) - srv0, _own_cpu() - own0
        steps = summarize([await breakdown(jobs, nm, since - 0.5) for nm in names])
        times = [r for r in results if isinstance(r, float)]
        failures += _failed(names, results, "cycle")
        out.update(
            {
                "cycle_wall_seconds": round(wall, 3),
                "p50_cycle_seconds": round(median(times), 3),
                "p95_cycle_seconds": round(percentile(times, 95), 3),
                "max_cycle_seconds": round(max(times, default=0.0), 3),
                "worker_cpu_seconds": round(cpu, 2),
                "worker_cpu_seconds_per_sync": round(cpu / max(1, len(times)), 3),
                "worker_own_cpu_seconds": round(wself, 2),
                "worker_children_cpu_seconds": round(wkids, 2),
                "server_cpu_seconds": round(srv_cpu, 2),
                "bench_client_cpu_seconds": round(own_cpu, 2),
                **rss.report(),
                "where_time_goes": steps,
            }
        )
    finally:
        await asyncio.gather(*(bench.delete(nm, purge=True) for nm in names))
        shutil.rmtree(bench.root / f"cp-{n}", ignore_errors=True)
    out["failures"] = len(failures)
    out["failure_samples"] = failures[:5]
    return out


async def measure(bench: Bench) -> dict[str, Any]:
    sizes = tuple(bench.opts.jobs)
    details: dict[str, Any] = {}
    for n in sizes:
        try:
            details[str(n)] = await one_n(bench, n)
        except Exception as e:  # noqa: BLE001 - a failed N is a figure too; go on with the next
            details[str(n)] = {"jobs": n, "failures": n, "error": f"{type(e).__name__}: {e}"}
    ok = [n for n in sizes if details[str(n)]["failures"] == 0]
    jobs_max = max(ok, default=0)
    return {
        "jobs_tried": list(sizes),
        "jobs_max": jobs_max,
        "p95_cycle_seconds": details[str(jobs_max)]["p95_cycle_seconds"] if jobs_max else None,
        "notes": "cycle = sync_now(wait=True) on every job at once after a 64 KiB write per disk; "
        "CPU = worker + children (psutil, before/after the cycle); RSS sampled every 0.1 s",
        "details": details,
    }
