"""qcow2 headers read in-process, as untrusted input: every length and offset the header gives is
checked against QEMU's own limits and the file's size before anything is read or allocated.

An image is a user's file. A crafted header (a backing file name of 4 GiB, an extension or bitmap
directory larger than the file) used to make the worker allocate what the header said; now it is
refused in one line (`BadImage`) naming the image and the field. The whole header area QEMU reads
(the first cluster, at most 2 MiB) is read once and parsed from memory; the bitmap directory (at
most 64 MiB, QEMU's limit, and never past the end of the file) is read only when a bitmaps
extension is valid.

Layout: QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sendense.errors import InvalidSpec

QCOW2_MAGIC = b"QFI\xfb"
MAX_BACKING_NAME = 1023  # QEMU refuses longer ("Backing file name too long")
MAX_DATA_FILE_NAME = 4095  # PATH_MAX less its NUL
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # QEMU's MIN_CLUSTER_BITS, MAX_CLUSTER_BITS
MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS  # QCOW2_MAX_BITMAP_DIRECTORY_SIZE (64 MiB)
MAX_BITMAP_NAME = 1023  # BDRV_BITMAP_MAX_NAME_SIZE
MAX_BITMAP_TABLE = 0x8000000  # entries of one bitmap table: BME_MAX_TABLE_SIZE
MAX_BITMAP_EXTRA = 1 << 16  # a directory entry's extra data (QEMU defines none)

_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_BITMAPS = 0x23852875
_EXT_DATA_FILE = 0x44415441
INCOMPAT_DATA_FILE = 1 << 2
_BITMAP_FLAGS = ((1, "in-use"), (2, "auto"))
_V2_HEADER = 72
_V3_HEADER = 104


class BadImage(InvalidSpec):
    """A qcow2 header that QEMU would refuse, or that asks for more than the file holds. `reason` is
    the field at fault without the path, so a caller can name the image as the user named it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: qcow2 header: {reason}")
        self.path, self.reason = path, reason


class NotQcow2(BadImage):
    def __init__(self, path: Path) -> None:
        InvalidSpec.__init__(self, f"{path} is not a qcow2 image")
        self.path, self.reason = path, "not a qcow2 image"


@dataclass(frozen=True)
class Qcow2Header:
    """What the hot paths need from a qcow2 header, read in-process (`qemu-img info` costs a process
    and ~4 ms of CPU per call; a sync used to make two per disk)."""

    size: int  # virtual size
    backing: str | None  # the backing file name as written in the header
    bitmaps: dict[str, list[str]]  # persistent bitmap name -> flags, as qcow2_bitmaps() gives them
    version: int = 3  # 2: compat=0.10, which cannot hold persistent bitmaps
    cluster_size: int = 65536
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)  # bitmap -> (table offset, entries)
    backing_format: str | None = None  # the backing format extension, when there is one
    data_file: str | None = None  # the external data file's name, when the header gives one
    has_data_file: bool = False  # incompatible feature bit 2: the data lives in an external file
    file_size: int = 0  # the image file's size when the header was read


