"""Standalone images of a point, as every target exports them: the formats qemu-img writes, and the
file name of a disk's image."""

from __future__ import annotations

import hashlib

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
