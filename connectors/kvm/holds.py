"""Point holds on a KVM target: a drill or a failover pins the point its VM runs on.

A hold is a file `holds/<point>/<hold id>.json` in the job's directory (reason and time). Prune never
removes, merges or rewrites a held point, nor the point it would have to merge into it; purge refuses
while any hold stands. Holds are idempotent by id: a saga step retried after a crash adds the same hold
once, and a release of a hold that is gone is no error.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from sendense.errors import InvalidSpec
from sendense.models import check_hold_id


class Holds:
    def __init__(self, directory: Path) -> None:
        self.dir = directory  # <job dir>/holds

    @staticmethod
    def check_id(hold_id: str) -> str:
        try:
            return check_hold_id(hold_id)
        except ValueError as e:
            raise InvalidSpec(str(e)) from None

    def add(self, point_id: str, hold_id: str, reason: str) -> None:
        f = self.dir / point_id / f"{self.check_id(hold_id)}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        if f.exists():
            return
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps({"reason": reason, "since": datetime.now(UTC).isoformat()}) + "\n")
        os.replace(tmp, f)

    def remove(self, point_id: str, hold_id: str) -> None:
        (self.dir / point_id / f"{self.check_id(hold_id)}.json").unlink(missing_ok=True)
        try:
            (self.dir / point_id).rmdir()
        except OSError:
            pass  # other holds remain (or it was never there)

    def of(self, point_id: str) -> list[str]:
        d = self.dir / point_id
        return sorted(f.stem for f in d.glob("*.json")) if d.is_dir() else []

    def all(self) -> dict[str, list[str]]:
        if not self.dir.is_dir():
            return {}
        return {d.name: h for d in self.dir.iterdir() if d.is_dir() and (h := self.of(d.name))}
