"""Hand-made qcow2 headers (struct-packed, docs/interop/qcow2.txt) for the hostile-image tests."""

from __future__ import annotations

import struct
from pathlib import Path

HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the 104-byte version 3 header
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
EXT_BACKING_FORMAT = 0xE2792ACA


def header(
    *,
    backing_offset: int = 0,
    backing_size: int = 0,
    size: int = 1 << 30,
    incompat: int = 0,
    autoclear: int = 0,
    header_length: int = 104,
    cluster_bits: int = CLUSTER_BITS,
    version: int = 3,
) -> bytes:
    return HEADER.pack(
        b"QFI\xfb",
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        0,  # crypt
        0,  # l1 size
        3 * CLUSTER,  # l1 offset
        CLUSTER,  # refcount table offset
        1,  # refcount table clusters
        0,  # snapshots
        0,
        incompat,
        0,  # compatible features
        autoclear,
        4,  # refcount order
        header_length,
    )


def ext(etype: int, data: bytes, length: int | None = None) -> bytes:
    """One header extension; `length` overrides the length field (a lie)."""
    pad = b"\0" * (-len(data) % 8)
    return struct.pack(">II", etype, len(data) if length is None else length) + data + pad


def bitmaps_ext(count: int, dir_size: int, dir_offset: int) -> bytes:
    return ext(EXT_BITMAPS, struct.pack(">IIQQ", count, 0, dir_size, dir_offset))


def write_image(
    path: Path, head: bytes, *, file_size: int = 4 * CLUSTER, at: dict[int, bytes] | None = None
) -> Path:
    """A file of `file_size` bytes (sparse: it may be large) starting with `head`, with `at`
    offset -> bytes written over it."""
    with open(path, "wb") as f:
        f.write(head)
        for off, data in (at or {}).items():
            f.seek(off)
            f.write(data)
        f.truncate(max(file_size, f.seek(0, 2)))
    return path
