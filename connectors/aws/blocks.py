"""EBS snapshot blocks through the EBS direct APIs: listing, reading with checksum checks, tokens.

Blocks are 512 KiB (BlockSize 524288); a block index is offset / 524288. A snapshot lists the
blocks that were ever written in its lineage, each with a BlockToken that GetSnapshotBlock needs;
blocks not listed read as zero. Listings are paginated (at most 10,000 blocks a page).
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError

from connectors.aws.client import Aws, aws_call, error_code, is_not_found
from sendense.errors import ChangeTrackingLost, DataPathError

BLOCK = 512 * 1024
PAGE = 10000  # MaxResults: the most a listing page may hold
ZERO_BLOCK = bytes(BLOCK)


def checksum(data: bytes) -> str:
    """x-amz-Checksum: base64 of the block's SHA256."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


ZERO_CHECKSUM = checksum(ZERO_BLOCK)


def linear_checksum(checksums: list[str]) -> str:
    """CompleteSnapshot's LINEAR aggregate: SHA256 over the blocks' SHA256 digests (raw bytes, not
    their base64) concatenated in block order, as AWS's own coldsnap computes it."""
    h = hashlib.sha256()
    for c in checksums:
        h.update(base64.b64decode(c))
    return base64.b64encode(h.digest()).decode()


def list_blocks(aws: Aws, ebs: Any, snapshot_id: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, token) of every block of a snapshot from block `start`, in index order."""
    kw: dict[str, Any] = {"SnapshotId": snapshot_id, "MaxResults": PAGE, "StartingBlockIndex": start}
    while True:
        with aws_call(aws, f"ebs ListSnapshotBlocks {snapshot_id}"):
            page = ebs.list_snapshot_blocks(**kw)
        for b in page.get("Blocks", []):
            yield b["BlockIndex"], b["BlockToken"]
        token = page.get("NextToken")
        if not token:
            return
        kw = {"SnapshotId": snapshot_id, "MaxResults": PAGE, "NextToken": token}


def list_changed(
    aws: Aws, ebs: Any, first: str, second: str, start: int = 0
) -> Iterator[tuple[int, str | None]]:
    """(index, token in `second` or None) of every block that differs between two snapshots of one
    lineage, from block `start`, in index order."""
    if not re.match(r"^snap-[0-9a-f]+\Z", first):
        raise ChangeTrackingLost(
            f"change id {first!r} is not an EBS snapshot id: no changes can be listed since it"
        )
    kw: dict[str, Any] = {
        "FirstSnapshotId": first,
        "SecondSnapshotId": second,
        "MaxResults": PAGE,
        "StartingBlockIndex": start,
    }
    while True:
        with aws_call(aws, f"ebs ListChangedBlocks {first}..{second}"):
            try:
                page = ebs.list_changed_blocks(**kw)
            except ClientError as e:
                if error_code(e) == "ValidationException" and "UNRELATED" in _reason(e):
                    raise ChangeTrackingLost(
                        f"snapshots {first} and {second} are of different volumes"
                    ) from None
                if is_not_found(e):  # (`second` is this sync's own snapshot, open: the base is what is gone)
                    raise ChangeTrackingLost(f"base snapshot {first} is gone") from None
                raise
        for b in page.get("ChangedBlocks", []):
            yield b["BlockIndex"], b.get("SecondBlockToken")
        token = page.get("NextToken")
        if not token:
            return
        kw = {"FirstSnapshotId": first, "SecondSnapshotId": second, "MaxResults": PAGE, "NextToken": token}


def _reason(e: ClientError) -> str:
    r = e.response
    return str(
        r.get("Reason") or r.get("Error", {}).get("Reason") or r.get("Error", {}).get("Message", "")
    ).upper()


def get_block(aws: Aws, ebs: Any, snapshot_id: str, index: int, token: str) -> bytes:
    """One block's bytes, its SHA256 checked against the checksum AWS sent with it."""
    with aws_call(aws, f"ebs GetSnapshotBlock {snapshot_id} block {index}"):
        r = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
        body = r["BlockData"]
        try:
            data = body.read()
        finally:
            body.close()
    if len(data) != BLOCK or int(r.get("DataLength", BLOCK)) != BLOCK:
        raise DataPathError(f"snapshot {snapshot_id} block {index}: {len(data)} bytes read, expected {BLOCK}")
    if r.get("ChecksumAlgorithm", "SHA256") != "SHA256" or checksum(data) != r.get("Checksum"):
        raise DataPathError(f"snapshot {snapshot_id} block {index}: checksum mismatch (corrupted in transit)")
    return data


class BlockTokens:
    """A completed snapshot's blocks for reading: their tokens, fetched a listing page at a time as
    reads move through the disk (readers go in offset order), a few pages kept, so memory stays small
    whatever the disk size. Thread-safe; a block not in the snapshot has no token and reads as zero."""

    def __init__(self, aws: Aws, ebs: Any, snapshot_id: str, keep: int = 8) -> None:
        self.aws, self.ebs, self.snapshot_id, self.keep = aws, ebs, snapshot_id, keep
        self._pages: OrderedDict[int, tuple[int, dict[int, str]]] = OrderedDict()  # start -> (end, tokens)
        self._lock = threading.Lock()

    def token(self, index: int) -> str | None:
        with self._lock:
            for start, (end, tokens) in self._pages.items():
                if start <= index < end:
                    self._pages.move_to_end(start)
                    return tokens.get(index)
            end, tokens = self._fetch(index)
            self._pages[index] = (end, tokens)
            while len(self._pages) > self.keep:
                self._pages.popitem(last=False)
            return tokens.get(index)

    def read(self, offset: int, length: int) -> bytes:
        """Any range of the snapshot, block by block (checksums checked); unlisted blocks are zero."""
        if offset % BLOCK == 0 and length == BLOCK:  # the common case: one whole block
            token = self.token(offset // BLOCK)
            return (
                get_block(self.aws, self.ebs, self.snapshot_id, offset // BLOCK, token)
                if token
                else ZERO_BLOCK
            )
        out = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            idx = pos // BLOCK
            lo, hi = pos - idx * BLOCK, min(BLOCK, end - idx * BLOCK)
            token = self.token(idx)
            if token:
                data = get_block(self.aws, self.ebs, self.snapshot_id, idx, token)
                out[pos - offset : pos - offset + hi - lo] = data[lo:hi]
            pos += hi - lo
        return bytes(out)

    def _fetch(self, start: int) -> tuple[int, dict[int, str]]:
        """One page from `start`: it covers up to its last block, or to the end if it is the last."""
        with aws_call(self.aws, f"ebs ListSnapshotBlocks {self.snapshot_id}"):
            page = self.ebs.list_snapshot_blocks(
                SnapshotId=self.snapshot_id, MaxResults=PAGE, StartingBlockIndex=start
            )
        tokens = {b["BlockIndex"]: b["BlockToken"] for b in page.get("Blocks", [])}
        end = max(tokens) + 1 if page.get("NextToken") and tokens else 1 << 62
        return end, tokens
