"""The lab's volume and snapshot data: block maps, write versions, lineages, snapshot states and a clock.

Every block a volume or snapshot holds is a `BlockRef`: the content's digest in the `BlockStore` and the
*version*, a number drawn once per write (a guest write, a PutSnapshotBlock). Two snapshots hold the same
data for a block exactly when they hold the same version, which is how EBS tracks change: by writes,
not by content, so rewriting identical bytes is a change. A snapshot of a volume copies the volume's map
at that instant (under `write_lock`, which every guest write holds for its whole duration); a volume
created from a snapshot starts with the snapshot's map, versions and lineage.

States are evaluated lazily against the lab clock (`now()`, real time plus an offset the tests can
advance), so nothing runs in the background. Metadata is in memory only: the lab's state does not survive
a restart of the server.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from labs.aws.blockstore import BLOCK_SIZE, ZERO_BLOCK, BlockStore
from labs.aws.tokens import TokenSigner

BLOCKS_PER_GIB = (1 << 30) // BLOCK_SIZE
GC_AFTER_REPLACED = 256  # blocks a write replaced (128 MiB of content at most) before a collection


class LabStateError(Exception):
    """A /_lab request the state refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class BlockRef:
    digest: bytes
    version: int


@dataclass
class Volume:
    volume_id: str
    size_gib: int
    lineage: str
    blocks: dict[int, BlockRef] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.size_gib << 30


@dataclass
class Snapshot:
    snapshot_id: str
    direct: bool  # started by StartSnapshot (EBS direct APIs); otherwise taken of a volume by EC2
    size_gib: int
    lineage: str
    blocks: dict[int, BlockRef]
    created: float
    parent_id: str | None = None
    volume_id: str | None = None
    timeout: float = 3600.0  # seconds of inactivity after which a pending direct snapshot errors
    written: set[int] = field(default_factory=set)  # indexes PutSnapshotBlock wrote in this snapshot
    last_activity: float = 0.0
    sealed_at: float | None = None  # when CompleteSnapshot was accepted
    outcome: str | None = None  # after sealing: "completed", "error" or "stuck" (count mismatch)
    outcome_message: str | None = None


