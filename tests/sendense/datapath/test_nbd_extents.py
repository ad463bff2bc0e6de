"""NbdConnection.changed_extents against real `qemu-nbd --read-only --bitmap` exports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_kvm import CLUSTER, KiB, MiB, make_qcow2, qemu_io, run

from sendense.datapath.extents import Extent, clip, coalesce
from sendense.datapath.nbd import ALLOCATION, NbdConnection, dirty_context
from sendense.errors import ChangeTrackingLost
from tools.qemu import NbdServer, qemu_nbd

SIZE = 64 * MiB
BITMAP = "b0"


def D(offset: int, length: int) -> Extent:  # noqa: N802
    return Extent(offset, length)


def Z(offset: int, length: int) -> Extent:  # noqa: N802
    return Extent(offset, length, zero=True)


BEFORE_BITMAP = ("write -P 0x01 20M 1M", "write -P 0x02 30M 1M")  # data the bitmap never saw
AFTER_BITMAP = (
    "write -P 0x11 1M 64k",
    "write -P 0x12 2M 128k",
    "write -P 0x13 3M 64k",  # two adjacent writes
    "write -P 0x14 3136k 64k",
    "write -P 0x15 5M 192k",  # two overlapping writes
    "write -P 0x16 5248k 192k",
    "write -z 20M 256k",  # zeroes over data written before the bitmap: dirty, reads zero
    "write -z 40M 1M",  # zeroes over a hole
    "write -P 0x17 50M 64k",  # data, then zeroes right after it
    "write -z 51264k 64k",
    "write -P 0x18 65472k 64k",  # the last cluster
)
CHANGED = [
    D(1 * MiB, 64 * KiB),
    D(2 * MiB, 128 * KiB),
    D(3 * MiB, 128 * KiB),
    D(5 * MiB, 320 * KiB),
    Z(20 * MiB, 256 * KiB),
    Z(40 * MiB, 1 * MiB),
    D(50 * MiB, 64 * KiB),
    Z(50 * MiB + 64 * KiB, 64 * KiB),
    D(SIZE - 64 * KiB, 64 * KiB),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = make_qcow2(tmp_path_factory.mktemp("nbd-extents") / "disk.qcow2", SIZE)
    qemu_io(img, *BEFORE_BITMAP)
    run("qemu-img", "bitmap", "--add", "--enable", img, BITMAP)
    qemu_io(img, *AFTER_BITMAP)
    return img


@pytest.fixture(scope="module")
def export(image: Path) -> Iterator[NbdServer]:
    with qemu_nbd(image, readonly=True, bitmaps=[BITMAP]) as srv:
        yield srv


def changed(srv: NbdServer, bitmap: str | None, **kw: int) -> list[Extent]:
    ctx = (ALLOCATION,) if bitmap is None else (ALLOCATION, dirty_context(bitmap))
    with NbdConnection(srv.uri, contexts=ctx) as c:
        return list(c.changed_extents(bitmap, **kw))


def test_dirty_extents_are_exact_at_cluster_granularity(export: NbdServer) -> None:
    assert list(coalesce(changed(export, BITMAP))) == CHANGED


def test_extents_come_in_order_without_overlap(export: NbdServer) -> None:
    got = changed(export, BITMAP)
    assert all(a.end <= b.offset for a, b in zip(got, got[1:], strict=False))
    assert all(e.length > 0 for e in got)


def test_without_a_bitmap_every_range_is_reported_with_its_kind(export: NbdServer) -> None:
    got = list(coalesce(changed(export, None)))
    # contiguous cover of the whole disk
    assert got[0].offset == 0 and got[-1].end == SIZE
    assert all(a.end == b.offset for a, b in zip(got, got[1:], strict=False))
    assert [e for e in got if not e.zero] == [
        D(1 * MiB, 64 * KiB),
        D(2 * MiB, 128 * KiB),
        D(3 * MiB, 128 * KiB),
        D(5 * MiB, 320 * KiB),
        D(20 * MiB + 256 * KiB, 768 * KiB),  # written before the bitmap, minus the zeroed head
        D(30 * MiB, 1 * MiB),
        D(50 * MiB, 64 * KiB),
        D(SIZE - 64 * KiB, 64 * KiB),
    ]


@pytest.mark.parametrize("window", [CLUSTER, 1 * MiB, 1 * MiB + 4 * KiB, 3 * MiB + 512])
def test_a_small_window_gives_the_same_extents(export: NbdServer, window: int) -> None:
    assert list(coalesce(changed(export, BITMAP, window=window))) == CHANGED
    assert list(coalesce(changed(export, None, window=window))) == list(coalesce(changed(export, None)))


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, SIZE),
        (2 * MiB + 64 * KiB, 5 * MiB + 64 * KiB),
        (20 * MiB + 4 * KiB, 50 * MiB + 96 * KiB),
        (60 * MiB, SIZE),
    ],
)
def test_start_and_end_clip_exactly(export: NbdServer, start: int, end: int) -> None:
    assert list(coalesce(changed(export, BITMAP, start=start, end=end, window=1 * MiB))) == list(
        clip(CHANGED, start, end)
    )


def test_a_partial_cluster_write_dirties_its_whole_cluster(tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "partial.qcow2", 16 * MiB, bitmaps=(BITMAP,))
    qemu_io(img, "write -P 0x21 7172k 4k", "write -P 0x22 9000k 10k")  # 7M+4K; 9000K spans 8960K..9024K
    with qemu_nbd(img, readonly=True, bitmaps=[BITMAP]) as srv:
        got = changed(srv, BITMAP)
    dirty = [(7 * MiB, 7 * MiB + CLUSTER), (8960 * KiB, 9024 * KiB)]
    # the dirty ranges are the written clusters, each split into data and zero parts
    assert [(e.offset, e.end) for e in coalesce(Extent(e.offset, e.length) for e in got)] == dirty
    data = [e for e in got if not e.zero]
    for lo, hi in [(7172 * KiB, 7176 * KiB), (9000 * KiB, 9010 * KiB)]:
        assert any(e.offset <= lo and hi <= e.end for e in data), (lo, hi, got)


def test_a_disk_size_that_is_not_cluster_aligned(tmp_path: Path) -> None:
    size = 16 * MiB + 4 * KiB
    img = make_qcow2(tmp_path / "odd.qcow2", size, bitmaps=(BITMAP,))
    qemu_io(img, "write -P 0x31 16M 4k")
    with qemu_nbd(img, readonly=True, bitmaps=[BITMAP]) as srv:
        assert changed(srv, BITMAP) == [D(16 * MiB, 4 * KiB)]
        everything = list(coalesce(changed(srv, None, window=1 * MiB)))
    assert everything == [Z(0, 16 * MiB), D(16 * MiB, 4 * KiB)]


def test_a_bitmap_that_is_not_exported_means_tracking_is_lost(image: Path, export: NbdServer) -> None:
    with pytest.raises(ChangeTrackingLost, match="nope"):
        changed(export, "nope")
    # the bitmap exists in the image, but this export does not carry it
    with qemu_nbd(image, readonly=True) as plain, pytest.raises(ChangeTrackingLost, match=BITMAP):
        changed(plain, BITMAP)
    # a connection that did not ask for the context cannot use it either
    with NbdConnection(export.uri, contexts=(ALLOCATION,)) as c, pytest.raises(ChangeTrackingLost):
        list(c.changed_extents(BITMAP))
