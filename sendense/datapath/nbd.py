"""NBD endpoints through libnbd: block reads/writes and extent discovery.

Used by every connector whose platform speaks NBD (a hypervisor's NBD server or qemu-nbd, nbdkit
plugins, lab stand-ins). The Python `nbd` module comes from Debian's
python3-libnbd; the project venv is made with --system-site-packages so that it is importable.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from typing import Any

from sendense.datapath.extents import Extent, intersect_dirty
from sendense.datapath.wire import NbdWire
from sendense.datapath.wire import available as wire_available
from sendense.errors import ChangeTrackingLost, DataPathError, ResourceUnavailable

try:  # pragma: no cover - import guard with a clear message
    import nbd
except ImportError as _e:  # pragma: no cover
    raise ImportError(
        "the libnbd Python module is missing: install Debian's python3-libnbd and use a venv made "
        "with --system-site-packages (scripts/install.sh does both)"
    ) from _e

log = logging.getLogger(__name__)

ALLOCATION = "base:allocation"
# QEMU's NBD servers (qemu-nbd -A, block-export-add allocation-depth): per range, the layer of the
# export's backing chain that holds it, 1 the top, 0 none (reads as zero or from beyond the chain)
ALLOCATION_DEPTH = "qemu:allocation-depth"
STATE_HOLE = 1
STATE_ZERO = 2
STATE_DIRTY = 1
BLOCK_STATUS_WINDOW = 1 << 30


def dirty_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


def unix_uri(socket: str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={socket}"


class NbdConnection:
    """One libnbd handle: the BlockReader / BlockWriter of the copy engine."""

    def __init__(
        self, uri: str, *, contexts: tuple[str, ...] = (), writable: bool = False, label: str | None = None
    ) -> None:
        self.uri = uri
        # what errors call the export: what the user knows (a disk image, a replica path), not a socket
        self.label = label or _safe(uri)
        self.h = nbd.NBD()
        self.h.set_pread_initialize(False)
        # block status needs structured replies; plain data connections use simple ones, so that
        # their socket can be handed to an NbdWire (payload spliced, see datapath.wire)
        self.h.set_request_structured_replies(bool(contexts))
        for c in contexts:
            self.h.add_meta_context(c)
        if uri.startswith("nbds"):
            # (issue 14 groundwork) the URI is the product's own, naming its TLS certificates directory:
            # libnbd refuses `tls-certificates=` unless local file access is allowed
            self.h.set_uri_allow_local_file(True)
        try:
            self.h.connect_uri(uri)
        except nbd.Error as e:
            raise ResourceUnavailable(f"NBD export {self.label}: {e.string}") from None
        if writable and self.h.is_read_only():
            self.close()
            raise DataPathError(f"NBD export {self.label} is read-only", retryable=False)
        self.size: int = self.h.get_size()
        self.writable = writable
        self.can_zero = writable and bool(self.h.can_zero())

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self.h.pread(length, offset)
        except nbd.Error as e:
            raise DataPathError(f"read {length}@{offset} from {self.label}: {e.string}") from None

    def write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            self.h.pwrite(data, offset)
        except nbd.Error as e:
            raise _write_error(self.label, offset, e) from None

    def zero(self, offset: int, length: int) -> None:
        try:
            if self.can_zero:
                self.h.zero(length, offset)
            else:
                step = 4 << 20
                for off in range(offset, offset + length, step):
                    n = min(step, offset + length - off)
                    self.h.pwrite(bytes(n), off)
        except nbd.Error as e:
            raise _write_error(self.label, offset, e) from None

    def flush(self) -> None:
        try:
            if self.h.can_flush():
                self.h.flush()
        except nbd.Error as e:
            raise _write_error(self.label, 0, e) from None

    def wire(self) -> NbdWire | None:
        """The transmission phase on this connection's own socket, when it can be spliced (a plain
        socket with simple replies); None otherwise. The connection must then be used only through
        the wire until `NbdWire.release()`."""
        if not wire_available() or self.h.get_structured_replies_negotiated() or self.h.get_tls_negotiated():
            return None
        return NbdWire(self.h.aio_get_fd(), self.label, can_zero=self.can_zero)

    def can_meta_context(self, context: str) -> bool:
        return bool(self.h.can_meta_context(context))

    def close(self) -> None:
        """Writable: a graceful NBD disconnect. Read-only: just close the socket (a server takes EOF
        between requests as a disconnect), which spares a round trip per connection."""
        if self.writable:
            try:
                self.h.shutdown()
            except nbd.Error:
                pass
        del self.h

    def __enter__(self) -> NbdConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- extent discovery

    def status_ranges(self, start: int, end: int, contexts: tuple[str, ...]) -> dict[str, list[Any]]:
        """(start, end, flags) lists per context covering exactly [start, end)."""
        out: dict[str, list[tuple[int, int, int]]] = {c: [] for c in contexts}
        pos = start
        while pos < end:
            got: dict[str, list[tuple[int, int, int]]] = {c: [] for c in contexts}

            def cb(metacontext: str, offset: int, entries: list[int], err: Any) -> int:
                if metacontext in got and not got[metacontext]:  # noqa: B023 - called synchronously
                    o = offset
                    for i in range(0, len(entries), 2):
                        got[metacontext].append((o, o + entries[i], entries[i + 1]))  # noqa: B023
                        o += entries[i]
                return 0

            count = min(end - pos, BLOCK_STATUS_WINDOW)
            try:
                self.h.block_status(count, pos, cb)
            except nbd.Error as e:
                raise DataPathError(f"block status at {pos} on {self.label}: {e.string}") from None
            missing = [c for c in contexts if not got[c]]
            if missing:
                raise ChangeTrackingLost(f"NBD export {self.label} gave no {missing[0]} extents")
            cover = min(min(got[c][-1][1] for c in contexts), end)
            for c in contexts:
                for lo, hi, flags in got[c]:
                    if lo >= cover:
                        break
                    out[c].append((lo, min(hi, cover), flags))
            pos = cover
        return out

    def changed_extents(
        self, bitmap: str | None, start: int = 0, end: int | None = None, window: int = BLOCK_STATUS_WINDOW
    ) -> Iterator[Extent]:
        """Ranges to replicate, tagged data or zero, in order, one window in memory at a time.

        With a bitmap: the dirty ranges, each split by `base:allocation` into data and zero parts
        (a zero write is dirty in the bitmap but zero in the allocation). Without: all ranges.
        """
        end = self.size if end is None else end
        contexts: tuple[str, ...] = (ALLOCATION,) if bitmap is None else (ALLOCATION, dirty_context(bitmap))
        for c in contexts:
            if not self.can_meta_context(c):
                if c == ALLOCATION:
                    raise DataPathError(f"NBD export {self.label} lacks {ALLOCATION}", retryable=False)
                raise ChangeTrackingLost(f"dirty bitmap {bitmap} is not exported by {self.label}")
        pos = start
        while pos < end:
            w_end = min(end, pos + window)
            r = self.status_ranges(pos, w_end, contexts)
            alloc = [(s, e, bool(f & STATE_ZERO)) for s, e, f in r[ALLOCATION]]
            dirty = None if bitmap is None else [(s, e, bool(f & STATE_DIRTY)) for s, e, f in r[contexts[1]]]
            yield from intersect_dirty(alloc, dirty)
            pos = w_end

    def layer_extents(self, layers: int, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """The ranges held by the top `layers` layers of the export's backing chain (an overlay's own
        clusters, allocated or zeroed: what was written since its backing was made), each tagged data
        or zero by `base:allocation`, in order. Needs a server that exports `qemu:allocation-depth`."""
        end = self.size if end is None else end
        for c in (ALLOCATION, ALLOCATION_DEPTH):
            if not self.can_meta_context(c):
                raise DataPathError(f"NBD export {self.label} lacks {c}", retryable=False)
        pos = start
        while pos < end:
            w_end = min(end, pos + BLOCK_STATUS_WINDOW)
            r = self.status_ranges(pos, w_end, (ALLOCATION, ALLOCATION_DEPTH))
            alloc = [(s, e, bool(f & STATE_ZERO)) for s, e, f in r[ALLOCATION]]
            top = [(s, e, 1 <= f <= layers) for s, e, f in r[ALLOCATION_DEPTH]]
            yield from intersect_dirty(alloc, top)
            pos = w_end


def _safe(uri: str) -> str:
    """URIs here never carry passwords, but strip any query/userinfo just in case."""
    if "@" in uri.split("?", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _write_error(label: str, offset: int, e: Any) -> DataPathError:
    if getattr(e, "errnum", None) == errno.ENOSPC:  # libnbd: .errnum is the number, .errno its name
        return DataPathError(f"target {label} is full (write at {offset})", retryable=False)
    return DataPathError(f"write at {offset} to {label}: {e.string}")
