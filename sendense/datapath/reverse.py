"""A failback's reverse sync: the failed-over VM's changes, plus where the original place diverged.

The original disk holds the failover point's content only where it did not change after the point:
after an unplanned failover the source wrote on (its last writes never reached a point), and every
earlier reverse sync wrote there too. Those ranges (`FailbackSink.diverged`) are copied as well, as
data: read from the VM, compared with the original, written where they differ. So the original ends
up equal to the VM's snapshot whatever it held, and a copy in compare mode (`Tuning.dedupe_incremental`)
writes only what differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sendense.datapath.copy import BlockReader
from sendense.datapath.extents import Extent, clip, coalesce, fill
from sendense.protocols import SourceDisk


class WithDiverged:
    """`src` (a SourceDisk) whose incremental extents also cover `diverged` (sorted ranges), as data."""

    def __init__(self, src: SourceDisk, diverged: Iterable[Extent]) -> None:
        self.src = src
        self.size, self.tracks_resize = src.size, src.tracks_resize
        self.diverged = list(coalesce(Extent(e.offset, e.length) for e in diverged))

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        if since is None:  # every range already
            yield from self.src.extents(None, start)
            return
        yield from fill(coalesce(clip(self.src.extents(since, start), start)), clip(self.diverged, start))

    def connect(self) -> BlockReader:
        return self.src.connect()
