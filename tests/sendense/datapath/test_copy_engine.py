"""run_copy against real qemu-nbd exports: a read-only qcow2 source and a writable qcow2 target."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_kvm import MiB, allocation_map, make_qcow2, qemu_io, same_content, to_raw

from sendense.datapath.copy import CopyPlan, run_copy
from sendense.datapath.extents import Extent, clip, coalesce, split
from sendense.datapath.nbd import ALLOCATION, NbdConnection
from sendense.errors import DataPathError
from sendense.models import CopyStats
from tools.qemu import NbdServer, qemu_nbd

SIZE = 64 * MiB
EXPLICIT_ZEROES = (8 * MiB, 2 * MiB)  # allocated on the source, but every byte is zero

SOURCE_WRITES = (
    "write -P 0x11 0 4M",
    "write -P 0 8M 2M",  # EXPLICIT_ZEROES
    "write -P 0x22 12352k 1152k",  # 12M+64K .. 13M+192K: unaligned, spans two 1 MiB chunks
    "write -z 20M 1M",
    "write -P 0x33 40M 8M",
    "write -P 0x44 63M 1M",  # the tail
)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, NbdServer, bytes]]:
    """(image, read-only export, its bytes)."""
    d = tmp_path_factory.mktemp("copy-src")
    img = make_qcow2(d / "src.qcow2", SIZE)
    qemu_io(img, *SOURCE_WRITES)
    raw = to_raw(img, d / "src.raw").read_bytes()
    with qemu_nbd(img, readonly=True) as srv:
        yield img, srv, raw


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[Path, NbdServer]]:
    img = make_qcow2(tmp_path / "tgt.qcow2", SIZE)
    with qemu_nbd(img, readonly=False) as srv:
        yield img, srv


def data_extents(srv: NbdServer) -> list[Extent]:
    """What a full sync copies: the source's data ranges."""
    with NbdConnection(srv.uri, contexts=(ALLOCATION,)) as c:
        return list(coalesce(e for e in c.changed_extents(None) if not e.zero))


def all_extents(srv: NbdServer) -> list[Extent]:
    with NbdConnection(srv.uri, contexts=(ALLOCATION,)) as c:
        return list(coalesce(c.changed_extents(None)))


def plan(src: NbdServer, tgt: NbdServer, extents: object, **kw: object) -> CopyPlan:
    return CopyPlan(
        extents=extents,  # type: ignore[arg-type]
        open_reader=lambda: NbdConnection(src.uri),
        open_writer=lambda: NbdConnection(tgt.uri, writable=True),
        **{"chunk_size": 1 * MiB, "connections": 3, **kw},  # type: ignore[arg-type]
    )


def copy_threads(before: set[threading.Thread] | None = None) -> list[threading.Thread]:
    """Live copy threads, other than those in `before` (left over by an earlier test)."""
    return [
        t
        for t in threading.enumerate()
        if t.name in ("copy-worker", "copy-dispatch") and t.is_alive() and t not in (before or set())
    ]


def overlaps(e: dict, lo: int, hi: int) -> bool:
    return e["start"] < hi and e["start"] + e["length"] > lo


# ------------------------------------------------------------------------------------------ copying


def test_full_copy_is_bit_exact_and_zero_chunks_carry_no_payload(source, target) -> None:
    src_img, src, _ = source
    tgt_img, tgt = target
    extents = data_extents(src)
    assert Extent(*EXPLICIT_ZEROES) in extents  # precondition: the source reports it as data

    stats, watermark = run_copy(plan(src, tgt, extents))

    data = sum(e.length for e in extents)
    zeroed = EXPLICIT_ZEROES[1]
    assert stats.bytes_read == data
    assert stats.bytes_zeroed == zeroed
    assert stats.bytes_written == data - zeroed
    assert stats.bytes_skipped == 0
    assert stats.extents == len(list(split(extents, 1 * MiB)))
    assert watermark == extents[-1].end == SIZE
    tgt.stop()
    assert same_content(src_img, tgt_img)
    # the all-zero chunks became zero clusters on the target, not allocated data
    lo, hi = EXPLICIT_ZEROES[0], sum(EXPLICIT_ZEROES)
    around = [e for e in allocation_map(tgt_img) if overlaps(e, lo, hi)]
    assert around and all(not e["data"] and e["zero"] for e in around), around
    written = [e for e in allocation_map(tgt_img) if e["data"]]
    assert sum(e["length"] for e in written) == data - zeroed


