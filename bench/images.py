"""Disk images for the benchmark: realistic mixes, sparse disks, guest-like churn, comparisons."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

from bench.harness import KiB, MiB

CHUNK = 4 * MiB
TEXT = (
    b"The quick brown fox jumps over the lazy dog. Lorem ipsum dolor sit amet, consectetur adipiscing. "
    * (CHUNK // 96 + 1)
)[:CHUNK]


def run(*args: object, stdin: bytes | None = None, timeout: float = 1800) -> str:
    """Run a command; raise with its stderr when it fails."""
    p = subprocess.run([str(a) for a in args], input=stdin, capture_output=True, timeout=timeout, check=False)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({p.returncode}): {err}")
    return p.stdout.decode(errors="replace")


def qcow2(path: Path, size: int, options: str = "cluster_size=65536") -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, size)
    return path


def raw_to_qcow2(raw: Path, dst: Path) -> Path:
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", raw, dst)
    raw.unlink()
    return dst


def make_mixed(path: Path, size: int, seed: int = 1) -> dict[str, int]:
    """A qcow2 of `size`: 4 MiB chunks, 40% random, 20% zero (unallocated), 40% compressible text."""
    rng = random.Random(seed)
    raw = path.with_suffix(".raw")
    counts = {"random": 0, "zero": 0, "text": 0}
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            r = rng.random()
            if r < 0.4:
                f.seek(off)
                f.write(os.urandom(n))
                counts["random"] += n
            elif r < 0.6:
                counts["zero"] += n
            else:
                f.seek(off)
                f.write(TEXT[:n])
                counts["text"] += n
    raw_to_qcow2(raw, path)
    return counts


def make_sparse(path: Path, size: int, data: int, piece: int = MiB) -> int:
    """A qcow2 of `size` with about `data` bytes of random data in `piece`s spread evenly."""
    raw = path.with_suffix(".raw")
    pieces = max(1, data // piece)
    stride = size // pieces
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(pieces):
            f.seek(i * stride)
            f.write(os.urandom(piece))
    raw_to_qcow2(raw, path)
    return pieces * piece


def make_random(path: Path, size: int) -> Path:
    """A qcow2 whose every byte is random (nothing for zero detection to skip)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        for _ in range(0, size, CHUNK):
            f.write(os.urandom(CHUNK))
        f.truncate(size)
    return raw_to_qcow2(raw, path)


def qemu_io(image: Path, commands: list[str]) -> None:
    """Write to an image as a guest would (persistent dirty bitmaps record it). Commands on stdin."""
    script = ("\n".join(commands) + "\nquit\n").encode()
    out = run("qemu-io", "-t", "writeback", "-f", "qcow2", image, stdin=script)
    bad = [ln for ln in out.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
    if bad:
        raise RuntimeError(f"qemu-io {image}: {bad[0]}")


def churn(image: Path, size: int, fraction: float, work: Path, seed: int, block: int = 4 * KiB) -> int:
    """Random `block` writes at distinct random aligned offsets covering `fraction` of the disk.

    The data is a fresh random block per call (non-zero, differs from anything on the disk), so every
    written byte really changes. Returns the bytes actually changed (distinct blocks x block).
    """
    rng = random.Random(seed)
    count = max(1, round(size * fraction / block))
    offsets = rng.sample(range(size // block), count)
    pattern = work / f"pattern-{seed}.bin"
    data = os.urandom(block)
    while data.count(0) == len(data):
        data = os.urandom(block)
    pattern.write_bytes(data)
    qemu_io(image, [f"write -q -s {pattern} {o * block} {block}" for o in offsets])
    pattern.unlink()
    return count * block


def write_small(image: Path, offset: int, length: int, pattern: int) -> None:
    qemu_io(image, [f"write -q -P {pattern} {offset} {length}"])


def info(image: Path) -> dict[str, Any]:
    return dict(json.loads(run("qemu-img", "info", "-U", "--output=json", image)))


def bitmaps(image: Path) -> list[str]:
    data = info(image).get("format-specific", {}).get("data", {})
    return [b["name"] for b in data.get("bitmaps", [])]


def data_ranges(image: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data held by the image itself (not its backing chain), read with -U."""
    out = json.loads(run("qemu-img", "map", "-U", "--output=json", image))
    return [(int(e["start"]), int(e["length"])) for e in out if e.get("data") and e.get("depth", 0) == 0]


def unmapped_tail(image: Path) -> int:
    """Bytes at the end of a qcow2 file beyond the last cluster its on-disk metadata maps.

    qcow2 allocates new clusters at the end of the file, so after a writer is killed this is about the
    data it wrote after its last flush: written, but lost with the metadata cached in the writer.
    """
    out = json.loads(run("qemu-img", "map", "-U", "--output=json", image))
    end = max((int(e["offset"]) + int(e["length"]) for e in out if "offset" in e), default=0)
    return max(0, image.stat().st_size - end)


def bytes_at_or_beyond(ranges: list[tuple[int, int]], start: int) -> int:
    return sum(max(0, off + n - max(off, start)) for off, n in ranges)


def to_raw(src: Path, dst: Path) -> Path:
    run("qemu-img", "convert", "-U", "-O", "raw", src, dst)
    return dst


def same_content(a: Path, b: Path) -> bool:
    """`qemu-img compare` (also checks the virtual sizes match)."""
    p = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True)
    if p.returncode not in (0, 1):
        raise RuntimeError(f"qemu-img compare {a} {b}: {p.stderr.strip()}")
    return p.returncode == 0


def tool_version(*cmd: str) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "not installed"
    return " / ".join(ln.strip() for ln in out.splitlines()[:2] if ln.strip() and "Copyright" not in ln)
