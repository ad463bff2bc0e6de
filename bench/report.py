"""Goals, the results table, and the machine the figures were taken on."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from bench.images import tool_version


@dataclass(frozen=True)
class Figure:
    key: str  # dotted path into the results
    label: str
    goal: str = ""
    met: Callable[[Any, dict[str, Any]], bool] | None = None


def _at_most(limit: float) -> Callable[[Any, dict[str, Any]], bool]:
    return lambda v, _: bool(v <= limit)


def _at_least(limit: float) -> Callable[[Any, dict[str, Any]], bool]:
    return lambda v, _: bool(v >= limit)


def _true(v: Any, _: dict[str, Any]) -> bool:
    return v is True


def _cp_p95(v: Any, r: dict[str, Any]) -> bool:
    return v is not None and get(r, "control_plane.jobs_max") >= 100 and v <= 5.0


FIGURES: list[Figure] = [
    Figure("full_sync.engine_gibps", "full sync: engine copy_disk GiB/s"),
    Figure("full_sync.engine_sync_gibps", "full sync: engine whole sync GiB/s"),
    Figure("full_sync.nbdcopy_gibps", "full sync: nbdcopy GiB/s"),
    Figure("full_sync.qemu_img_gibps", "full sync: qemu-img convert GiB/s"),
    Figure(
        "full_sync.ratio_vs_nbdcopy",
        "full sync: engine / nbdcopy",
        ">= 1.0 (stretch 1.5)",
        _at_least(1.0),
    ),
    Figure("full_sync.copy_engine_ratio_vs_nbdcopy", "full sync: copy engine alone / nbdcopy"),
    Figure("full_sync.copy_engine_cpu_seconds", "full sync: copy engine alone, own CPU s"),
    Figure("full_sync.nbdcopy_cpu_seconds", "full sync: nbdcopy, own CPU s"),
    Figure("full_sync.bit_exact", "full sync: bit-exact", "true", _true),
    Figure("incremental.overhead_ratio", "incremental: overhead (worst)", "<= 1.05", _at_most(1.05)),
    Figure("incremental.reduction_1pct", "incremental: reduction at 1%", ">= 0.95", _at_least(0.95)),
    Figure("incremental.bit_exact", "incremental: bit-exact (all points)", "true", _true),
    Figure("control_plane.jobs_max", "control plane: jobs_max", ">= 100", _at_least(100)),
    Figure("control_plane.p95_cycle_seconds", "control plane: p95 cycle s", "<= 5 at 100 jobs", _cp_p95),
    Figure("memory.mixed.worker_peak_rss_mib", "memory: worker peak MiB (mixed)", "<= 300", _at_most(300)),
    Figure(
        "memory.sparse.worker_peak_rss_mib",
        "memory: worker peak MiB (sparse)",
        "<= 300",
        _at_most(300),
    ),
    Figure("memory.peak_rss_mib", "memory: worker peak MiB (max)", "<= 300", _at_most(300)),
    Figure("resume.recopied_mib", "resume: re-copied MiB (lower bound)", "<= 64", _at_most(64)),
    Figure("resume.recopied_estimate_mib", "resume: re-copied MiB (+unflushed)", "<= 64", _at_most(64)),
    Figure(
        "resume.recopied_mid_window_estimate_mib",
        "resume: re-copied MiB, mid-window kill",
        "<= 64",
        _at_most(64),
    ),
    Figure("resume.bit_exact", "resume: bit-exact", "true", _true),
    *(
        f
        for t, name in (("kvm", "KVM"), ("aws", "AWS lab"))
        for f in (
            Figure(f"drill.{t}.rto_seconds", f"drill ({name}): RTO s, to booted", "<= 900", _at_most(900)),
            Figure(f"drill.{t}.drill_seconds", f"drill ({name}): whole drill s"),
            Figure(f"drill.{t}.boot_seconds", f"drill ({name}): boot s (power-on)"),
            Figure(f"drill.{t}.cleanup_seconds", f"drill ({name}): cleanup s"),
            Figure(
                f"drill.{t}.failover.rto_seconds",
                f"failover ({name}): RTO s, request to booted",
                "<= 900",
                _at_most(900),
            ),
            Figure(
                f"drill.{t}.failback.ratio",
                f"failback ({name}): bytes written / VM wrote",
                "<= 1.1",
                _at_most(1.1),
            ),
            Figure(f"drill.{t}.failback.cutover_seconds", f"failback ({name}): cutover s (VM down)"),
            Figure(f"drill.{t}.failback.failback_seconds", f"failback ({name}): whole failback s"),
        )
    ),
    Figure("drill.ok", "drill: all booted, nothing left", "true", _true),
    Figure("vsphere.engine_gibps", "vSphere source (lab VDDK stand-in): engine GiB/s"),
    Figure("vsphere.nbdcopy_gibps", "vSphere source: nbdcopy from the same export GiB/s"),
    Figure("vsphere.ratio_vs_nbdcopy", "vSphere source: engine / nbdcopy"),
    Figure("vsphere.bit_exact", "vSphere source: bit-exact", "true", _true),
]


def get(results: dict[str, Any], dotted: str) -> Any:
    cur: Any = results
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def evaluate(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every figure with its goal and whether it is met (None: no goal, or not measured)."""
    out: dict[str, dict[str, Any]] = {}
    for f in FIGURES:
        v = get(results, f.key)
        met = None
        if f.met is not None and v is not None:
            try:
                met = bool(f.met(v, results))
            except TypeError:
                met = False
        out[f.key] = {"label": f.label, "value": v, "goal": f.goal or None, "met": met}
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "FALSE"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def print_table(goals: dict[str, dict[str, Any]], console: Console, title: str) -> None:
    t = Table(title=title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("goal")
    t.add_column("met?")
    for g in goals.values():
        met = {None: "", True: "[green]yes[/]", False: "[red]no[/]"}[g["met"]]
        if g["label"].endswith("engine / nbdcopy") and g["value"] is not None and g["value"] >= 1.5:
            met = "[green]yes (stretch)[/]"
        t.add_row(g["label"], _cell(g["value"]), g["goal"] or "", met)
    console.print(t)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "cpu_model": model or platform.processor(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "qemu_img": tool_version("qemu-img", "--version"),
        "qemu_nbd": tool_version("qemu-nbd", "--version"),
        "nbdcopy": tool_version("nbdcopy", "--version"),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
