"""What the vSphere lab's own semantics tests (tests/labs/test_vsphere_lab_*.py) share: pyvmomi on one
side, qemu-io / qemu-img on the files the lab's disk endpoint names on the other."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pyVmomi import vim

from labs.vsphere import VsphereLab

BLOCK = 64 * 1024  # the lab's change tracking block (QEMU's VMDK grain)


def disk_by_key(devices: Any, key: int) -> Any:
    return next(d for d in devices if isinstance(d, vim.vm.device.VirtualDisk) and d.key == key)


def chain(backing: Any) -> list[str]:
    """A disk backing's files, top first."""
    out = []
    while backing is not None:
        out.append(backing.fileName)
        backing = backing.parent
    return out


def snapshot(lab: VsphereLab, vm: Any, name: str) -> Any:
    return lab.wait(vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False))


def remove_snapshot(lab: VsphereLab, snap: Any) -> None:
    lab.wait(snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True))


def guest_write(path: str, writes: list[tuple[int, int, int]]) -> None:
    """The guest: pattern writes (offset, length, byte) into a disk file (opened with its backing)."""
    cmds = [a for off, n, pat in writes for a in ("-c", f"write -P {pat} {off} {n}")]
    subprocess.run(["qemu-io", "-f", "vmdk", *cmds, path], check=True, capture_output=True)


def apply_writes(image: bytearray, writes: list[tuple[int, int, int]]) -> None:
    for off, n, pat in writes:
        image[off : off + n] = bytes([pat]) * n


def read_raw(path: str, tmp: Path) -> bytes:
    """A VMDK (through its chain) as raw bytes; -U: a running VM's QEMU may hold it."""
    out = tmp / f"read-{os.urandom(4).hex()}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "vmdk", "-O", "raw", path, str(out)],
        check=True,
        capture_output=True,
    )
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def rounded(writes: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The areas a 64 KiB tracking block reports for these writes: rounded out, merged."""
    spans = sorted((off // BLOCK * BLOCK, -(-(off + n) // BLOCK) * BLOCK) for off, n, _ in writes)
    out: list[list[int]] = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e - s) for s, e in out]
