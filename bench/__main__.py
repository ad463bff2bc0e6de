"""The benchmark suite: `python -m bench [--quick] [--size 2G] [--runs 3] [--jobs 50,100] [--only ...]`.

Runs the measures on one embedded stack (real Temporal dev server, real worker) in a temporary
SENDENSE_HOME on free ports, prints a table of figures and goals, and writes everything as JSON.
`--quick` is a smoke run (tiny disks, one run, 5 and 10 jobs) for CI; no speed figure ever fails it.
`--soak [--seed N] [--steps N] [--target kvm|aws|all]` runs the scenario runner instead (bench/soak.py).
Exit status: 0, or 1 if a measure failed or replicated data that is not bit-exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import control_plane, drill, full_sync, incremental, memory, resume, vsphere
from bench.harness import Bench, MiB, Options, parse_size
from bench.report import evaluate, machine, print_table

MEASURES: dict[str, Callable[[Bench], Awaitable[dict[str, Any]]]] = {
    "full_sync": full_sync.measure,  # first: builds the source and records the worker RSS of its syncs
    "memory": memory.measure,
    "incremental": incremental.measure,  # churns the shared source, so after the full syncs
    "control_plane": control_plane.measure,
    "drill": drill.measure,  # the bootable guest to KVM and the AWS lab, then drills of each
    "vsphere": vsphere.measure,  # a VMware source's full copy through the vSphere lab, against nbdcopy
    "resume": resume.measure,  # last: restarts the worker
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run for CI: tiny disks, 1 run, 5/10 jobs")
    p.add_argument("--size", help="full sync disk size (default 2G; quick 64M)")
    p.add_argument("--runs", type=int, help="runs per comparison, drills per target (default 3; quick 1)")
    p.add_argument("--jobs", help="control plane job counts, comma-separated (default 50,100; quick 5,10)")
    p.add_argument("--only", help=f"comma-separated subset of: {','.join(MEASURES)}")
    p.add_argument("--out", help="JSON output file (default bench/results/latest.json; soak: soak.json)")
    p.add_argument("--soak", action="store_true", help="long scenario runner run (tests/scenarios)")
    p.add_argument("--seed", type=int, default=None, help="soak: first seed (default: from the clock)")
    p.add_argument("--steps", type=int, default=2000, help="soak: step budget over all targets")
    p.add_argument("--target", default="kvm", choices=["kvm", "aws", "all"], help="soak: target(s)")
    return p.parse_args(argv)


def _bad_exactness(results: dict[str, Any]) -> list[str]:
    bad = []
    for name, r in results.items():
        if isinstance(r, dict) and r.get("bit_exact") is False:
            bad.append(name)
        sparse = r.get("sparse") if isinstance(r, dict) else None
        if isinstance(sparse, dict) and sparse.get("bit_exact") is False:
            bad.append(f"{name}.sparse")
    return bad


async def run_all(bench: Bench, names: list[str], console: Console) -> None:
    for name in names:
        console.print(f"[bold]bench[/]: {name} ...")
        t0 = time.monotonic()
        try:
            bench.results[name] = await MEASURES[name](bench)
        except Exception as e:  # noqa: BLE001 - report the failure, go on with the other measures
            bench.results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            console.print(f"[red]bench: {name} FAILED: {type(e).__name__}: {e}[/]")
        bench.results[name]["seconds"] = round(time.monotonic() - t0, 1)
        console.print(f"bench: {name} done in {bench.results[name]['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.soak:
        from bench.soak import soak

        targets = ["kvm", "aws"] if args.target == "all" else [args.target]
        seed = args.seed if args.seed is not None else int(time.time()) % 100000
        return soak(seed, args.steps, targets, Path(args.out or "bench/results/soak.json"))
    console = Console(stderr=True)
    out_console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = list(MEASURES)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in MEASURES]
        if unknown:
            console.print(
                f"error: --only: unknown measure {', '.join(unknown)} (know: {', '.join(MEASURES)})"
            )
            return 2
        names = [n for n in MEASURES if n in wanted]
    opts = Options(
        quick=args.quick,
        size=parse_size(args.size) if args.size else (64 * MiB if args.quick else 2 << 30),
        runs=args.runs or (1 if args.quick else 3),
        only=names,
        jobs=[int(n) for n in args.jobs.split(",")] if args.jobs else ([5, 10] if args.quick else [50, 100]),
    )
    started = datetime.now(UTC)
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "bench", *(argv or sys.argv[1:])]),
        "started_at": started.isoformat(timespec="seconds"),
        "quick": opts.quick,
        "options": {"size": opts.size, "runs": opts.runs, "jobs": opts.jobs, "only": names},
        "machine": machine(),
    }
    with Bench.start(opts) as bench:
        report["stack"] = {"state_dir": str(bench.state), "host_id": bench.host_id}
        asyncio.run(run_all(bench, names, console))
        results = bench.results
    report.update(results)
    report["goals"] = evaluate(results)
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out or "bench/results/latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    title = f"Sendense benchmark ({'quick' if opts.quick else 'full'}, {report['wall_seconds']} s)"
    print_table(report["goals"], out_console, title)
    out_console.print(f"results: {out}")
    failed = [n for n in names if "error" in results.get(n, {})]
    bad = _bad_exactness(results)
    if bad:
        console.print(f"[bold red]bench: NOT BIT-EXACT: {', '.join(bad)} replicated wrong data[/]")
    if failed:
        console.print(f"[red]bench: failed measures: {', '.join(failed)}[/]")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
