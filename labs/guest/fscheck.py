"""Check a guest disk offline: is its filesystem consistent, and what sequence number does it hold.

A crash-consistent copy (a recovery point of a running guest) passes after journal replay; a torn
copy (chunks taken at different instants) fails, so the check discriminates. Nothing is mounted and
the image is never changed: the partition is extracted to a scratch file first.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labs.guest.build import PART_OFFSET


@dataclass
class FsCheck:
    ok: bool
    detail: str  # e2fsck's verdict, one line
    seq: int | None  # /var/lib/sendense/seq: the workload's last synced step


def check(image: Path, fmt: str = "qcow2") -> FsCheck:
    with tempfile.TemporaryDirectory(prefix="sendense-fsck-") as tmp:
        part = Path(tmp) / "p1.raw"
        opts = f"driver=raw,offset={PART_OFFSET},file.driver={fmt},file.file.filename={image}"
        subprocess.run(
            ["qemu-img", "convert", "-U", "--image-opts", opts, "-O", "raw", str(part)],
            check=True,
            capture_output=True,
        )
        # -p, not -y: with -y, an unusable journal makes e2fsck repair everything and call it fixed
        replay = subprocess.run(
            ["e2fsck", "-E", "journal_only", "-p", str(part)], capture_output=True, text=True
        )
        if replay.returncode > 1:  # 1: what a crash leaves (orphans) was put right
            return FsCheck(False, f"journal replay failed (e2fsck rc {replay.returncode})", None)
        full = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
        if full.returncode != 0:
            lines = [ln for ln in (full.stdout + full.stderr).splitlines() if ln.strip()]
            return FsCheck(False, f"e2fsck rc {full.returncode}: {lines[-1] if lines else '?'}", None)
        cat = subprocess.run(
            ["debugfs", "-R", "cat /var/lib/sendense/seq", str(part)], capture_output=True, text=True
        )
        text = cat.stdout.strip()
        return FsCheck(True, "clean", int(text) if text.isdigit() else None)