def test_empty_plan_copies_nothing(source, target) -> None:
    _, src, _ = source
    _, tgt = target
    calls: list[int] = []
    stats, watermark = run_copy(plan(src, tgt, [], on_checkpoint=lambda o, d, s: calls.append(o)))
    assert stats.bytes_read == stats.bytes_written == stats.extents == 0
    assert watermark == 0
    assert calls == [0]


def test_zero_extents_are_written_as_zero_ranges(source, target) -> None:
    """A changed range that reads as zero (e.g. a discard in an incremental) zeroes the target."""
    src_img, src, _ = source
    tgt_img, tgt = target
    with NbdConnection(tgt.uri, writable=True) as w:
        w.write(20 * MiB, b"\xee" * MiB)  # the source range 20M..21M was written with -z
    stats, _ = run_copy(plan(src, tgt, [Extent(20 * MiB, MiB, zero=True)]))
    assert (stats.bytes_read, stats.bytes_written, stats.bytes_zeroed) == (0, 0, MiB)
    with NbdConnection(tgt.uri) as r:
        assert r.read(20 * MiB, MiB) == bytes(MiB)


def test_compare_mode_writes_only_differing_blocks(source, target) -> None:
    """A resync reads every chunk, compares it with the replica block by block and writes
    only the blocks that differ (compare_block, 4 KiB by default); every byte read is accounted as
    skipped, written or zeroed."""
    src_img, src, _ = source
    tgt_img, tgt = target
    run_copy(plan(src, tgt, data_extents(src)))
    with NbdConnection(tgt.uri, writable=True) as w:
        w.write(1 * MiB + 4096, b"\xaa" * 4096)  # differs inside data block 1M..1M+64K
        w.write(44 * MiB, b"\xbb" * 10)  # differs inside data block 44M..44M+64K
        w.write(30 * MiB, b"\xcc" * 512)  # garbage in a hole of the source
        w.write(8 * MiB + 5, b"\xdd")  # garbage in the explicit-zero block 8M..8M+64K
        w.flush()
    extents = all_extents(src)  # a resync reads every range
    block = 4 << 10

    stats, _ = run_copy(plan(src, tgt, extents, mode="compare"))

    data = sum(e.length for e in extents if not e.zero)
    holes = sum(e.length for e in extents if e.zero)
    assert stats.bytes_read == data
    assert stats.bytes_written == 2 * block  # the two differing data blocks, nothing else
    assert stats.bytes_zeroed == holes + block  # holes are zeroed unread; one differing zero block
    assert stats.bytes_skipped == data - 3 * block  # everything else read was equal
    tgt.stop()
    assert same_content(src_img, tgt_img)


def test_compare_mode_with_whole_chunks_differing(source, target) -> None:
    """Runs of differing blocks up to the end of a chunk, and whole differing chunks."""
    src_img, src, _ = source
    tgt_img, tgt = target
    run_copy(plan(src, tgt, data_extents(src)))
    with NbdConnection(tgt.uri, writable=True) as w:
        w.write(2 * MiB - 128 * 1024, b"\xaa" * 128 * 1024)  # the last two blocks of chunk 1M..2M
        w.write(41 * MiB, b"\xbb" * MiB)  # all of chunk 41M..42M
        w.flush()
    extents = all_extents(src)
    stats, _ = run_copy(plan(src, tgt, extents, mode="compare"))
    data = sum(e.length for e in extents if not e.zero)
    assert stats.bytes_written == 128 * 1024 + MiB
    assert stats.bytes_skipped == data - stats.bytes_written
    tgt.stop()
    assert same_content(src_img, tgt_img)


