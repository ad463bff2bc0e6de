"""Persistent bitmaps as sendense uses them beyond dirty tracking: shrink markers (a shrink truncates
bitmaps and a grow extends them clean, so a disk shrunk and grown back shows in no dirty bitmap), the
bits of a stored bitmap read from the image, and a lock that orders sendense's own users of an image
(two jobs on one stopped disk).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sendense.errors import ResourceUnavailable, SendenseError
from tools.qemu import Qcow2Header, qemu_img, tool

_LOCK_DIR = "sendense-image-locks"


@contextmanager
def image_lock(image: Path, *, exclusive: bool, wait: float, busy: str) -> Iterator[None]:
    """Order sendense's own users of one image (two jobs on one stopped disk): a reader holds it shared
    while its qemu-nbd serves the image, a bitmap change takes it exclusively. QEMU's image locks would
    refuse the second user at once ("in use by a running process"); this waits up to `wait` seconds
    for the other job's step to end, then raises ResourceUnavailable(busy), which is retryable.
    A flock on a file named after the image's real path: it works across worker processes and goes
    with the process that held it."""
    d = Path(tempfile.gettempdir()) / _LOCK_DIR
    d.mkdir(mode=0o700, exist_ok=True)
    name = hashlib.sha256(os.fsencode(os.path.realpath(image))).hexdigest()[:32]
    fd = os.open(d / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + wait
        pause = 0.005
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ResourceUnavailable(busy) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
        yield
    finally:
        os.close(fd)


SPAN_GRANULARITY = 64 << 10  # the span marker's granularity (a 1 TiB disk: a 2 MiB bitmap)


def marker_scratch(size: int) -> Path:
    """A scratch qcow2 of `size` holding the two marker bitmaps to merge from (qemu-img cannot set
    bits): `span`, every bit dirty, and `tail` (512-byte granularity), only the last sector dirty.
    Zero writes dirty bitmaps and allocate nothing. Its content depends on the size alone, so it is
    made once per size and shared (renamed into place: a reader never sees a half-made one)."""
    d = Path(tempfile.gettempdir()) / _LOCK_DIR / "markers"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / f"{size}.qcow2"
    if path.is_file():
        return path
    tmp = Path(tempfile.mkdtemp(prefix="m-", dir=d)) / "m.qcow2"
    try:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(tmp), str(size))
        qemu_img("bitmap", "--add", "-g", str(SPAN_GRANULARITY), str(tmp), "span")
        qemu_img("bitmap", "--add", "-g", "512", "--disable", str(tmp), "tail")
        _qemu_io(tmp, f"write -z -n 0 {size - 512}")  # span only
        qemu_img("bitmap", "--enable", str(tmp), "tail")
        _qemu_io(tmp, f"write -z {size - 512} 512")  # span and tail
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return path


def _qemu_io(image: Path, command: str) -> None:
    p = subprocess.run(
        [tool("qemu-io"), "-f", "qcow2", "-c", command, str(image)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if p.returncode != 0 or "error" in p.stdout.lower() or "failed" in p.stdout.lower():
        raise SendenseError(f"qemu-io {command!r} on {image}: {(p.stderr or p.stdout).strip()}")


def add_shrink_markers(image: Path, span: str, tail: str, size: int, *, spec: str | None = None) -> None:
    """Add to `image` the two disabled persistent bitmaps that show a later shrink: `span`, dirty over
    the whole disk, and `tail`, dirty at its last sector only. A shrink truncates bitmaps and a grow
    extends them clean, so a clean `tail` means the disk was shrunk, and where `span` turns clean is
    how far (to within one granule). `spec`: what QEMU opens instead of the bare path (see
    tools.qemu.remove_bitmaps)."""
    scratch = marker_scratch(size)
    for name, src, gran in ((span, "span", SPAN_GRANULARITY), (tail, "tail", 512)):
        merge = ["--merge", src, "-b", str(scratch), "-F", "qcow2"]
        qemu_img("bitmap", "--add", "-g", str(gran), "--disable", *merge, spec or str(image), name)


def bitmap_dirty_end(path: Path, header: Qcow2Header, name: str, granularity: int) -> int:
    """The offset just past the last dirty bit of persistent bitmap `name` (0: none is dirty)."""
    t_off, t_size = header.tables[name]
    bits = header.cluster_size * 8  # granules per bitmap table entry
    limit = -(-header.size // granularity)
    with open(path, "rb") as f:
        for i, e in _table(f, t_off, t_size, reverse=True):
            if e & _TABLE_OFFSET:
                f.seek(e & _TABLE_OFFSET)
                data = f.read(header.cluster_size).rstrip(b"\0")
                if data:  # bit k of byte j is granule 8j + k (little-endian)
                    last = i * bits + (len(data) - 1) * 8 + data[-1].bit_length() - 1
                    return min(last + 1, limit) * granularity
            elif e & 1:
                return min((i + 1) * bits, limit) * granularity
    return 0


_TABLE_OFFSET = 0x00FFFFFFFFFFFE00  # bits 9-55 of a bitmap table entry
_TABLE_CHUNK = 8192  # entries read at a time (64 KiB): a table's size comes from the image


def _table(f: BinaryIO, t_off: int, t_size: int, *, reverse: bool = False) -> Iterator[tuple[int, int]]:
    """(index, entry) of a bitmap table, read a chunk at a time (the header reader checked that the
    table lies inside the file, but it may still be large)."""
    starts = range(0, t_size, _TABLE_CHUNK)
    for start in reversed(starts) if reverse else starts:
        n = min(_TABLE_CHUNK, t_size - start)
        f.seek(t_off + 8 * start)
        raw = f.read(8 * n)
        entries = struct.unpack(f">{len(raw) // 8}Q", raw[: len(raw) // 8 * 8])
        idx = range(start, start + len(entries))
        pairs = list(zip(idx, entries, strict=True))
        yield from reversed(pairs) if reverse else pairs


def bitmap_is_clean(path: Path, header: Qcow2Header, name: str) -> bool:
    """Whether persistent bitmap `name` has no dirty bit, read from the image (stored bitmaps are
    current in an image no process has open). Table entries (qcow2 spec): a data cluster's offset, or
    0 with bit 0 saying all ones (1) or all zeros (0)."""
    t_off, t_size = header.tables[name]
    with open(path, "rb") as f:
        for _, e in _table(f, t_off, t_size):
            if e & _TABLE_OFFSET:
                f.seek(e & _TABLE_OFFSET)
                if f.read(header.cluster_size).strip(b"\0"):
                    return False
            elif e & 1:
                return False
    return True
