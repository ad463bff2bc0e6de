"""One disk's EBS snapshot while a sync writes it (StartSnapshot done, CompleteSnapshot not yet).

Each written block's index and checksum go to a local record (fsynced at every copy checkpoint), so
that a resumed copy still completes the snapshot with the exact count of distinct blocks and the
LINEAR aggregate checksum that `CompleteSnapshot` checks. The record is also what the snapshot holds
of its own, beyond its parent: a zero write clears a block wherever the parent has data *or* this
snapshot wrote one, and compare reads see the zeros it wrote. The record's existence is the target's
proof that it started the snapshot (see tags.py).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from connectors.aws.blocks import (
    BLOCK,
    ZERO_BLOCK,
    ZERO_CHECKSUM,
    BlockTokens,
    checksum,
    linear_checksum,
    list_blocks,
)
from connectors.aws.client import Aws, aws_call, error_code
from sendense.datapath.extents import Extent
from sendense.errors import DataPathError, TargetError

_NONZERO = re.compile(rb"[^\x00]")  # a byte of a block map with a block set


def load_record(path: Path) -> dict[int, str]:
    written: dict[int, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return written
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():  # a torn last line (crash mid-write) is skipped
            written[int(parts[0])] = parts[1]
    return written


def complete_snapshot(aws: Aws, ebs: Any, snapshot_id: str, record: Path, what: str) -> None:
    """CompleteSnapshot with the exact count of distinct blocks written and their LINEAR aggregate
    checksum, from the snapshot's local record; EBS seals it asynchronously (wait for completed)."""
    written = load_record(record)
    kw: dict[str, Any] = {"SnapshotId": snapshot_id, "ChangedBlocksCount": len(written)}
    if written:  # the aggregate checksum of the blocks written, in block order
        kw["Checksum"] = linear_checksum([written[i] for i in sorted(written)])
        kw["ChecksumAlgorithm"], kw["ChecksumAggregationMethod"] = "SHA256", "LINEAR"
    with aws_call(aws, f"ebs CompleteSnapshot {snapshot_id}"):
        res = ebs.complete_snapshot(**kw)
    if res.get("Status") == "error":
        raise TargetError(
            f"target: EBS refused to complete snapshot {snapshot_id} of {what} "
            f"({len(written)} blocks: count or checksum mismatch)"
        )


