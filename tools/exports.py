"""Standalone images of a point, as every target exports them: the formats qemu-img writes, and the
file name of a disk's image."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tools.qemu import qemu_img

# --format -> (qemu-img output format, file extension)
EXPORT_FORMATS = {
    "raw": ("raw", "img"),
    "qcow2": ("qcow2", "qcow2"),
    "vmdk": ("vmdk", "vmdk"),
    "vhdx": ("vhdx", "vhdx"),
}


def safe_key(key: str) -> str:
    """A disk key as a file name: the key itself when it is safe, else the key with unsafe characters
    replaced and a short hash of the whole key appended, so that two keys never share a name
    (`a/b` and `a_b`, or QEMU's `#block113` and `_block113`, would otherwise share one replica)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    if safe == key and not key.startswith("."):
        return key
    return f"{safe.lstrip('.')}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def export_name(out_dir: Path, job: str, point_id: str, key: str, fmt: str) -> Path:
    """Where disk `key` of a point is exported in format `fmt` (checked: one of EXPORT_FORMATS)."""
    return out_dir / f"{job}-{point_id}-{safe_key(key)}.{EXPORT_FORMATS[fmt][1]}"


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A directory for an export's partial files, made exclusively (0700, a fresh name) inside the
    output directory, removed with whatever is left in it. The output directory may be shared (/tmp):
    a file or symlink another user planted there (`<export>.part` -> a victim) is never written
    through, since nothing is created in the output directory but by rename (which replaces a
    planted symlink, never follows it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".sendense-export-"))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def finish_export(raw: Path, dst: Path, fmt: str) -> None:
    """A disk read into the raw file `raw` (in a `staging` directory) becomes the export `dst` in
    format `fmt`: renamed, or converted beside `raw` first, private (0600) either way: the VM's data."""
    raw.chmod(0o600)
    qfmt = EXPORT_FORMATS[fmt][0]
    if qfmt == "raw":
        os.replace(raw, dst)
        return
    tmp = raw.with_name(raw.name + ".converted")
    try:
        qemu_img("convert", "-f", "raw", "-O", qfmt, str(raw), str(tmp))
        tmp.chmod(0o600)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
        raw.unlink(missing_ok=True)
