"""What a disk must read: a sparse shadow of every byte the test wrote, kept apart from any platform.

A disk of a 1 GiB EBS volume is a few written 512 KiB blocks: the shadow keeps 64 KiB chunks (absent:
zeros), and compares itself with a raw image (a point's export) chunk by chunk where either may hold
data (the image's holes read zeros), so an exact comparison costs what was written, not the size.
"""

from __future__ import annotations

import os
from pathlib import Path

CH = 64 << 10
_ZERO = bytes(CH)


class Shadow:
    def __init__(self, size: int) -> None:
        self.size = size
        self.chunks: dict[int, bytes] = {}

    def copy(self) -> Shadow:
        s = Shadow(self.size)
        s.chunks = dict(self.chunks)
        return s

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for i in range(offset // CH, (offset + length - 1) // CH + 1) if length > 0 else ():
            c = self.chunks.get(i)
            if c is not None:
                lo, hi = max(offset, i * CH), min(offset + length, (i + 1) * CH)
                out[lo - offset : hi - offset] = c[lo - i * CH : hi - i * CH]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        assert 0 <= offset and offset + len(data) <= self.size, (offset, len(data), self.size)
        pos, view = offset, memoryview(data)
        while view:
            i, at = divmod(pos, CH)
            n = min(len(view), CH - at)
            old = self.chunks.get(i, _ZERO)
            new = old[:at] + bytes(view[:n]) + old[at + n :]
            if new == _ZERO:
                self.chunks.pop(i, None)
            else:
                self.chunks[i] = new
            pos, view = pos + n, view[n:]

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def resize(self, size: int) -> None:
        if size < self.size:
            self.chunks = {i: c for i, c in self.chunks.items() if i * CH < size}
            last = size // CH
            if size % CH and last in self.chunks:
                c = self.chunks[last]
                self.chunks[last] = c[: size % CH] + bytes(CH - size % CH)
        self.size = size

    def differs(self, image: Path) -> str | None:
        """None when the raw image reads exactly these bytes at this size; else the first difference."""
        got_size = image.stat().st_size
        if got_size != self.size:
            return f"{image.name}: size {got_size}, expected {self.size}"
        fd = os.open(image, os.O_RDONLY)
        try:
            for i in sorted(set(self.chunks) | _data_chunks(fd, self.size)):
                lo = i * CH
                n = min(CH, self.size - lo)
                got, want = os.pread(fd, n, lo), self.read(lo, n)
                if got != want:
                    j = next(k for k in range(n) if got[k] != want[k])
                    return f"{image.name}: byte {lo + j} reads {got[j]:#04x}, expected {want[j]:#04x}"
        finally:
            os.close(fd)
        return None


def _data_chunks(fd: int, size: int) -> set[int]:
    """Chunks of the file that are not holes."""
    out: set[int] = set()
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.update(range(data // CH, (hole - 1) // CH + 1))
        pos = hole
    return out