class PendingSnapshot:
    """One disk's snapshot being written: its written blocks (index -> checksum), kept in a local
    record that survives the worker, and the parent's block map for zero writes."""

    def __init__(self, aws: Aws, ebs: Any, snapshot_id: str, parent: str | None, record: Path) -> None:
        self.aws, self.ebs, self.snapshot_id, self.parent, self.path = aws, ebs, snapshot_id, parent, record
        self.written: dict[int, str] = load_record(record)
        self._lock = threading.Lock()
        self._file = open(record, "a")  # noqa: SIM115 - closed by close()
        self._parent_blocks: bytearray | None = None
        self.parent_tokens = BlockTokens(aws, ebs, parent) if parent else None

    def put(self, index: int, data: bytes, digest: str) -> None:
        with aws_call(self.aws, f"ebs PutSnapshotBlock {self.snapshot_id} block {index}"):
            try:
                self.ebs.put_snapshot_block(
                    SnapshotId=self.snapshot_id,
                    BlockIndex=index,
                    BlockData=data,
                    DataLength=BLOCK,
                    Checksum=digest,
                    ChecksumAlgorithm="SHA256",
                )
            except ClientError as e:  # EBS answers a checksum mismatch (damage in transit) this way
                if error_code(e) == "InvalidSignatureException":
                    raise DataPathError(
                        f"snapshot {self.snapshot_id} block {index}: EBS refused the block's checksum"
                    ) from None
                raise
        with self._lock:
            self.written[index] = digest
            self._file.write(f"{index} {digest}\n")

    def _parent_bits(self) -> bytearray:
        with self._lock:
            if self._parent_blocks is None:
                bits = bytearray()
                if self.parent:
                    for i, _ in list_blocks(self.aws, self.ebs, self.parent):
                        if i // 8 >= len(bits):
                            bits.extend(bytes(i // 8 - len(bits) + 1))
                        bits[i // 8] |= 1 << (i % 8)
                self._parent_blocks = bits
            return self._parent_blocks

    def parent_has(self, index: int) -> bool:
        bits = self._parent_bits()
        return index // 8 < len(bits) and bool(bits[index // 8] & (1 << (index % 8)))

    def data_blocks(self, first: int, last: int) -> list[int]:
        """The indexes in [first, last) of the blocks that may read other than zero, in order: the
        parent's set bits (zero bytes of the map skipped at C speed) and this snapshot's writes."""
        bits = self._parent_bits()
        found: set[int] = set()
        for m in _NONZERO.finditer(bits, first // 8, -(-last // 8)):
            byte = m.start()
            found.update(byte * 8 + b for b in range(8) if bits[byte] >> b & 1)
        with self._lock:
            written = dict(self.written)
        for i, digest in written.items():
            if digest == ZERO_CHECKSUM:
                found.discard(i)
            else:
                found.add(i)
        return sorted(i for i in found if first <= i < last)

    def holds_data(self, index: int) -> bool:
        """Whether the block may read other than zero now: written by this snapshot (not as zeros),
        or inherited from the parent and not overwritten."""
        with self._lock:
            mine = self.written.get(index)
        if mine is not None:
            return mine != ZERO_CHECKSUM
        return self.parent_has(index)

    def zeroed(self, index: int) -> bool:
        with self._lock:
            return self.written.get(index) == ZERO_CHECKSUM

    def clear_beyond(self, end: int) -> None:
        """Make every byte from `end` on read zero, whatever the parent holds there: a disk that shrank
        must not bring back the parent's old blocks if it grows again. Only blocks the parent lists
        are written (the rest read as zero already); the block `end` falls inside keeps its head."""
        if not self.parent or self.parent_tokens is None:
            return
        first = -(-end // BLOCK)
        if end % BLOCK and self.parent_tokens.token(end // BLOCK):
            idx = end // BLOCK
            block = self.parent_tokens.read(idx * BLOCK, end - idx * BLOCK)
            block += bytes(BLOCK - len(block))
            self.put(idx, block, checksum(block))
        for idx, _ in list_blocks(self.aws, self.ebs, self.parent, first):
            self.put(idx, ZERO_BLOCK, ZERO_CHECKSUM)

    def sync(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()


class SnapshotWriter:
    """A BlockWriter into a pending snapshot (whole blocks; a short last block is padded with zeros)."""

    def __init__(self, snap: PendingSnapshot) -> None:
        self.snap = snap

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset % BLOCK:
            raise TargetError(f"snapshot {self.snap.snapshot_id}: write at {offset} is not 512 KiB aligned")
        for pos in range(0, len(data), BLOCK):
            block = bytes(data[pos : pos + BLOCK])
            if len(block) < BLOCK:
                block += bytes(BLOCK - len(block))
            self.snap.put((offset + pos) // BLOCK, block, checksum(block))

    def zero(self, offset: int, length: int) -> None:
        for index in range(offset // BLOCK, -(-(offset + length) // BLOCK)):
            if self.snap.holds_data(index):  # elsewhere the block reads as zero already
                self.snap.put(index, ZERO_BLOCK, ZERO_CHECKSUM)

    def read(self, offset: int, length: int) -> bytes:
        """What the replica holds before this sync's data writes: the parent's blocks, and zeros where
        this snapshot wrote zeros (a shrink's cleared tail, a zero write of an earlier attempt)."""
        tokens = self.snap.parent_tokens
        data = tokens.read(offset, length) if tokens is not None else bytes(length)
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if not any(self.snap.zeroed(i) for i in range(first, last + 1)):
            return data
        out = bytearray(data)
        for i in range(first, last + 1):
            if self.snap.zeroed(i):
                lo, hi = max(offset, i * BLOCK), min(offset + length, (i + 1) * BLOCK)
                out[lo - offset : hi - offset] = bytes(hi - lo)
        return bytes(out)

    def flush(self) -> None:
        self.snap.sync()

    def wire(self) -> None:
        """Blocks go out as PutSnapshotBlock requests with their checksums: nothing to splice."""
        return None

    def close(self) -> None:
        pass


class AwsTargetDisk:
    """TargetDisk for one pending snapshot."""

    block_size = BLOCK

    def __init__(self, snap: PendingSnapshot, size: int) -> None:
        self.snap, self.size, self.has_base = snap, size, snap.parent is not None

    def connect(self) -> SnapshotWriter:
        return SnapshotWriter(self.snap)

    def data_extents(self, start: int, end: int) -> Iterator[Extent]:
        """The whole blocks that may read other than zero (the parent's, or written by this snapshot),
        runs of adjacent blocks as one extent."""
        run: list[int] = []
        for index in self.snap.data_blocks(start // BLOCK, -(-end // BLOCK)):
            if run and index != run[1]:
                yield Extent(run[0] * BLOCK, (run[1] - run[0]) * BLOCK)
                run = []
            run = [run[0] if run else index, index + 1]
        if run:
            yield Extent(run[0] * BLOCK, (run[1] - run[0]) * BLOCK)
