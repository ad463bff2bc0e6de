"""The shadow model: what the source disks hold now, and what every recovery point must hold.

Pure Python, no I/O: the scenario rig (rig.py) applies each step to the real source and target and
to this model, then compares. A point's shadow is the exact bytes and size of each of its disks at
the snapshot instant (the begin of the sync attempt that committed it), and what kind of sync the
model expects it to be: `full` only for a disk new to the target, `incremental` only against the
same image's change tracking, `resync` otherwise (and then with a reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ShadowDisk:
    """One source image: an identity (never reused) and its guest-visible bytes."""

    ident: int
    data: bytearray

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def resize(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))


@dataclass(frozen=True)
class ShadowPoint:
    point_id: str
    disks: dict[str, bytes]  # key -> content at the snapshot instant (its length is the size)
    idents: dict[str, int]  # key -> identity of the image it was read from
    kind: str


@dataclass
class OpenSync:
    """A sync begun and neither committed nor failed."""

    sync_id: str
    mode: str  # "inline" (begin_and_copy, finish) or "split" (begin_sync, copy_disk, finish_sync)
    snapped: bool = False  # a snapshot is held (False after a failed begin: the activity released it)
    contents: dict[str, bytes] = field(default_factory=dict)
    idents: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # key -> the kind the model expects
    copied: list[str] = field(default_factory=list)  # keys copied, in order
    touched: set[str] = field(default_factory=set)  # keys written after the snapshot
    resized: set[str] = field(default_factory=set)  # keys resized after the snapshot
    shrunk: set[str] = field(default_factory=set)  # ... to below their size at the snapshot


class Shadow:
    def __init__(self, keep: int, *, live: bool = False) -> None:
        self.live = live  # a running VM: its snapshot is QEMU's (copy-before-write), writes after it are fine
        self.disks: list[ShadowDisk] = []
        self.points: list[ShadowPoint] = []  # oldest first (commit order)
        self.keep = keep
        self.open: OpenSync | None = None
        self._next_ident = 0

    # ------------------------------------------------------------------ the source

    def add_disk(self, size: int) -> ShadowDisk:
        d = ShadowDisk(self._next_ident, bytearray(size))
        self._next_ident += 1
        self.disks.append(d)
        return d

    def keys(self) -> list[str]:
        return [f"disk{i}" for i in range(len(self.disks))]  # the stopped-VM source keys by position

    def touched(self, index: int) -> None:
        """A guest write: after the snapshot instant it makes that disk's snapshot stale."""
        if self.open is not None and self.open.snapped and not self.live:
            self.open.touched.add(f"disk{index}")

    # ------------------------------------------------------------------ syncs

    def resized_disk(self, index: int) -> None:
        sync, key = self.open, f"disk{index}"
        if sync is not None and sync.snapped and not self.live:
            sync.resized.add(key)
            if self.disks[index].size < len(sync.contents.get(key, b"")):
                sync.shrunk.add(key)

    def latest(self) -> ShadowPoint | None:
        return self.points[-1] if self.points else None

    def expected_kind(self, key: str, ident: int) -> str:
        latest = self.latest()
        if latest is None or key not in latest.disks:
            return "full"  # no replica of this disk on the target yet
        if latest.idents[key] == ident:
            return "incremental"  # the same image, tracked since that point
        return "resync"  # another image under this key: its bitmap says nothing about the replica

    def snapshot(self, sync: OpenSync) -> None:
        """The snapshot instant of (an attempt of) `sync`."""
        sync.snapped = True
        sync.contents = {k: bytes(d.data) for k, d in zip(self.keys(), self.disks, strict=True)}
        sync.idents = {k: d.ident for k, d in zip(self.keys(), self.disks, strict=True)}
        sync.kinds = {k: self.expected_kind(k, sync.idents[k]) for k in sync.contents}
        sync.copied, sync.touched, sync.resized, sync.shrunk = [], set(), set(), set()

    def point_kind(self, sync: OpenSync) -> str:
        kinds = set(sync.kinds.values())
        return "resync" if "resync" in kinds else "full" if kinds == {"full"} else "incremental"

    def commit(self, sync: OpenSync) -> ShadowPoint:
        p = ShadowPoint(sync.sync_id, dict(sync.contents), dict(sync.idents), self.point_kind(sync))
        self.points.append(p)
        self.open = None
        self.prune(self.keep)
        return p

    def prune(self, keep: int) -> list[str]:
        gone = [p.point_id for p in self.points[: max(0, len(self.points) - keep)]]
        self.points = self.points[len(gone) :]
        return gone
