"""The copy engine: extents in, blocks out.

Several connections read and write in parallel, one thread per connection pair, each pulling the
next chunk from a shared feed. In copy mode, when both ends are plain NBD sockets, a thread splices
each chunk's payload from the source socket into the target socket without it entering this
process (`datapath.wire`); otherwise it reads into memory and hands the chunk to its own writer
thread, so that the next read overlaps this write (libnbd releases the GIL while it waits). Either
way, data chunks that turn out to be all zero are written as zero ranges, with no payload. In
compare mode (resync after change tracking was lost) each source chunk is hashed against the
target's current chunk and written only when they differ.

Progress is a watermark: every request is numbered in offset order; the watermark is the end of the
longest fully completed prefix. At each checkpoint the target is flushed and the watermark handed to
`on_checkpoint` as the resume token, so a crash re-copies at most one checkpoint window.
Memory is bounded by about 3 x connections x chunk size (reading, handed off, writing), whatever the
disk size; spliced chunks take none.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import xxhash

from sendense.datapath.extents import Extent, split
from sendense.datapath.throttle import Throttle
from sendense.datapath.wire import NbdWire, Splicer
from sendense.errors import DataPathError
from sendense.models import CopyStats

log = logging.getLogger(__name__)


class BlockReader(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...
    def close(self) -> None: ...

    def wire(self) -> NbdWire | None:
        """Optional capability: this connection's transmission phase for splicing payload socket to
        socket (datapath.wire), or None when it cannot be spliced (then read/write carry the bytes)."""
        ...


class BlockWriter(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...

    def wire(self) -> NbdWire | None:
        """As BlockReader.wire: None when this writer cannot take spliced payload."""
        ...


Mode = Literal["copy", "compare"]
CheckpointFn = Callable[[int, int, CopyStats], None]


@dataclass
class CopyPlan:
    extents: Iterable[Extent]
    open_reader: Callable[[], BlockReader]
    open_writer: Callable[[], BlockWriter]
    mode: Mode = "copy"
    chunk_size: int = 4 << 20
    connections: int = 4
    checkpoint_bytes: int = 64 << 20
    checkpoint_seconds: float = 2.0
    compare_block: int = 4 << 10  # granularity of compare mode writes
    pipeline: bool = True  # copy mode: overlap each connection's next read with its current write
    splice: bool = True  # copy mode: splice payload socket to socket when both ends allow (datapath.wire)
    throttle: Throttle | None = None
    on_checkpoint: CheckpointFn | None = None
    cancelled: Callable[[], bool] = field(default=lambda: False)


_STOP = object()
_POLL = 0.05  # the coordinator's wake-up interval at most (cancel checks, time-based checkpoints)


def _wires(reader: BlockReader, writer: BlockWriter) -> tuple[NbdWire, NbdWire] | None:
    """Both ends' wires when both can splice, else None (nothing is taken over)."""
    r = reader.wire()
    if r is None:
        return None
    w = writer.wire()
    if w is None:
        r.release()
        return None
    return r, w


class _Feed:
    """Hands out (seq, extent) chunks in offset order to the copy threads, under a lock (no dispatcher
    thread: a chunk costs no thread hand-off). The extent iterator may do I/O (block status); its
    errors reach the thread that asked."""

    def __init__(self, extents: Iterable[Extent], chunk_size: int, abort: threading.Event) -> None:
        self._it = iter(split(extents, chunk_size))
        self._lock = threading.Lock()
        self._abort = abort
        self.issued = 0
        self.exhausted = False

    def next(self) -> tuple[int, Extent] | None:
        with self._lock:
            if self.exhausted or self._abort.is_set():
                return None
            try:
                ext = next(self._it)
            except StopIteration:
                self.exhausted = True
                return None
            seq = self.issued
            self.issued += 1
            return seq, ext


class _Results:
    """Completed chunks and errors, posted by the copy threads without waking the coordinator for
    each one: it is woken for an error, when a thread runs out of work, and every `batch` chunks
    (so checkpoints stay about `checkpoint_bytes` apart)."""

    def __init__(self, batch: int) -> None:
        self.items: deque[tuple[int, Extent, CopyStats] | BaseException] = deque()
        self.wake = threading.Event()
        self.batch = max(1, batch)

    def post(self, seq: int, ext: Extent, stats: CopyStats) -> None:
        self.items.append((seq, ext, stats))
        if len(self.items) >= self.batch:
            self.wake.set()

    def fail(self, e: BaseException) -> None:
        self.items.append(e)
        self.wake.set()


