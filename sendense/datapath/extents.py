"""Extents: what to copy. Pure functions over (offset, length, zero) ranges."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    zero: bool = False  # reads as zeroes on the source: replicate as a zero range, no payload

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(extents: Iterable[Extent], max_length: int | None = None) -> Iterator[Extent]:
    """Merge touching extents of the same kind (data or zero), optionally capping merged length."""
    cur: Extent | None = None
    for e in extents:
        if e.length <= 0:
            continue
        if (
            cur is not None
            and cur.end == e.offset
            and cur.zero == e.zero
            and (max_length is None or cur.length + e.length <= max_length)
        ):
            cur = Extent(cur.offset, cur.length + e.length, cur.zero)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def split(extents: Iterable[Extent], data_chunk: int, zero_chunk: int = 1 << 30) -> Iterator[Extent]:
    """Cut extents into requests: data ones at most `data_chunk`, zero ones at most `zero_chunk`.

    Data chunks are aligned to `data_chunk` boundaries where possible so that resumed and fresh
    copies issue the same requests.
    """
    for e in extents:
        step = zero_chunk if e.zero else data_chunk
        off, end = e.offset, e.end
        while off < end:
            nxt = min(end, (off // step + 1) * step)
            yield Extent(off, nxt - off, e.zero)
            off = nxt


def clip(extents: Iterable[Extent], start: int, end: int | None = None) -> Iterator[Extent]:
    """Only the parts of extents inside [start, end)."""
    for e in extents:
        lo = max(e.offset, start)
        hi = e.end if end is None else min(e.end, end)
        if hi > lo:
            yield Extent(lo, hi - lo, e.zero)


def align(extents: Iterable[Extent], block: int) -> Iterator[Extent]:
    """Widen sorted, coalesced extents to whole `block`s, for targets that write only whole blocks
    (a snapshot API's fixed block). A block touched by data, or only partly covered by a zero range (the
    rest of it is unchanged and must be sent again), becomes data: the whole block is read from the
    source. Only blocks entirely inside a zero range stay zero. Output is sorted and coalesced;
    the caller clips it to the disk's end."""

    def pieces(e: Extent) -> Iterator[Extent]:
        lo, hi = e.offset // block * block, -(-e.end // block) * block
        if not e.zero:
            yield Extent(lo, hi - lo)
            return
        full_lo, full_hi = -(-e.offset // block) * block, e.end // block * block
        if full_lo >= full_hi:  # no whole block inside
            yield Extent(lo, hi - lo)
            return
        if lo < full_lo:
            yield Extent(lo, full_lo - lo)
        yield Extent(full_lo, full_hi - full_lo, True)
        if full_hi < hi:
            yield Extent(full_hi, hi - full_hi)

    def disjoint() -> Iterator[Extent]:
        end = 0
        for e in extents:
            for p in pieces(e):
                if p.offset < end:  # only data widened over a block it shares with the previous extent
                    if p.end <= end:
                        continue
                    p = Extent(end, p.end - end)
                end = p.end
                yield p

    return coalesce(disjoint())


def intersect_dirty(
    alloc: Iterable[tuple[int, int, bool]], dirty: Iterable[tuple[int, int, bool]] | None
) -> Iterator[Extent]:
    """Combine allocation with a dirty map, both as sorted, contiguous (start, end, flag) lists.

    `alloc` flags say "reads as zero"; `dirty` flags say "changed". With `dirty` None everything
    counts as changed. Yields the changed ranges, each tagged data or zero.
    """
    if dirty is None:
        for s, e, z in alloc:
            yield Extent(s, e - s, z)
        return
    a_iter, d_iter = iter(alloc), iter(dirty)
    a = next(a_iter, None)
    d = next(d_iter, None)
    while a is not None and d is not None:
        lo, hi = max(a[0], d[0]), min(a[1], d[1])
        if hi > lo and d[2]:
            yield Extent(lo, hi - lo, a[2])
        if a[1] <= d[1]:
            a = next(a_iter, None)
        else:
            d = next(d_iter, None)


def total_length(extents: Iterable[Extent]) -> tuple[int, int]:
    """(data bytes, zero bytes)."""
    data = zero = 0
    for e in extents:
        if e.zero:
            zero += e.length
        else:
            data += e.length
    return data, zero


def intersect(a: Iterable[Extent], b: Iterable[Extent], *, zero: bool = True) -> Iterator[Extent]:
    """The ranges covered by both sorted, disjoint extent lists, tagged `zero`."""
    a_iter, b_iter = iter(a), iter(b)
    x, y = next(a_iter, None), next(b_iter, None)
    while x is not None and y is not None:
        lo, hi = max(x.offset, y.offset), min(x.end, y.end)
        if hi > lo:
            yield Extent(lo, hi - lo, zero)
        if x.end <= y.end:
            x = next(a_iter, None)
        else:
            y = next(b_iter, None)


def fill(primary: Iterable[Extent], extra: Iterable[Extent]) -> Iterator[Extent]:
    """`primary` as it is, plus the parts of `extra` that no primary extent covers, in offset
    order (both sorted and disjoint). Primary wins: a range both list is copied as primary says."""
    it = iter(extra)
    pending = next(it, None)
    for p in primary:
        while pending is not None and pending.offset < p.offset:
            if pending.end <= p.offset:
                yield pending
                pending = next(it, None)
            else:
                yield Extent(pending.offset, p.offset - pending.offset, pending.zero)
                pending = Extent(p.offset, pending.end - p.offset, pending.zero)
        while pending is not None and pending.offset < p.end:  # covered by p, wholly or partly
            if pending.end <= p.end:
                pending = next(it, None)
            else:
                pending = Extent(p.end, pending.end - p.end, pending.zero)
        yield p
    while pending is not None:
        yield pending
        pending = next(it, None)
