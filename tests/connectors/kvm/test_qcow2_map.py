"""allocation_digest: the same across bitmap changes and rewrites of allocated data; different after
a shrink and a grow back, a write to unallocated space, or a discard; bounded on hostile headers."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers_kvm import MiB, make_qcow2, qemu_io, run

from connectors.kvm.qcow2_map import allocation_digest
from sendense.errors import SendenseError


def test_what_changes_the_digest_and_what_does_not(tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "d.qcow2", 8 * MiB)
    qemu_io(img, "write -P 1 0 6M")
    d0 = allocation_digest(img)
    run("qemu-img", "bitmap", "--add", "--enable", img, "other-job")  # another job's snapshot
    qemu_io(img, "write -P 2 0 1M")  # rewrites allocated clusters (a bitmap records it)
    assert allocation_digest(img) == d0
    run("qemu-img", "resize", "-q", "--shrink", img, "4M")
    run("qemu-img", "resize", "-q", img, "8M")
    d1 = allocation_digest(img)
    assert d1 != d0  # same size, same bitmap bits: only the allocation tells
    qemu_io(img, "write -P 3 7M 64k")
    d2 = allocation_digest(img)
    assert d2 != d1
    qemu_io(img, "discard 0 1M")
    assert allocation_digest(img) != d2


def test_a_hostile_header_is_refused_without_reading_what_it_claims(tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "h.qcow2", 8 * MiB)
    with open(img, "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">I", 0xFFFFFFF0))  # an L1 table of 32 GiB
    with pytest.raises(SendenseError, match="outside the file"):
        allocation_digest(img)
    with pytest.raises(SendenseError, match="not a qcow2"):
        (tmp_path / "raw").write_bytes(bytes(4096))
        allocation_digest(tmp_path / "raw")