def _is_zero(data: bytes, zeros: bytes) -> bool:
    return data == zeros if len(data) == len(zeros) else data == bytes(len(data))


class _Worker(threading.Thread):
    """Reads chunks; in copy mode hands each data chunk to its own writer thread, so that the read of
    the next chunk overlaps the write of this one (two requests in flight per connection pair)."""

    def __init__(self, plan: CopyPlan, feed: _Feed, results: _Results, abort: threading.Event) -> None:
        super().__init__(daemon=True, name="copy-worker")
        self.plan, self.feed, self.results, self.abort = plan, feed, results, abort
        self.zeros = bytes(plan.chunk_size)
        self.handoff: queue.Queue = queue.Queue(maxsize=1)

    def run(self) -> None:
        reader = writer = None
        pipe: threading.Thread | None = None
        wires: tuple[NbdWire, NbdWire] | None = None
        splicer: Splicer | None = None
        try:
            reader = self.plan.open_reader()
            writer = self.plan.open_writer()
            if self.plan.mode == "copy" and self.plan.splice:
                wires = _wires(reader, writer)
            if wires is not None:
                splicer = Splicer(*wires)
            elif self.plan.mode == "copy" and self.plan.pipeline:
                pipe = threading.Thread(target=self._write_loop, args=(self.plan.open_writer(),), daemon=True)
                pipe.start()
            # a reader across a link (datapath.remote) takes the next chunks' requests ahead of their
            # reads, `depth` in flight: what keeps a long link full, not more connections
            prefetch = getattr(reader, "prefetch", None) if splicer is None else None
            depth = max(1, getattr(reader, "depth", 1)) if prefetch is not None else 1
            ahead: deque[tuple[int, Extent]] = deque()
            while True:
                while len(ahead) < depth and (item := self.feed.next()) is not None:
                    if prefetch is not None and not item[1].zero:
                        prefetch(item[1].offset, item[1].length)
                    ahead.append(item)
                if not ahead:
                    break
                seq, ext = ahead.popleft()
                if splicer is not None:
                    stats: CopyStats | None = self._splice_one(splicer, ext)
                else:
                    stats = self._one(reader, writer, ext, seq if pipe is not None else None)
                if stats is not None:
                    self.results.post(seq, ext, stats)
        except BaseException as e:  # noqa: BLE001 - handed to the coordinating thread
            self.abort.set()
            self.results.fail(e)
        finally:
            if pipe is not None:
                self._handoff(_STOP)
                pipe.join(timeout=30)
            self.results.wake.set()
            if splicer is not None:
                splicer.close()
            for w in wires or ():
                w.release()
            for c in (reader, writer):
                if c is not None:
                    try:
                        c.close()
                    except Exception:  # noqa: BLE001
                        log.debug("close failed", exc_info=True)

    def _splice_one(self, splicer: Splicer, e: Extent) -> CopyStats:
        s = CopyStats(extents=1)
        if e.zero:
            splicer.dst.zero(e.offset, e.length)
            s.bytes_zeroed = e.length
            return s
        if self.plan.throttle is not None:
            self.plan.throttle.consume(e.length)
        r = splicer.copy(e.offset, e.length)
        s.bytes_read, s.bytes_written, s.bytes_zeroed = e.length, r.written, r.zeroed
        s.bytes_on_wire = e.length
        return s

    def _handoff(self, item: object) -> None:
        while True:
            try:
                self.handoff.put(item, timeout=0.2)
                return
            except queue.Full:
                if self.abort.is_set():
                    return

    def _write_loop(self, writer: BlockWriter) -> None:
        try:
            while True:
                try:
                    item = self.handoff.get(timeout=0.2)
                except queue.Empty:
                    if self.abort.is_set():
                        return
                    continue
                if item is _STOP:
                    return
                seq, ext, data, stats = item
                self._put(writer, ext.offset, data, stats)
                self.results.post(seq, ext, stats)
        except BaseException as e:  # noqa: BLE001
            self.abort.set()
            self.results.fail(e)
        finally:
            self.results.wake.set()
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                log.debug("close failed", exc_info=True)

    def _one(self, reader: BlockReader, writer: BlockWriter, e: Extent, seq: int | None) -> CopyStats | None:
        """Process one request; None when the data went to the writer thread (it reports completion)."""
        s = CopyStats(extents=1)
        if e.zero:
            writer.zero(e.offset, e.length)
            s.bytes_zeroed = e.length
            return s
        if self.plan.throttle is not None:
            self.plan.throttle.consume(e.length)
        data = reader.read(e.offset, e.length)
        s.bytes_read = e.length
        s.bytes_on_wire = getattr(reader, "last_wire", e.length)
        if self.plan.mode == "compare":
            self._compare(writer, e, data, s)
            return s
        if seq is not None and not _is_zero(data, self.zeros):
            self._handoff((seq, e, data, s))
            return None
        self._put(writer, e.offset, data, s)
        return s

    def _put(self, writer: BlockWriter, offset: int, data: bytes, s: CopyStats) -> None:
        if _is_zero(data, self.zeros):
            writer.zero(offset, len(data))
            s.bytes_zeroed += len(data)
        else:
            writer.write(offset, data)
            s.bytes_written += len(data)

    def _compare(self, writer: BlockWriter, e: Extent, data: bytes, s: CopyStats) -> None:
        """Write only the compare blocks whose digests differ from the replica's, as coalesced runs."""
        current = writer.read(e.offset, e.length)
        if xxhash.xxh3_128_digest(current) == xxhash.xxh3_128_digest(data):
            s.bytes_skipped += e.length
            return
        bs = self.plan.compare_block
        view, cur = memoryview(data), memoryview(current)
        run_start: int | None = None
        for pos in range(0, e.length + bs, bs):
            differs = pos < e.length and xxhash.xxh3_128_digest(
                view[pos : pos + bs]
            ) != xxhash.xxh3_128_digest(cur[pos : pos + bs])
            if differs and run_start is None:
                run_start = pos
            elif not differs and run_start is not None:
                end = min(pos, e.length)
                self._put(writer, e.offset + run_start, data[run_start:end], s)
                run_start = None
                if pos < e.length:
                    s.bytes_skipped += min(bs, e.length - pos)
            elif not differs and pos < e.length:
                s.bytes_skipped += min(bs, e.length - pos)