class LabState:
    def __init__(self, blocks: BlockStore, snapshot_delay: float) -> None:
        self.blocks = blocks
        self.delay = snapshot_delay
        self.lock = threading.RLock()  # metadata
        self.write_lock = threading.RLock()  # guest writes against snapshot captures
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.signer = TokenSigner()
        self._versions = itertools.count(1)
        self._pinned: Counter[bytes] = Counter()
        self._clock_offset = 0.0
        self.capture_pause = 0.0  # seconds each volume capture of CreateSnapshot(s) takes (a test knob)
        self._replaced = 0  # blocks replaced by writes since the last garbage collection

    # ------------------------------------------------------------------ clock

    def now(self) -> float:
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> float:
        if seconds < 0:
            raise LabStateError(400, "the lab clock only moves forward")
        with self.lock:
            self._clock_offset += seconds
            return self._clock_offset

    def next_version(self) -> int:
        return next(self._versions)

    # ------------------------------------------------------------------ blocks

    def pin_and_store(self, digest: bytes, data: bytes) -> None:
        """Store a block and keep it from garbage collection until `unpin` (after it is referenced)."""
        with self.lock:
            self._pinned[digest] += 1
        try:
            self.blocks.put(digest, data)
        except BaseException:
            self.unpin(digest)
            raise

    def unpin(self, digest: bytes) -> None:
        with self.lock:
            self._pinned[digest] -= 1
            if self._pinned[digest] <= 0:
                del self._pinned[digest]

    def read_block(self, ref: BlockRef | None) -> bytes:
        return ZERO_BLOCK if ref is None else self.blocks.get(ref.digest)

    def collect_garbage(self) -> int:
        with self.lock:
            live: set[bytes] = set(self._pinned)
            for vol in self.volumes.values():
                live.update(ref.digest for ref in vol.blocks.values())
            for snap in self.snapshots.values():
                live.update(ref.digest for ref in snap.blocks.values())
            return self.blocks.discard(self.blocks.known() - live)

    # ------------------------------------------------------------------ volumes

    def add_volume(self, volume_id: str, size_gib: int, snapshot_id: str | None = None) -> Volume:
        with self.lock:
            if snapshot_id is not None:
                snap = self.snapshot(snapshot_id)
                vol = Volume(volume_id, size_gib, snap.lineage, dict(snap.blocks))
            else:
                vol = Volume(volume_id, size_gib, uuid.uuid4().hex)
            self.volumes[volume_id] = vol
            return vol

    def volume(self, volume_id: str) -> Volume:
        with self.lock:
            vol = self.volumes.get(volume_id)
        if vol is None:
            raise LabStateError(404, f"volume {volume_id} does not exist in the lab")
        return vol

    def remove_volume(self, volume_id: str) -> None:
        with self.lock:
            if self.volumes.pop(volume_id, None) is not None:
                self.collect_garbage()

    def resize_volume(self, volume_id: str, size_gib: int) -> None:
        with self.lock:
            self.volume(volume_id).size_gib = size_gib

    def write(self, volume_id: str, offset: int, length: int, read: Callable[[int], bytes]) -> None:
        """The guest writes `length` bytes at `offset`, pulled from `read(n)`; any alignment."""
        with self.write_lock:
            vol = self.volume(volume_id)
            if offset < 0 or length < 0 or offset + length > vol.size_bytes:
                raise LabStateError(
                    400,
                    f"write of {length} bytes at offset {offset} is outside volume {volume_id} "
                    f"({vol.size_bytes} bytes, {vol.size_gib} GiB)",
                )
            pos, end = offset, offset + length
            while pos < end:
                index, start = divmod(pos, BLOCK_SIZE)
                n = min(BLOCK_SIZE - start, end - pos)
                piece = _read_exact(read, n)
                if n == BLOCK_SIZE:
                    data = piece
                else:
                    with self.lock:
                        old = vol.blocks.get(index)
                    base = self.read_block(old)
                    data = base[:start] + piece + base[start + n :]
                digest = hashlib.sha256(data).digest()
                self.pin_and_store(digest, data)
                with self.lock:
                    self._replaced += index in vol.blocks
                    vol.blocks[index] = BlockRef(digest, self.next_version())
                    self.unpin(digest)
                pos += n
        if self._replaced >= GC_AFTER_REPLACED:  # a running guest rewrites blocks all the time
            with self.lock:
                self._replaced = 0
                self.collect_garbage()

    def read(self, volume_id: str, offset: int, length: int) -> Iterator[bytes]:
        """The volume's bytes at [offset, offset+length), in pieces of at most one block."""
        vol = self.volume(volume_id)
        if offset < 0 or length < 0 or offset + length > vol.size_bytes:
            raise LabStateError(
                400,
                f"read of {length} bytes at offset {offset} is outside volume {volume_id} "
                f"({vol.size_bytes} bytes)",
            )
        return self._read_pieces(vol, offset, length)

    def _read_pieces(self, vol: Volume, offset: int, length: int) -> Iterator[bytes]:
        pos, end = offset, offset + length
        while pos < end:
            index, start = divmod(pos, BLOCK_SIZE)
            n = min(BLOCK_SIZE - start, end - pos)
            with self.write_lock, self.lock:  # a consistent block even if a write replaces it meanwhile
                data = self.read_block(vol.blocks.get(index))
            yield data[start : start + n]
            pos += n

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, snapshot_id: str) -> Snapshot:
        with self.lock:
            snap = self.snapshots.get(snapshot_id)
        if snap is None:
            raise LabStateError(404, f"snapshot {snapshot_id} does not exist in the lab")
        return snap

    def find_snapshot(self, snapshot_id: str) -> Snapshot | None:
        with self.lock:
            return self.snapshots.get(snapshot_id)

    def capture_volume(self, snapshot_id: str, volume_id: str) -> Snapshot:
        """The volume exactly as it is now (no guest write lands during the copy)."""
        with self.write_lock, self.lock:
            vol = self.volume(volume_id)
            snap = Snapshot(
                snapshot_id,
                direct=False,
                size_gib=vol.size_gib,
                lineage=vol.lineage,
                blocks=dict(vol.blocks),
                created=self.now(),
                volume_id=volume_id,
            )
            self.snapshots[snapshot_id] = snap
            return snap

    def start_direct(
        self, snapshot_id: str, size_gib: int, parent: Snapshot | None, timeout_min: int
    ) -> Snapshot:
        with self.lock:
            now = self.now()
            snap = Snapshot(
                snapshot_id,
                direct=True,
                size_gib=size_gib,
                lineage=parent.lineage if parent else uuid.uuid4().hex,
                blocks=dict(parent.blocks) if parent else {},
                created=now,
                parent_id=parent.snapshot_id if parent else None,
                timeout=timeout_min * 60.0,
                last_activity=now,
            )
            self.snapshots[snapshot_id] = snap
            return snap

    def fail_snapshot(self, snapshot_id: str, message: str) -> None:
        """An EC2 snapshot that is still pending fails, as AWS sometimes fails one (state "error")."""
        with self.lock:
            snap = self.snapshot(snapshot_id)
            if snap.direct or self.status(snap)[0] != "pending":
                raise LabStateError(400, f"snapshot {snapshot_id} is not a pending snapshot of a volume")
            snap.outcome, snap.outcome_message = "error", message

    def remove_snapshot(self, snapshot_id: str) -> None:
        with self.lock:
            if self.snapshots.pop(snapshot_id, None) is not None:
                self.collect_garbage()

    def status(self, snap: Snapshot) -> tuple[str, str | None]:
        """(state, state message): pending, completed or error, as EC2 DescribeSnapshots shows it."""
        now = self.now()
        with self.lock:
            if not snap.direct:
                if snap.outcome == "error":  # failed by the lab's control API (EBS could not copy it)
                    return "error", snap.outcome_message
                return ("completed", None) if now >= snap.created + self.delay else ("pending", None)
            if snap.sealed_at is None:
                if now >= snap.last_activity + snap.timeout:
                    minutes = round(snap.timeout / 60)
                    return "error", f"Snapshot was not completed within its {minutes}-minute timeout"
                return "pending", None
            if snap.outcome == "stuck":
                if now >= snap.sealed_at + snap.timeout:
                    return "error", snap.outcome_message
                return "pending", None
            if now >= snap.sealed_at + self.delay:
                return snap.outcome or "error", snap.outcome_message
            return "pending", None

    def completion_time(self, snap: Snapshot) -> float | None:
        if self.status(snap)[0] != "completed":
            return None
        return snap.created + self.delay if not snap.direct else (snap.sealed_at or snap.created) + self.delay


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = read(n - got)
        if not chunk:
            raise LabStateError(400, f"the request body ended {n - got} bytes short of its length")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
