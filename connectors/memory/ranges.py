"""Sets of byte ranges as sorted, disjoint, non-touching [start, end) pairs (what changed on a disk)."""

from __future__ import annotations

from collections.abc import Iterable

Ranges = list[tuple[int, int]]


def add(ranges: Ranges, start: int, end: int) -> Ranges:
    """`ranges` with [start, end) added, merged with every range it overlaps or touches."""
    if end <= start:
        return list(ranges)
    out: Ranges = []
    placed = False
    for s, e in ranges:
        if e < start:
            out.append((s, e))
        elif s > end:
            if not placed:
                out.append((start, end))
                placed = True
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    if not placed:
        out.append((start, end))
    return out


def union(*sets: Iterable[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    for rs in sets:
        for s, e in rs:
            out = add(out, s, e)
    return out


def blocks(ranges: Ranges, block: int, start: int, end: int) -> list[int]:
    """Indexes of the `block`-sized blocks that `ranges` touch within [start, end), in order."""
    out: list[int] = []
    for s, e in ranges:
        s, e = max(s, start), min(e, end)
        if e <= s:
            continue
        first, last = s // block, (e - 1) // block
        if out and first <= out[-1]:
            first = out[-1] + 1
        out.extend(range(first, last + 1))
    return out


def as_json(ranges: Ranges) -> list[list[int]]:
    return [[s, e] for s, e in ranges]


def from_json(value: object) -> Ranges:
    if not isinstance(value, list):
        return []
    return [(int(s), int(e)) for s, e in value]
