"""Extent algebra: coalesce, split, clip, intersect_dirty, total_length, exactly."""

from __future__ import annotations

import itertools

import pytest

from sendense.datapath.extents import (
    Extent,
    align,
    clip,
    coalesce,
    fill,
    intersect,
    intersect_dirty,
    split,
    total_length,
)

D = Extent  # data


def Z(offset: int, length: int) -> Extent:  # noqa: N802 - reads like a constructor
    return Extent(offset, length, zero=True)


# ------------------------------------------------------------------------------------------ Extent


def test_extent_end_and_default_kind() -> None:
    e = Extent(4096, 8192)
    assert e.end == 12288
    assert e.zero is False


# ---------------------------------------------------------------------------------------- coalesce


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], []),
        ([D(0, 10)], [D(0, 10)]),
        ([D(0, 10), D(10, 5)], [D(0, 15)]),
        ([Z(0, 10), Z(10, 5), Z(15, 1)], [Z(0, 16)]),
        # a different kind is never merged, even when touching
        ([D(0, 10), Z(10, 5), D(15, 5)], [D(0, 10), Z(10, 5), D(15, 5)]),
        # a gap is never bridged
        ([D(0, 10), D(11, 5)], [D(0, 10), D(11, 5)]),
        # empty and negative extents vanish and do not break a run
        ([D(0, 10), D(10, 0), D(10, 5)], [D(0, 15)]),
        ([D(5, 0), D(7, -3)], []),
    ],
)
def test_coalesce(given: list[Extent], expected: list[Extent]) -> None:
    assert list(coalesce(given)) == expected


def test_coalesce_max_length_caps_merges_but_never_splits() -> None:
    four = [D(0, 4), D(4, 4), D(8, 4), D(12, 4)]
    assert list(coalesce(four, max_length=8)) == [D(0, 8), D(8, 8)]
    assert list(coalesce(four, max_length=12)) == [D(0, 12), D(12, 4)]
    assert list(coalesce(four, max_length=7)) == four
    # an extent already longer than the cap is passed through whole
    assert list(coalesce([D(0, 20), D(20, 4)], max_length=8)) == [D(0, 20), D(20, 4)]


def test_coalesce_is_lazy() -> None:
    """It streams: a run is yielded as soon as the next extent ends it (safe on an endless input)."""
    endless = (D(i * 10, 5) for i in itertools.count())
    assert list(itertools.islice(coalesce(endless), 3)) == [D(0, 5), D(10, 5), D(20, 5)]


# ------------------------------------------------------------------------------------------- split


def test_split_data_is_cut_at_chunk_boundaries() -> None:
    assert list(split([D(100, 300)], 128)) == [D(100, 28), D(128, 128), D(256, 128), D(384, 16)]


def test_split_exact_multiple_and_short_extents() -> None:
    assert list(split([D(0, 256)], 128)) == [D(0, 128), D(128, 128)]
    assert list(split([D(10, 20)], 128)) == [D(10, 20)]
    assert list(split([D(0, 0)], 128)) == []


def test_split_zero_extents_use_the_zero_chunk() -> None:
    assert list(split([Z(0, 3 << 30)], 4 << 20)) == [Z(0, 1 << 30), Z(1 << 30, 1 << 30), Z(2 << 30, 1 << 30)]
    assert list(split([Z(50, 300)], 16, zero_chunk=128)) == [Z(50, 78), Z(128, 128), Z(256, 94)]


def test_split_keeps_kind_and_order_across_extents() -> None:
    got = list(split([D(0, 200), Z(200, 100), D(300, 10)], 128, zero_chunk=64))
    assert got == [D(0, 128), D(128, 72), Z(200, 56), Z(256, 44), D(300, 10)]


def test_split_resumed_plan_issues_the_same_requests_as_a_fresh_one() -> None:
    extents = [D(0, 1000), Z(1000, 500), D(1500, 700)]
    fresh = list(split(extents, 128, zero_chunk=256))
    for start in (1, 127, 128, 300, 1000, 1100, 1600):
        resumed = list(split(clip(extents, start), 128, zero_chunk=256))
        # only the first request may differ (it starts at the resume offset); the rest are identical
        assert resumed[1:] == [r for r in fresh if r.offset >= resumed[1].offset], start
        assert resumed[0].offset == start


# -------------------------------------------------------------------------------------------- clip


def test_clip() -> None:
    ex = [D(0, 10), Z(10, 10), D(30, 10)]
    assert list(clip(ex, 5, 35)) == [D(5, 5), Z(10, 10), D(30, 5)]
    assert list(clip(ex, 15)) == [Z(15, 5), D(30, 10)]
    # half-open: an extent ending at start, or starting at end, is dropped
    assert list(clip(ex, 10, 30)) == [Z(10, 10)]
    assert list(clip(ex, 20, 30)) == []
    assert list(clip(ex, 40)) == []
    assert list(clip(ex, 0, 0)) == []
    assert list(clip(ex, 12, 13)) == [Z(12, 1)]


# ---------------------------------------------------------------------------------- intersect_dirty


def test_intersect_without_dirty_map_is_the_allocation_map() -> None:
    alloc = [(0, 100, False), (100, 200, True), (200, 300, False)]
    assert list(intersect_dirty(alloc, None)) == [D(0, 100), Z(100, 100), D(200, 100)]


