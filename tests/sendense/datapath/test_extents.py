"""Extent algebra: coalesce, split, clip, intersect_dirty, total_length, exactly."""

from __future__ import annotations

import itertools

import pytest

from sendense.datapath.extents import Extent, clip, coalesce, intersect_dirty, split, total_length

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
