"""Content-addressed 512 KiB blocks on disk, shared by every volume and snapshot of the lab.

A block is stored once per distinct content, as `blocks/<2 hex>/<64 hex>` named by its SHA-256. The
all-zero block is never stored: it is answered from memory. Volumes and snapshots hold only references
(digests), so a snapshot of a volume costs no block copies, and a volume of several GiB that was written
in a few places takes a few files. Blocks no volume or snapshot refers to any more are removed by
`LabState.collect_garbage` through `discard`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

BLOCK_SIZE = 524288
ZERO_BLOCK = bytes(BLOCK_SIZE)
ZERO_DIGEST = hashlib.sha256(ZERO_BLOCK).digest()


class BlockStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "blocks"
        # the lab's state does not survive a restart: blocks of an earlier run are garbage
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self._known: set[bytes] = set()
        self._lock = threading.Lock()

    def _path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name

    def put(self, digest: bytes, data: bytes) -> None:
        """Store `data` (exactly one block) under its SHA-256 `digest`, computed by the caller."""
        if len(data) != BLOCK_SIZE:
            raise ValueError(f"a block is {BLOCK_SIZE} bytes, not {len(data)}")
        if digest == ZERO_DIGEST:
            return
        with self._lock:
            if digest in self._known:
                return
        path = self._path(digest)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            self._known.add(digest)

    def get(self, digest: bytes) -> bytes:
        if digest == ZERO_DIGEST:
            return ZERO_BLOCK
        with open(self._path(digest), "rb") as f:
            data = f.read()
        if len(data) != BLOCK_SIZE:
            raise OSError(f"block {digest.hex()} is {len(data)} bytes on disk")
        return data

    def known(self) -> set[bytes]:
        with self._lock:
            return set(self._known)

    def discard(self, digests: Iterable[bytes]) -> int:
        removed = 0
        for digest in digests:
            with self._lock:
                if digest not in self._known:
                    continue
                self._known.discard(digest)
            self._path(digest).unlink(missing_ok=True)
            removed += 1
        if removed:
            log.debug("removed %d unreferenced blocks", removed)
        return removed