def is_qcow2(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == QCOW2_MAGIC


def open_image(path: Path) -> int:
    """An O_RDONLY descriptor of a regular file or block device (never blocking on a FIFO, never
    taking a terminal), or OSError / BadImage."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise BadImage(path, "not a regular file or block device")
    return fd


def file_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def read_qcow2_header(path: Path) -> Qcow2Header:
    """Parse the header, its extensions and the bitmap directory, bounded (see the module doc).

    The bitmaps extension counts only while autoclear bit 0 is set: a program that does not know
    bitmaps clears it on write, and then the bitmaps are stale (QEMU ignores them the same way).
    """
    fd = open_image(path)
    try:
        end = file_size(fd)
        head = os.pread(fd, _V3_HEADER, 0)
        if len(head) < _V2_HEADER or head[:4] != QCOW2_MAGIC:
            raise NotQcow2(path)
        version, b_off, b_len, cluster_bits = struct.unpack(">IQII", head[4:24])
        (size,) = struct.unpack(">Q", head[24:32])
        if version not in (2, 3):
            raise BadImage(path, f"version {version} (only 2 and 3 exist)")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise BadImage(
                path, f"cluster_bits of {cluster_bits} (from {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS})"
            )
        cluster = 1 << cluster_bits
        header_len, incompat, autoclear = _V2_HEADER, 0, 0
        if version == 3:
            if len(head) < _V3_HEADER:
                raise BadImage(path, f"truncated: {len(head)} bytes of a {_V3_HEADER}-byte version 3 header")
            incompat, _compat, autoclear = struct.unpack(">QQQ", head[72:96])
            (header_len,) = struct.unpack(">I", head[100:104])
            if not _V3_HEADER <= header_len <= min(cluster, end):
                raise BadImage(
                    path, f"header length of {header_len} bytes (from {_V3_HEADER} to the cluster size)"
                )
        # everything below lives in the first cluster (QEMU reads it from there): read it once
        first = os.pread(fd, min(cluster, end), 0)
        backing = None
        if b_off:
            if b_len > MAX_BACKING_NAME:
                raise BadImage(path, f"backing file name of {b_len} bytes (max {MAX_BACKING_NAME})")
            if b_off < header_len or b_off + b_len > len(first):
                raise BadImage(path, f"backing file name at {b_off} is outside the header cluster")
            raw = first[b_off : b_off + b_len].split(b"\0", 1)[0]  # a C string to QEMU
            backing = os.fsdecode(raw) or None
        ext = _Extensions(path, first, header_len, b_off or len(first), bitmaps=bool(autoclear & 1))
        bitmaps: dict[str, list[str]] = {}
        tables: dict[str, tuple[int, int]] = {}
        if ext.bitmaps is not None:
            nb, dir_size, dir_off = ext.bitmaps
            if dir_off % cluster or dir_off + dir_size > end:
                raise BadImage(path, f"bitmap directory at {dir_off} ({dir_size} bytes) is outside the file")
            bitmaps, tables = _bitmap_directory(path, os.pread(fd, dir_size, dir_off), nb, cluster, end)
        return Qcow2Header(
            size,
            backing,
            bitmaps,
            version,
            cluster,
            tables,
            backing_format=ext.backing_format,
            data_file=ext.data_file,
            has_data_file=bool(incompat & INCOMPAT_DATA_FILE),
            file_size=end,
        )
    finally:
        os.close(fd)


class _Extensions:
    """The header extensions between the header's end and the backing file name (or the end of the
    first cluster): each is at least 8 bytes, so the walk ends within cluster/8 steps. The bitmaps
    extension is read only if `bitmaps` (autoclear bit 0) says it is current, as QEMU does."""

    def __init__(self, path: Path, buf: bytes, start: int, end: int, *, bitmaps: bool) -> None:
        self.backing_format: str | None = None
        self.data_file: str | None = None
        self.bitmaps: tuple[int, int, int] | None = None  # (count, directory size, directory offset)
        pos = start
        while pos + 8 <= end:
            etype, elen = struct.unpack(">II", buf[pos : pos + 8])
            pos += 8
            if etype == 0:
                break
            if elen > end - pos:
                raise BadImage(
                    path, f"extension {etype:#x} of {elen} bytes runs past the header ({end - pos} left)"
                )
            data = buf[pos : pos + elen]
            pos += (elen + 7) & ~7
            if etype == _EXT_BACKING_FORMAT:
                if elen > 15:  # QEMU's backing_format[16]
                    raise BadImage(path, f"backing format of {elen} bytes (max 15)")
                self.backing_format = data.split(b"\0", 1)[0].decode("ascii", "replace")
            elif etype == _EXT_DATA_FILE:
                if elen > MAX_DATA_FILE_NAME:
                    raise BadImage(path, f"data file name of {elen} bytes (max {MAX_DATA_FILE_NAME})")
                self.data_file = os.fsdecode(data.split(b"\0", 1)[0]) or None
            elif etype == _EXT_BITMAPS and bitmaps:
                if elen < 24:
                    raise BadImage(path, f"bitmaps extension of {elen} bytes (24 expected)")
                nb, _reserved, dir_size, dir_off = struct.unpack(">IIQQ", data[:24])
                if not 0 < nb <= MAX_BITMAPS:
                    raise BadImage(path, f"{nb} bitmaps (from 1 to {MAX_BITMAPS})")
                if dir_size > MAX_BITMAP_DIRECTORY:
                    raise BadImage(path, f"bitmap directory of {dir_size} bytes (max {MAX_BITMAP_DIRECTORY})")
                if nb * 24 > dir_size:  # an entry is at least 24 bytes
                    raise BadImage(
                        path, f"bitmap directory of {dir_size} bytes holds fewer than {nb} entries"
                    )
                self.bitmaps = (nb, dir_size, dir_off)


def _bitmap_directory(
    path: Path, raw: bytes, count: int, cluster: int, end: int
) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]]]:
    out: dict[str, list[str]] = {}
    tables: dict[str, tuple[int, int]] = {}
    pos = 0
    for _ in range(count):
        if pos + 24 > len(raw):
            raise BadImage(path, f"bitmap directory of {len(raw)} bytes holds fewer than {count} entries")
        t_off, t_size = struct.unpack(">QI", raw[pos : pos + 12])
        flags, _type, gran_bits, name_len, extra = struct.unpack(">IBBHI", raw[pos + 12 : pos + 24])
        if name_len > MAX_BITMAP_NAME or extra > MAX_BITMAP_EXTRA:
            raise BadImage(path, f"bitmap entry {len(out)}: name of {name_len} bytes (max {MAX_BITMAP_NAME})")
        name_at = pos + 24 + extra
        if name_at + name_len > len(raw):
            raise BadImage(path, f"bitmap directory of {len(raw)} bytes holds fewer than {count} entries")
        if (
            t_size > MAX_BITMAP_TABLE
            or t_off % cluster
            or t_off + 8 * t_size > end
            or not 9 <= gran_bits <= 31
        ):
            raise BadImage(path, f"bitmap entry {len(out)}: table of {t_size} entries at {t_off} is invalid")
        name = raw[name_at : name_at + name_len].decode("utf-8", "replace")
        out[name] = [label for bit, label in _BITMAP_FLAGS if flags & bit]
        tables[name] = (t_off, t_size)
        pos = (name_at + name_len + 7) & ~7
    return out, tables


def qcow2_backing_name(path: Path) -> str | None:
    """The backing file's name from the qcow2 header, without spawning qemu-img (hot in recovery)."""
    backing = read_qcow2_header(path).backing
    return Path(backing).name if backing else None


# formats QEMU would probe (block/*.c probe functions), by their magic: what a non-qcow2 image is
_MAGICS = (
    (0, b"QFI\xfb", "qcow"),  # version 1 (a version 2/3 header is qcow2)
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
)


def sniff_format(path: Path) -> str:
    """The image format by its magic, as far as QEMU's probes go ("raw" when none matches), without
    opening the image in QEMU (some formats name other files, which QEMU would open)."""
    fd = open_image(path)
    try:
        head = os.pread(fd, 512, 0)
    finally:
        os.close(fd)
    if head[:4] == QCOW2_MAGIC and len(head) >= 8 and struct.unpack(">I", head[4:8])[0] in (2, 3):
        return "qcow2"
    for at, magic, name in _MAGICS:
        if head[at : at + len(magic)] == magic:
            return name
    return "raw"
