"""What differs between two EBS snapshots, whatever their lineage.

`ListChangedBlocks` answers for two snapshots of one volume/snapshot lineage only. A volume made from
snapshot A continues A's lineage (EBS user guide, "Write snapshots": snapshot D of volume 1 made from A
is an incremental snapshot of A), so a failed-over instance's snapshot diffs against its point's
snapshot directly. Where EBS refuses the pair (UNRELATED_SNAPSHOTS: a volume not made from that
snapshot), both snapshots' block lists are merged and each block both hold is compared by the SHA256
checksum EBS sends with it (`GetSnapshotBlock`'s header; the body is not read): only differing blocks
are listed. Block tokens are never compared (EBS issues fresh ones at every listing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from connectors.aws.blocks import BLOCK, list_blocks, list_changed
from connectors.aws.client import Aws, aws_call
from sendense.datapath.extents import Extent
from sendense.errors import ChangeTrackingLost, SendenseError

log = logging.getLogger(__name__)


def changed_between(aws: Aws, ebs: Any, first: str, second: str, start: int = 0) -> Iterator[Extent]:
    """One extent per 512 KiB block that reads otherwise in `second` than in `first`, from block
    `start`, in order (zero: `second` does not hold the block). ListChangedBlocks where EBS accepts
    the pair, else a checksum compare of both block lists."""
    pos = start
    try:
        for idx, token in list_changed(aws, ebs, first, second, start):
            yield Extent(idx * BLOCK, BLOCK, zero=token is None)
            pos = idx + 1
        return
    except ChangeTrackingLost as e:
        log.info("%s; comparing the checksums of the blocks of %s and %s instead", e, first, second)
    yield from compared(aws, ebs, first, second, pos)


def compared(aws: Aws, ebs: Any, first: str, second: str, start: int = 0) -> Iterator[Extent]:
    """The checksum compare: a block one snapshot holds and the other not, or both with another
    checksum. A listing of `first` that fails (gone) raises ChangeTrackingLost."""
    try:
        a = dict(list_blocks(aws, ebs, first, start))
    except SendenseError as e:  # gone, or refused: it cannot be compared
        raise ChangeTrackingLost(f"snapshot {first} cannot be listed: {e}") from None
    b = dict(list_blocks(aws, ebs, second, start))
    for idx in sorted(a.keys() | b.keys()):
        if idx not in b:
            yield Extent(idx * BLOCK, BLOCK, zero=True)
        elif idx not in a or _checksum(aws, ebs, first, idx, a[idx]) != _checksum(
            aws, ebs, second, idx, b[idx]
        ):
            yield Extent(idx * BLOCK, BLOCK)


def _checksum(aws: Aws, ebs: Any, snapshot_id: str, index: int, token: str) -> str:
    with aws_call(aws, f"ebs GetSnapshotBlock {snapshot_id} block {index}"):
        r = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
        r["BlockData"].close()  # the header is what is compared
    return str(r.get("Checksum", ""))
