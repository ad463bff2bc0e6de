"""The memory source's snapshot handles: which attempt of a snapshot, and its frozen copy of a disk."""

from __future__ import annotations

from sendense.models import Handle


class MemorySnapshot(Handle):
    nonce: str = ""  # the attempt: a retried create_snapshot under the same id makes another


class MemoryDisk(Handle):
    copy_of: str = ""  # the frozen copy's blob in the store