def run_copy(plan: CopyPlan) -> tuple[CopyStats, int]:
    """Copy every extent of the plan. Returns the stats and the final watermark offset."""
    started = time.monotonic()
    abort = threading.Event()
    feed = _Feed(plan.extents, plan.chunk_size, abort)
    results = _Results(plan.checkpoint_bytes // plan.chunk_size // 2)
    control = plan.open_writer()  # flushes at checkpoints
    workers = [_Worker(plan, feed, results, abort) for _ in range(plan.connections)]
    stats = CopyStats()
    pending: dict[int, Extent] = {}
    next_seq = 0
    watermark = 0
    completed = 0
    last_ck_bytes = 0
    last_ck_time = time.monotonic()
    progressed = 0
    try:
        for w in workers:
            w.start()
        while not (feed.exhausted and completed == feed.issued):
            if plan.cancelled():
                raise DataPathError("copy cancelled")
            results.wake.wait(_POLL)
            results.wake.clear()
            if not any(w.is_alive() for w in workers) and not results.items:  # dead threads posted all
                if not (feed.exhausted and completed == feed.issued):
                    raise DataPathError("copy threads stopped before the copy was done")
            while results.items:
                item = results.items.popleft()
                if isinstance(item, BaseException):
                    raise item
                seq, ext, delta = item
                completed += 1
                stats.add(delta)
                pending[seq] = ext
                while next_seq in pending:
                    e = pending.pop(next_seq)
                    watermark = e.end
                    progressed += 0 if e.zero else e.length
                    next_seq += 1
                now = time.monotonic()
                due = (
                    progressed - last_ck_bytes >= plan.checkpoint_bytes
                    or now - last_ck_time >= plan.checkpoint_seconds
                )
                if due and plan.on_checkpoint is not None:
                    control.flush()
                    stats.seconds = now - started
                    plan.on_checkpoint(watermark, progressed, stats)
                    last_ck_bytes, last_ck_time = progressed, now
        control.flush()
        stats.seconds = time.monotonic() - started
        if plan.on_checkpoint is not None:
            plan.on_checkpoint(watermark, progressed, stats)
        return stats, watermark
    finally:
        abort.set()
        for w in workers:
            w.join(timeout=30)
        control.close()