def test_intersect_splits_dirty_ranges_by_allocation() -> None:
    alloc = [(0, 100, False), (100, 200, True), (200, 300, False)]
    dirty = [(0, 50, False), (50, 150, True), (150, 250, False), (250, 300, True)]
    assert list(intersect_dirty(alloc, dirty)) == [D(50, 50), Z(100, 50), D(250, 50)]


def test_intersect_one_dirty_range_across_many_allocation_ranges() -> None:
    alloc = [(0, 10, False), (10, 20, True), (20, 30, False), (30, 40, True)]
    dirty = [(0, 5, False), (5, 35, True), (35, 40, False)]
    assert list(intersect_dirty(alloc, dirty)) == [D(5, 5), Z(10, 10), D(20, 10), Z(30, 5)]


def test_intersect_same_boundaries_and_clean_maps() -> None:
    alloc = [(0, 64, False), (64, 128, True), (128, 192, False)]
    assert list(intersect_dirty(alloc, [(0, 64, True), (64, 128, True), (128, 192, False)])) == [
        D(0, 64),
        Z(64, 64),
    ]
    assert list(intersect_dirty(alloc, [(0, 192, False)])) == []
    assert list(intersect_dirty(alloc, [(0, 192, True)])) == [D(0, 64), Z(64, 64), D(128, 64)]
    assert list(intersect_dirty([], [(0, 10, True)])) == []


def test_intersect_many_small_dirty_ranges_in_one_allocation_range() -> None:
    alloc = [(0, 1000, False)]
    dirty = [(i * 100, (i + 1) * 100, i % 2 == 1) for i in range(10)]
    assert list(intersect_dirty(alloc, dirty)) == [D(i * 100, 100) for i in range(1, 10, 2)]


# ------------------------------------------------------------------------------------ total_length


def test_total_length() -> None:
    assert total_length([]) == (0, 0)
    assert total_length([D(0, 10), Z(10, 5), D(20, 7)]) == (17, 5)


# ---------------------------------------------------------------------------------------------- align

B = 512 * 1024


def test_align_widens_data_to_whole_blocks_and_merges_what_then_touches() -> None:
    got = list(align([Extent(100, 10), Extent(B + 5, 10), Extent(3 * B - 1, 2)], B))
    assert got == [Extent(0, 4 * B)]  # blocks 0-1 and 2-3, touching: one run


def test_align_keeps_only_whole_blocks_of_a_zero_range_zero() -> None:
    # a zero range from the middle of block 0 to the middle of block 3: blocks 1-2 stay zero, the
    # partly covered blocks 0 and 3 are read again as data (their other part is unchanged)
    got = list(align([Extent(B // 2, 3 * B, True)], B))
    assert got == [Extent(0, B), Extent(B, 2 * B, True), Extent(3 * B, B)]
    assert list(align([Extent(B + 1, B - 2, True)], B)) == [Extent(B, B)]  # inside one block: data
    assert list(align([Extent(0, 2 * B, True)], B)) == [Extent(0, 2 * B, True)]


def test_align_data_beats_zero_in_a_shared_block_and_output_is_sorted_and_disjoint() -> None:
    ext = [Extent(0, B + 4096), Extent(B + 4096, 3 * B - 4096, True), Extent(4 * B, 10)]
    got = list(align(ext, B))
    assert got == [Extent(0, 2 * B), Extent(2 * B, 2 * B, True), Extent(4 * B, B)]
    for a, b in zip(got, got[1:], strict=False):
        assert a.end <= b.offset
    assert all(e.offset % B == 0 and e.length % B == 0 for e in got)


def test_align_covers_every_changed_byte() -> None:
    import random

    rnd = random.Random(7)
    for _ in range(200):
        pos, ext = 0, []
        for _ in range(rnd.randint(1, 8)):
            pos += rnd.choice([0, 0, rnd.randint(1, 3 * B)])
            n = rnd.randint(1, 2 * B)
            ext.append(Extent(pos, n, rnd.random() < 0.4))
            pos += n
        ext = list(coalesce(ext))
        got = list(align(ext, B))
        for e in ext:  # every changed byte is in the output; zero bytes only where whole blocks are
            for probe in (e.offset, e.end - 1):
                hit = [g for g in got if g.offset <= probe < g.end]
                assert len(hit) == 1
                assert not hit[0].zero or e.zero


def test_intersect_gives_the_common_ranges_tagged_as_asked() -> None:
    a = [Extent(0, 10), Extent(20, 10), Extent(40, 5)]
    b = [Extent(5, 20), Extent(28, 20)]
    assert list(intersect(a, b)) == [
        Extent(5, 5, True),
        Extent(20, 5, True),
        Extent(28, 2, True),
        Extent(40, 5, True),
    ]
    assert list(intersect(a, [], zero=False)) == []


def test_fill_keeps_primary_and_adds_only_the_uncovered_parts_of_extra() -> None:
    primary = [Extent(10, 10, True), Extent(30, 5)]
    extra = [Extent(0, 15), Extent(18, 14), Extent(34, 10), Extent(50, 1)]
    out = list(fill(primary, extra))
    assert out == [
        Extent(0, 10),
        Extent(10, 10, True),
        Extent(20, 10),
        Extent(30, 5),
        Extent(35, 9),
        Extent(50, 1),
    ]
    # sorted and disjoint, primary wins wherever both cover a range
    assert all(x.end <= y.offset for x, y in itertools.pairwise(out))
    assert list(fill([], extra)) == extra and list(fill(primary, [])) == primary