# -------------------------------------------------------------------------------- checkpoints, resume


def test_checkpoint_watermarks_are_monotonic_and_below_them_the_target_is_complete(source, target) -> None:
    _, src, raw = source
    _, tgt = target
    extents = data_extents(src)
    seen: list[tuple[int, int]] = []
    verified = [0]
    probe = NbdConnection(tgt.uri)

    def on_checkpoint(offset: int, done: int, stats: CopyStats) -> None:
        seen.append((offset, done))
        lo = verified[0]
        assert offset >= lo
        if offset > lo:  # nothing below an earlier watermark is written again, so check the new part
            assert probe.read(lo, offset - lo) == raw[lo:offset], f"target incomplete below {offset}"
            verified[0] = offset

    try:
        stats, watermark = run_copy(
            plan(
                src, tgt, extents, chunk_size=256 << 10, checkpoint_bytes=1 * MiB, on_checkpoint=on_checkpoint
            )
        )
    finally:
        probe.close()
    data = sum(e.length for e in extents)
    assert len(seen) >= 8
    assert [o for o, _ in seen] == sorted(o for o, _ in seen)
    assert [d for _, d in seen] == sorted(d for _, d in seen)
    assert seen[-1] == (watermark, data) == (SIZE, data)
    assert verified[0] == SIZE


def test_resume_from_a_watermark_finishes_bit_exact(source, target) -> None:
    src_img, src, raw = source
    tgt_img, tgt = target
    extents = data_extents(src)
    marks: list[int] = []

    def on_checkpoint(offset: int, done: int, stats: CopyStats) -> None:
        marks.append(offset)

    with pytest.raises(DataPathError, match="cancelled"):
        run_copy(
            plan(
                src,
                tgt,
                extents,
                chunk_size=256 << 10,
                checkpoint_bytes=2 * MiB,
                on_checkpoint=on_checkpoint,
                cancelled=lambda: any(0 < m < 40 * MiB for m in marks),
            )
        )
    resume = next(m for m in marks if m > 0)
    assert 0 < resume < 40 * MiB
    # whatever the interrupted copy left above the watermark is rewritten by the resumed one
    with NbdConnection(tgt.uri, writable=True) as w:
        for e in clip(extents, resume):
            w.write(e.offset, b"\x5a" * min(e.length, 64 << 10))

    stats, watermark = run_copy(plan(src, tgt, clip(extents, resume), chunk_size=256 << 10))

    assert stats.bytes_read == sum(e.length for e in clip(extents, resume))
    assert watermark == SIZE
    tgt.stop()
    assert same_content(src_img, tgt_img)


# ------------------------------------------------------------------------------- failures, memory


class CountingReader:
    """Wraps a reader: counts concurrent reads, can fail or be slow."""

    lock = threading.Lock()

    def __init__(self, inner: NbdConnection, state: dict, fail_at: int | None = None, delay: float = 0.0):
        self.inner, self.state, self.fail_at, self.delay = inner, state, fail_at, delay

    def wire(self) -> None:  # every read must come through read(): no splicing
        return None

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.state["reads"] += 1
            n = self.state["reads"]
            self.state["now"] += 1
            self.state["max"] = max(self.state["max"], self.state["now"])
        try:
            time.sleep(self.delay)
            if self.fail_at is not None and n >= self.fail_at:
                raise DataPathError(f"read {length}@{offset}: injected failure")
            return self.inner.read(offset, length)
        finally:
            with self.lock:
                self.state["now"] -= 1

    def close(self) -> None:
        self.state["closed"] += 1
        self.inner.close()


def new_state() -> dict:
    return {"reads": 0, "now": 0, "max": 0, "closed": 0}


