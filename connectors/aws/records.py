"""The target's local records of the snapshots it starts (~/.sendense/aws-target/<job>/), which are its
proof that a snapshot is its own to write, complete and delete (tags alone never are):

- `<token>.starting`: a StartSnapshot about to be called (its arguments and ClientToken), so that a
  worker dying before the answer is recorded leaves no snapshot nobody can claim;
- `<snapshot>.blocks`: a started snapshot's written blocks (pending.py), until its commit tags it;
- `<snapshot>.deleted`: a tombstone, while EC2 may still list a snapshot deleted in progress.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class TargetRecords:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blocks(self, snapshot_id: str) -> Path:
        return self.root / f"{snapshot_id}.blocks"

    def tombstone(self, snapshot_id: str) -> Path:
        return self.root / f"{snapshot_id}.deleted"

    def started_here(self, snapshot_id: str) -> bool:
        """Started by this side and not deleted since."""
        return self.blocks(snapshot_id).exists()

    def known(self, snapshot_id: str) -> bool:
        """Started by this side, deleted since or not."""
        return self.blocks(snapshot_id).exists() or self.tombstone(snapshot_id).exists()

    def starting(self, start_args: dict[str, Any]) -> Path:
        """Note a StartSnapshot before it is called; `started` replaces the note with the record."""
        self.root.mkdir(parents=True, exist_ok=True)
        intent = self.root / f"{start_args['ClientToken']}.starting"
        intent.write_text(json.dumps(start_args))
        return intent

    def started(self, snapshot_id: str, intent: Path) -> None:
        self.blocks(snapshot_id).touch()
        intent.unlink(missing_ok=True)

    def unanswered(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(note, StartSnapshot arguments) of calls whose answer was never recorded."""
        if not self.root.is_dir():
            return
        for intent in self.root.glob("*.starting"):
            try:
                yield intent, json.loads(intent.read_text())
            except ValueError:  # torn: the call was never made
                intent.unlink(missing_ok=True)

    def deleted(self, snapshot_id: str) -> None:
        rec = self.blocks(snapshot_id)
        if rec.exists():
            rec.replace(self.tombstone(snapshot_id))

    def drop(self, snapshot_id: str) -> None:
        """A committed snapshot: its tags say whose it is from now on."""
        self.blocks(snapshot_id).unlink(missing_ok=True)

    def forget_tombstones(self, listed: set[str]) -> None:
        """Tombstones of snapshots EC2 no longer lists."""
        if self.root.is_dir():
            for f in self.root.glob("*.deleted"):
                if f.name.removesuffix(".deleted") not in listed:
                    f.unlink(missing_ok=True)

    def clear(self, keep: set[str]) -> None:
        """Every record but those of the snapshots in `keep`; the directory too once empty."""
        if not self.root.is_dir():
            return
        for f in self.root.iterdir():
            if f.name.split(".")[0] not in keep:
                f.unlink()
        if not any(self.root.iterdir()):
            self.root.rmdir()
