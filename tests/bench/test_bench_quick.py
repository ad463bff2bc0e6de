"""The benchmark suite's smoke run: `python -m bench --quick` must run end to end and report every figure.

Speed goals are never asserted here (CI runs on noisy shared machines); only that every measure ran,
every key is present with a sane value, and every replicated point was bit-exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

POSITIVE = [
    "full_sync.engine_gibps",
    "full_sync.engine_sync_gibps",
    "full_sync.nbdcopy_gibps",
    "full_sync.qemu_img_gibps",
    "full_sync.ratio_vs_nbdcopy",
    "full_sync.copy_engine_gibps",
    "full_sync.copy_engine_ratio_vs_nbdcopy",
    "full_sync.copy_engine_cpu_seconds",
    "full_sync.nbdcopy_cpu_seconds",
    "incremental.overhead_ratio",
    "control_plane.jobs_max",
    "control_plane.p95_cycle_seconds",
    "memory.peak_rss_mib",
    "memory.mixed.worker_peak_rss_mib",
    "memory.mixed.worker_and_children_peak_rss_mib",
    "memory.sparse.worker_peak_rss_mib",
    "memory.sparse.worker_and_children_peak_rss_mib",
    *(f"drill.{t}.{k}" for t in ("kvm", "aws") for k in ("rto_seconds", "drill_seconds", "boot_seconds")),
]
BIT_EXACT = ["full_sync.bit_exact", "incremental.bit_exact", "memory.sparse.bit_exact", "resume.bit_exact"]
DRILL_STEPS = [
    "choose_point",
    "hold_point",
    "create_vm",
    "power_on",
    "boot_check",
    "destroy_vm",
    "release_point",
]


def get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        assert isinstance(d, dict) and part in d, f"missing key {dotted} (at {part})"
        d = d[part]
    return d


def number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,  # ~60 s on a quiet 2-core machine, ~90 s with other work on it
    )
    assert out.exists(), f"no results written (exit {p.returncode}): {p.stderr[-3000:]}"
    r = json.loads(out.read_text())
    for name in ("full_sync", "incremental", "control_plane", "memory", "resume", "drill"):
        assert "error" not in r[name], f"{name} failed: {r[name].get('traceback') or r[name]['error']}"
    assert p.returncode == 0, p.stderr[-3000:]

    assert r["quick"] is True and "bench" in r["command"]
    m = r["machine"]
    assert m["nproc"] >= 1 and m["ram_gib"] > 0 and m["kernel"]
    assert "qemu-img" in m["qemu_img"] and "nbdcopy" in m["nbdcopy"]

    for key in POSITIVE:
        v = get(r, key)
        assert number(v) and v > 0, f"{key} = {v!r}"
    for key in BIT_EXACT:
        assert get(r, key) is True, f"{key} is not true: replicated data differs"

    # incremental: every churn point synced incrementally and wrote at least what changed
    assert 0 < get(r, "incremental.reduction_1pct") < 1
    for name, point in get(r, "incremental.churn").items():
        assert point["kind"] == "incremental", name
        assert point["bytes_written"] >= point["bytes_changed"] > 0, name
        assert point["bit_exact"] is True, name

    # control plane: 5 and 10 jobs, both completed
    assert get(r, "control_plane.jobs_max") == 10
    for n in ("5", "10"):
        d = get(r, f"control_plane.details.{n}")
        assert d["failures"] == 0 and d["worker_cpu_seconds"] > 0
        assert 0 < d["p50_cycle_seconds"] <= d["p95_cycle_seconds"] <= d["cycle_wall_seconds"] + 0.01

    # resume: the kill hit the copy mid-way and the retry resumed from a heartbeated offset
    res = r["resume"]
    assert number(res["recopied_mib"]) and res["recopied_mib"] >= 0
    assert res["recopied_is_lower_bound"] is True
    assert res["copy_attempt"] >= 3 and res["resumed_from_mib"] > 0
    assert res["resume_token_consistent"] is True
    for key in ("recopied_estimate_mib", "recopied_mid_window_estimate_mib"):
        assert number(res[key]) and res[key] >= 0, key
    assert res["mid_window"]["resumed_from_mib"] >= res["resumed_from_mib"]

    # where the control plane's time goes: every step of a sync shows up in the histories (one host
    # queue serves both ends here and the changes are small: snapshot, prepare, copy, commit and
    # release are one task, one workflow task per sync besides the update's)
    steps = get(r, "control_plane.details.10.where_time_goes.steps")
    for step in ("begin_and_copy", "workflow_task"):
        assert steps[step]["count"] >= 10, step
    assert "copy_disk" not in steps and "finish_sync" not in steps

    # drills: one per target, booted the guest from the job's point and left nothing; every step of the
    # saga shows in the history, in order, and the figures are consistent with one another
    d = get(r, "drill")
    assert d["ok"] is True and d["accelerator"] in ("kvm", "tcg")
    for t in ("kvm", "aws"):
        [run] = d[t]["runs"]
        assert run["boot_ok"] and run["boot_evidence"] == "SENDENSE-GUEST-READY", run
        assert run["cleaned"] and run["left_behind"] == [] and run["problems"] == [], run
        assert list(run["steps"]) == [*DRILL_STEPS, "report"], t
        assert 0 <= run["cleanup_seconds"] and run["rto_seconds"] <= run["drill_seconds"], run
        steps = sum(s["seconds"] for s in run["steps"].values())
        assert abs(steps - run["drill_seconds"]) < 0.01, (t, steps, run["drill_seconds"])
        fb = d[t]["failback"]  # the failover that followed, failed back; its ratio is a figure, not asserted
        assert fb["problems"] == [] and fb["syncs"] >= 2 and fb["vm_wrote_bytes"] > 0, fb
        assert fb["bytes_written"] > 0 and number(fb["ratio"]), fb
        assert fb["cutover_seconds"] is not None and fb["reverse_syncs"][-1]["cutover"] is True, fb

    # every figure has its goal evaluated (met or not: never asserted)
    for key, g in r["goals"].items():
        assert g["value"] is not None, key
