"""A digest of a qcow2 image's guest-visible allocation (its L1 table and the L2 tables it points to),
read in-process.

Why: a stopped-VM snapshot is only a new dirty bitmap; the copy reads the live image later and trusts
the bitmap to show any change in between. A resize does not dirty bitmaps: an image shrunk and grown
back to its size between the snapshot and the copy reads zeros where the snapshot instant had data,
with a clean bitmap and the same size. Every such change rewrites L2 entries (or the L1 table), so
comparing this digest from the snapshot with the one at the copy catches it. Bitmap changes (another
job's snapshot of the same image) touch neither table, so they do not count as a change.

Cost: the L1 table plus one cluster per 512 MiB of virtual disk (64 KiB clusters): ~1 MiB of reads
for 8 GiB. Sizes come from the header of an untrusted image and are bounded by the file's size.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from sendense.errors import SendenseError

L1_MASK = 0x00FFFFFFFFFFFE00  # qcow2 spec: bits 9-55 of an L1 entry hold the L2 table's offset


def allocation_digest(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(72)
        if len(head) < 72 or head[:4] != b"QFI\xfb":
            raise SendenseError(f"{path} is not a qcow2 image")
        (cluster_bits,) = struct.unpack(">I", head[20:24])
        (l1_size,) = struct.unpack(">I", head[36:40])
        (l1_offset,) = struct.unpack(">Q", head[40:48])
        file_size = os.fstat(f.fileno()).st_size
        cluster = 1 << cluster_bits if 9 <= cluster_bits <= 21 else 0
        if not cluster or l1_size * 8 > file_size or l1_offset + l1_size * 8 > file_size:
            raise SendenseError(f"{path}: qcow2 header gives an L1 table outside the file")
        h = hashlib.blake2b(digest_size=16)
        f.seek(l1_offset)
        l1 = f.read(l1_size * 8)
        h.update(l1)
        for (entry,) in struct.iter_unpack(">Q", l1):
            l2 = entry & L1_MASK
            if not l2:
                continue
            if l2 + cluster > file_size:
                raise SendenseError(f"{path}: qcow2 L1 entry points outside the file")
            f.seek(l2)
            h.update(f.read(cluster))
        return h.hexdigest()
