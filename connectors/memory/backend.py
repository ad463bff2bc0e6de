"""Where a memory store keeps its bytes: blobs (sparse byte strings: disks, snapshots, replicas) and
records (small JSON values: VMs, change tracking, points), in process memory or in plain files.

Both backends behave the same, so the platform's semantics never depend on the choice:
- a blob has a size; reading past it or where nothing was written reads zeros; writing past it is
  an error; `resize` cuts (what lies beyond is gone: growing again reads zeros) or extends with zeros;
- `copy` is a frozen copy: later writes to either blob never show in the other;
- `data_ranges` says where a blob may hold other than zeros (never less than where it does);
- a record is stored as JSON text: what `get` returns is always a fresh value, never shared.
Blob and record names are '/'-separated paths of [A-Za-z0-9._:-] parts. `locked()` serializes whole
operations: a thread lock, and in the file backend also an flock on the directory, so that processes
sharing it see every operation whole.

In memory a blob is a dict of 64 KiB chunks holding immutable bytes (absent: zeros), so a copy costs
one dict copy whatever the disk's size, and sharing chunks between copies is safe.
In files a blob is a sparse file `blobs/<name>`, a record `records/<name>.json` (replaced atomically).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.memory.ranges import Ranges, add

CHUNK = 64 << 10
_ZERO_CHUNK = bytes(CHUNK)
_PART = re.compile(r"^[A-Za-z0-9._:-]+\Z")


class BlobMissing(LookupError):
    """The named blob does not exist (never created, deleted, or renamed away)."""


def check_name(name: str) -> str:
    parts = name.split("/")
    if not all(_PART.match(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"{name!r} is not a store name ('/'-separated parts of A-Z a-z 0-9 . _ : -)")
    return name


class Backend(ABC):
    def __init__(self) -> None:
        self._lock = threading.RLock()

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            yield

    # ------------------------------------------------------------------ blobs
    @abstractmethod
    def exists(self, blob: str) -> bool: ...
    @abstractmethod
    def size(self, blob: str) -> int: ...
    @abstractmethod
    def create(self, blob: str, size: int) -> None:
        """A new blob of zeros (replacing one of that name)."""

    @abstractmethod
    def resize(self, blob: str, size: int) -> None: ...
    @abstractmethod
    def read(self, blob: str, offset: int, length: int) -> bytes: ...
    @abstractmethod
    def write(self, blob: str, offset: int, data: bytes) -> None: ...
    @abstractmethod
    def zero(self, blob: str, offset: int, length: int) -> None: ...
    @abstractmethod
    def copy(self, src: str, dst: str) -> None: ...
    @abstractmethod
    def rename(self, src: str, dst: str) -> None: ...
    @abstractmethod
    def delete(self, blob: str) -> None:
        """Gone already: no error."""

    @abstractmethod
    def blobs(self, prefix: str = "") -> list[str]: ...
    @abstractmethod
    def data_ranges(self, blob: str, start: int, end: int) -> Ranges: ...

    # ------------------------------------------------------------------ records
    @abstractmethod
    def get(self, name: str) -> Any: ...
    @abstractmethod
    def put(self, name: str, value: Any) -> None: ...
    @abstractmethod
    def drop(self, name: str) -> None: ...
    @abstractmethod
    def records(self, prefix: str = "") -> list[str]: ...

    def _check_write(self, blob: str, offset: int, length: int) -> None:
        size = self.size(blob)
        if offset < 0 or offset + length > size:
            raise ValueError(f"{blob}: {length} bytes at {offset} are beyond its end ({size} bytes)")


@dataclass
class _Blob:
    size: int
    chunks: dict[int, bytes] = field(default_factory=dict)


class MemoryBackend(Backend):
    def __init__(self) -> None:
        super().__init__()
        self._blobs: dict[str, _Blob] = {}
        self._records: dict[str, str] = {}

    def _blob(self, name: str) -> _Blob:
        try:
            return self._blobs[name]
        except KeyError:
            raise BlobMissing(name) from None

    def exists(self, blob: str) -> bool:
        return blob in self._blobs

    def size(self, blob: str) -> int:
        return self._blob(blob).size

    def create(self, blob: str, size: int) -> None:
        with self._lock:
            self._blobs[check_name(blob)] = _Blob(size)

    def resize(self, blob: str, size: int) -> None:
        with self._lock:
            b = self._blob(blob)
            if size < b.size:
                for idx in [i for i in b.chunks if i * CHUNK >= size]:
                    del b.chunks[idx]
                if size % CHUNK:  # what lies beyond the new end in its last chunk is gone
                    self._put(b, size, bytes(CHUNK - size % CHUNK))
            b.size = size

    def read(self, blob: str, offset: int, length: int) -> bytes:
        with self._lock:
            b = self._blob(blob)
            out = bytearray(length)
            for idx in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1) if length > 0 else ():
                c = b.chunks.get(idx)
                if c is None:
                    continue
                lo, hi = max(offset, idx * CHUNK), min(offset + length, (idx + 1) * CHUNK)
                out[lo - offset : hi - offset] = c[lo - idx * CHUNK : hi - idx * CHUNK]
            return bytes(out)

    def _put(self, b: _Blob, offset: int, data: bytes) -> None:
        """Write into chunks (the size is not checked here); chunks that end up all zero go."""
        pos, view = offset, memoryview(data)
        while view:
            idx, at = divmod(pos, CHUNK)
            n = min(len(view), CHUNK - at)
            old = b.chunks.get(idx, _ZERO_CHUNK)
            new = old[:at] + bytes(view[:n]) + old[at + n :]
            if new == _ZERO_CHUNK:
                b.chunks.pop(idx, None)
            else:
                b.chunks[idx] = new
            pos, view = pos + n, view[n:]

    def write(self, blob: str, offset: int, data: bytes) -> None:
        with self._lock:
            self._check_write(blob, offset, len(data))
            self._put(self._blob(blob), offset, data)

    def zero(self, blob: str, offset: int, length: int) -> None:
        with self._lock:
            self._check_write(blob, offset, length)
            b = self._blob(blob)
            pos, end = offset, offset + length
            while pos < end:
                idx, at = divmod(pos, CHUNK)
                n = min(end - pos, CHUNK - at)
                if n == CHUNK:
                    b.chunks.pop(idx, None)
                elif idx in b.chunks:
                    self._put(b, pos, bytes(n))
                pos += n

    def copy(self, src: str, dst: str) -> None:
        with self._lock:
            b = self._blob(src)
            self._blobs[check_name(dst)] = _Blob(b.size, dict(b.chunks))  # chunks are immutable bytes

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self._blobs[check_name(dst)] = self._blob(src)
            del self._blobs[src]

    def delete(self, blob: str) -> None:
        with self._lock:
            self._blobs.pop(blob, None)

    def blobs(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n in self._blobs if n.startswith(prefix))

    def data_ranges(self, blob: str, start: int, end: int) -> Ranges:
        with self._lock:
            b = self._blob(blob)
            out: Ranges = []
            for idx in sorted(b.chunks):
                lo, hi = max(start, idx * CHUNK), min(end, b.size, (idx + 1) * CHUNK)
                if hi > lo:
                    out = add(out, lo, hi)
            return out

    def get(self, name: str) -> Any:
        with self._lock:
            text = self._records.get(name)
        return None if text is None else json.loads(text)

    def put(self, name: str, value: Any) -> None:
        text = json.dumps(value)
        with self._lock:
            self._records[check_name(name)] = text

    def drop(self, name: str) -> None:
        with self._lock:
            self._records.pop(name, None)

    def records(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n in self._records if n.startswith(prefix))


class FileBackend(Backend):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        self._depth = 0
        self._lock_file: Any = None

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                self._lock_file = open(self.root / ".lock", "a")  # noqa: SIM115 - closed below
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                    self._lock_file.close()

    def _path(self, blob: str) -> Path:
        return self.root / "blobs" / check_name(blob)

    def _fd(self, blob: str, flags: int) -> int:
        try:
            return os.open(self._path(blob), flags)
        except FileNotFoundError:
            raise BlobMissing(blob) from None

    def exists(self, blob: str) -> bool:
        return self._path(blob).is_file()

    def size(self, blob: str) -> int:
        try:
            return self._path(blob).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(blob) from None

    def create(self, blob: str, size: int) -> None:
        p = self._path(blob)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(size)

    def resize(self, blob: str, size: int) -> None:
        fd = self._fd(blob, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def read(self, blob: str, offset: int, length: int) -> bytes:
        fd = self._fd(blob, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data + bytes(length - len(data))

    def write(self, blob: str, offset: int, data: bytes) -> None:
        self._check_write(blob, offset, len(data))
        fd = self._fd(blob, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def zero(self, blob: str, offset: int, length: int) -> None:
        self._check_write(blob, offset, length)
        step = 4 << 20
        for pos in range(offset, offset + length, step):
            self.write(blob, pos, bytes(min(step, offset + length - pos)))

    def copy(self, src: str, dst: str) -> None:
        size = self.size(src)
        tmp = f"{dst}.copying"
        self.create(tmp, size)
        for s, e in self.data_ranges(src, 0, size):
            for pos in range(s, e, 4 << 20):
                self.write(tmp, pos, self.read(src, pos, min(4 << 20, e - pos)))
        self.rename(tmp, dst)

    def rename(self, src: str, dst: str) -> None:
        d = self._path(dst)
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self._path(src), d)
        except FileNotFoundError:
            raise BlobMissing(src) from None
        self._prune_dirs(self._path(src).parent, self.root / "blobs")

    def delete(self, blob: str) -> None:
        p = self._path(blob)
        p.unlink(missing_ok=True)
        self._prune_dirs(p.parent, self.root / "blobs")

    @staticmethod
    def _prune_dirs(d: Path, top: Path) -> None:
        """Empty directories up to `top` (included) go: a store that holds nothing is an empty directory."""
        while d != top.parent and d.is_dir():
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    def _names(self, top: Path, suffix: str, prefix: str) -> list[str]:
        if not top.is_dir():
            return []
        out = [
            str(p.relative_to(top))[: -len(suffix) or None] for p in top.rglob(f"*{suffix}") if p.is_file()
        ]
        return sorted(n for n in out if n.startswith(prefix))

    def blobs(self, prefix: str = "") -> list[str]:
        return self._names(self.root / "blobs", "", prefix)

    def data_ranges(self, blob: str, start: int, end: int) -> Ranges:
        fd = self._fd(blob, os.O_RDONLY)
        out: Ranges = []
        try:
            end = min(end, os.fstat(fd).st_size)
            pos = start
            while pos < end:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data from here on
                    break
                if data >= end:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                out = add(out, data, hole)
                pos = hole
        finally:
            os.close(fd)
        return out

    def _record(self, name: str) -> Path:
        return self.root / "records" / f"{check_name(name)}.json"

    def get(self, name: str) -> Any:
        try:
            return json.loads(self._record(name).read_text())
        except FileNotFoundError:
            return None

    def put(self, name: str, value: Any) -> None:
        p = self._record(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, p)

    def drop(self, name: str) -> None:
        p = self._record(name)
        p.unlink(missing_ok=True)
        self._prune_dirs(p.parent, self.root / "records")

    def records(self, prefix: str = "") -> list[str]:
        return self._names(self.root / "records", ".json", prefix)
