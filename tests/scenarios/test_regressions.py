"""Every failure the scenario runner found, kept as the minimal step sequence that reproduced it and
replayed on the real system with every check after every step (rig.py documents the steps).

Each case names what it found: an item of issue 9 (fixed by its owner; the runner reproduced it
before the fix landed) or a fault beyond that list (fixed with the case)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from scenarios.machine import OPEN_DEFECTS
from scenarios.rig import MiB, Scenario

TUNING: dict[str, Any] = {"chunk_size": 256 << 10, "connections": 2, "checkpoint_bytes": 1 * MiB}

CASES: dict[str, tuple[str, int, list[list[Any]]]] = {
    # name: (what it found, retention, steps)
    "restarted_first_sync_after_zeroing": (
        "issue 9 item 2 (KVM) / item 9 (AWS): a retried begin reused the failed attempt's replica; the "
        "full copy skips zero ranges, so the point kept the old bytes",
        3,
        [
            ["add_disk", 4 * MiB],
            ["write", 0, 0, 2 * MiB, 0x11],
            ["begin", "inline", 64 * MiB, 1],
            ["zero", 0, 0, 2 * MiB],
            ["begin", "inline", 64 * MiB, 0],
        ],
    ),
    "retried_incremental_after_discard": (
        "issue 9 item 9 (AWS): a retried incremental kept a block the failed attempt wrote",
        3,
        [
            ["add_disk", 4 * MiB],
            ["write", 0, 0, 1 * MiB, 0x11],
            ["begin", "inline", 64 * MiB, 0],
            ["write", 0, 2 * MiB, 1 * MiB, 0xEE],
            ["begin", "split", 0, 0],
            ["copy", "raise", 1],
            ["fail"],
            ["discard", 0, 2 * MiB, 1 * MiB],
            ["begin", "inline", 64 * MiB, 1],
            ["begin", "inline", 64 * MiB, 0],
        ],
    ),
    "failed_copy_leaves_resume_tokens": (
        "beyond issue 9: a sync whose copy_disk failed left its resume token for good (abort and "
        "release did not remove it; only a later copy_disk did, and an inline sync never does)",
        4,
        [
            ["add_disk", 2 * MiB],
            ["add_disk", 2 * MiB],
            ["write", 0, 0, 1 * MiB, 0x10],
            ["write", 1, 0, 1 * MiB, 0x11],
            ["begin", "inline", 1 * MiB, 0],
            ["copy", "raise", 1],
            ["fail"],
        ],
    ),
    "shrink_then_prune": (
        "issue 9 item 3: a shrunk disk's point kept its old size and bytes after the prune merge",
        1,
        [
            ["add_disk", 5 * MiB + 4096],
            ["write", 0, 0, 5 * MiB + 4096, 0x21],
            ["begin", "inline", 64 * MiB, 0],
            ["resize", 0, 2 * MiB],
            ["begin", "inline", 64 * MiB, 0],
            ["resize", 0, 4 * MiB],
            ["begin", "split", 0, 0],
            ["copy", "none", 0],
            ["finish"],
        ],
    ),
    "shrink_then_grow": (
        "issue 9 item 4 (AWS): the regrown area read the parent snapshot's old blocks, not zeros",
        3,
        [
            ["add_disk", 4 * MiB],
            ["write", 0, 0, 4 * MiB, 0x31],
            ["begin", "inline", 64 * MiB, 0],
            ["resize", 0, 2 * MiB],
            ["begin", "inline", 64 * MiB, 0],
            ["resize", 0, 4 * MiB],
            ["begin", "inline", 64 * MiB, 0],
            ["retention", 1],
            ["prune"],
        ],
    ),
    "a_middle_disk_removed": (
        "issue 9 item 7 (stopped-VM form): the disk that moved into a removed disk's key ran "
        "incremental against the other disk's replica",
        3,
        [
            ["add_disk", 2 * MiB],
            ["add_disk", 2 * MiB],
            ["add_disk", 2 * MiB],
            ["write", 0, 0, 1 * MiB, 0x40],
            ["write", 1, 0, 1 * MiB, 0x41],
            ["write", 2, 0, 1 * MiB, 0x42],
            ["begin", "inline", 64 * MiB, 0],
            ["remove_disk", 1],
            ["write", 1, 4096, 512, 0x43],
            ["begin", "inline", 64 * MiB, 0],
        ],
    ),
    "copy_worker_killed_and_resumed": (
        "the copy worker SIGKILLed mid-copy, its retry resumed from the token, writes between syncs",
        2,
        [
            ["add_disk", 5 * MiB + 4096],
            ["write", 0, 0, 5 * MiB, 0x51],
            ["begin", "split", 0, 0],
            ["copy", "kill", 2],
            ["copy", "kill", 1],
            ["copy", "none", 0],
            ["finish"],
            ["zero", 0, 1 * MiB, 2 * MiB + 512],
            ["write", 0, 4 * MiB, 3 * 512, 0x52],
            ["begin", "split", 0, 0],
            ["copy", "kill", 1],
            ["copy", "none", 0],
            ["finish"],
        ],
    ),
    "grow_after_shrink_between_syncs": (
        "beyond issue 9's list, found by the runner (fixed by the KVM sources' shrink markers, f374be9): "
        "shrunk and grown back between two syncs, the disk reads zeros beyond the shrunk size; the "
        "incremental kept the old bytes (qemu-img resize marks nothing dirty)",
        3,
        [
            ["add_disk", 4 * MiB],
            ["write", 0, 0, 4 * MiB, 0x71],
            ["begin", "inline", 64 * MiB, 0],
            ["resize", 0, 2 * MiB],
            ["resize", 0, 4 * MiB],
            ["begin", "inline", 64 * MiB, 0],
        ],
    ),
    "grow_after_shrink_between_snapshot_and_copy": (
        "beyond issue 9's list, found by the runner (fixed by the shrink markers, f374be9): shrunk and "
        "grown back between the snapshot and the copy, the copy was not refused and read zeros where "
        "the snapshot had data; now refused, and the next snapshot's point is exact",
        3,
        [
            ["add_disk", 4 * MiB],
            ["write", 0, 0, 4 * MiB, 0x72],
            ["begin", "split", 0, 0],
            ["resize", 0, 2 * MiB],
            ["resize", 0, 4 * MiB],
            ["copy", "none", 0],
            ["fail"],
            ["begin", "inline", 64 * MiB, 0],
        ],
    ),
    "export_while_pruning": (
        "issue 9 item 5: an export of the point being pruned read half of it and half of the next",
        3,
        [
            ["add_disk", 4 * MiB],
            ["add_disk", 4 * MiB],
            ["write", 0, 0, 4 * MiB, 0x61],
            ["write", 1, 0, 4 * MiB, 0x62],
            ["begin", "inline", 64 * MiB, 0],
            ["write", 0, 0, 4 * MiB, 0x63],
            ["write", 1, 0, 4 * MiB, 0x64],
            ["begin", "inline", 64 * MiB, 0],
            ["export_during_prune"],
            ["write", 0, 0, 4 * MiB, 0x65],
            ["write", 1, 0, 4 * MiB, 0x66],
            ["begin", "inline", 64 * MiB, 0],
            ["write", 0, 0, 4 * MiB, 0x67],
            ["begin", "inline", 64 * MiB, 0],
            ["export_during_prune"],
        ],
    ),
}


# the running-VM form (a lab QEMU over QMP): its disk list is fixed, it restarts, writes go through
# its devices, a snapshot is QEMU's own (writes after it are fine)
QMP_CASES: dict[str, tuple[str, int, list[list[Any]]]] = {
    "running_vm_restarted_with_disks_swapped": (
        "issue 9 item 7: disks swapped behind node names after a restart ran incremental against the "
        "other disk's bitmap; now a resync with the reason, and exact",
        3,
        [
            ["add_disk", 2 * MiB],
            ["add_disk", 3 * MiB + 512],
            ["write", 0, 0, 1 * MiB, 0x81],
            ["write", 1, 4096, 2 * MiB, 0x82],
            ["begin", "inline", 64 * MiB, 0],
            ["restart", 0, 1],
            ["write", 0, 65536, 4096, 0x83],
            ["begin", "split", 0, 0],
            ["write", 1, 0, 1 * MiB, 0x84],
            ["copy", "kill", 1],
            ["copy", "none", 0],
            ["copy", "none", 0],
            ["finish"],
            ["restart", 0, 0],
            ["resize", 1, 4 * MiB],
            ["zero", 1, 0, 3 * MiB],
            ["begin", "inline", 1 * MiB, 1],
            ["begin", "inline", 64 * MiB, 0],
        ],
    ),
}


def replay(root: Path, target: tuple[str, Any], case: str) -> None:
    kind, lab = target
    source = "qmp" if case in QMP_CASES else "disks"
    _, keep, steps = QMP_CASES[case] if source == "qmp" else CASES[case]
    sc = Scenario(root, kind, lab, keep=keep, tuning=TUNING, source=source)
    try:
        sc.replay(steps)
    finally:
        sc.close()


def open_defect(case: str) -> str | None:
    """The open defect (machine.OPEN_DEFECTS) a case reproduces, if any."""
    return next((k for k in OPEN_DEFECTS if k in case), None)


# The cases of open defects run only with SCENARIO_OPEN_DEFECTS=1 (the switch of machine.py): they
# fail until their fix lands; then the entry leaves OPEN_DEFECTS and the case runs in every tier.
RUN_OPEN = os.environ.get("SCENARIO_OPEN_DEFECTS") == "1"


@pytest.mark.parametrize(
    "case", sorted(c for c in [*CASES, *QMP_CASES] if RUN_OPEN or open_defect(c) is None)
)
def test_regression(case: str, target: tuple[str, Any], tmp_path: Path) -> None:
    replay(tmp_path, target, case)