def test_a_reader_error_surfaces_and_stops_every_thread(source, target) -> None:
    _, src, _ = source
    _, tgt = target
    state = new_state()
    p = plan(src, tgt, data_extents(src), chunk_size=256 << 10, connections=3)
    p.open_reader = lambda: CountingReader(NbdConnection(src.uri), state, fail_at=5, delay=0.002)
    before = set(copy_threads())
    t0 = time.monotonic()
    with pytest.raises(DataPathError, match="injected failure"):
        run_copy(p)
    assert time.monotonic() - t0 < 5
    assert copy_threads(before) == []
    assert state["closed"] == 3  # every worker closed its reader
    assert state["reads"] < 5 + 3 * 4  # the others stopped soon after the failure


def test_in_flight_work_is_bounded_by_the_connections(source, target) -> None:
    _, src, _ = source
    _, tgt = target
    connections = 3
    state = new_state()
    pulled = [0]
    outstanding = [0]
    finished = [0]
    lock = threading.Lock()

    def lazy_extents() -> Iterator[Extent]:  # one request per extent, counted as the engine pulls them
        for e in split(data_extents(src), 256 << 10):
            with lock:
                pulled[0] += 1
                outstanding[0] = max(outstanding[0], pulled[0] - finished[0])
            yield e

    class CountingWriter:
        def __init__(self) -> None:
            self.inner = NbdConnection(tgt.uri, writable=True)

        def wire(self) -> None:  # every write must come through write(): no splicing
            return None

        def read(self, offset: int, length: int) -> bytes:
            return self.inner.read(offset, length)

        def write(self, offset: int, data: bytes) -> None:
            self.inner.write(offset, data)
            with lock:
                finished[0] += 1

        def zero(self, offset: int, length: int) -> None:
            self.inner.zero(offset, length)
            with lock:
                finished[0] += 1

        def flush(self) -> None:
            self.inner.flush()

        def close(self) -> None:
            self.inner.close()

    p = plan(src, tgt, lazy_extents(), chunk_size=256 << 10, connections=connections)
    p.open_reader = lambda: CountingReader(NbdConnection(src.uri), state, delay=0.003)
    p.open_writer = CountingWriter
    stats, _ = run_copy(p)

    assert stats.extents == pulled[0] > 40
    assert 1 < state["max"] <= connections  # parallel, but never more reads than connections
    # pulled but unfinished requests, per connection: one being read, one handed to the connection's
    # writer thread and one being written (chunks are pulled from the feed only when a thread is free)
    assert outstanding[0] <= 3 * connections


class MemDisk:
    """An in-memory reader/writer; reads may be slow (a throttled or remote source)."""

    def __init__(self, size: int, delay: float = 0.0) -> None:
        self.buf, self.delay, self.closed = bytearray(size), delay, 0

    def wire(self) -> None:
        return None

    def read(self, offset: int, length: int) -> bytes:
        time.sleep(self.delay)
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.buf[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed += 1


def test_slow_reads_do_not_stall_the_end_of_the_copy() -> None:
    """When each read is slow (a throttled job, a WAN source), the copy must still end as soon as the
    last chunk is written, and its workers must exit and close their connections."""
    chunk = 64 << 10
    src, dst = MemDisk(4 * chunk, delay=0.6), MemDisk(4 * chunk)
    src.buf[:] = b"\x42" * len(src.buf)
    result: list[object] = []

    def go() -> None:
        result.append(
            run_copy(
                CopyPlan(
                    extents=[Extent(i * chunk, chunk) for i in range(4)],
                    open_reader=lambda: src,
                    open_writer=lambda: dst,
                    chunk_size=chunk,
                    connections=1,
                )
            )
        )

    before = set(copy_threads())
    runner = threading.Thread(target=go, daemon=True)
    t0 = time.monotonic()
    runner.start()
    runner.join(timeout=5)  # 4 reads x 0.6 s, plus slack
    elapsed = time.monotonic() - t0
    assert not runner.is_alive(), f"run_copy still running after {elapsed:.1f}s (4 reads of 0.6 s)"
    assert dst.buf == src.buf
    assert copy_threads(before) == []
    assert src.closed == 1
