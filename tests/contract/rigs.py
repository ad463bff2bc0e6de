"""Every platform as the contract suite drives it: one end under test, the memory platform at the other.

A `Rig` is a job between a `VmSide` (a VM whose guest the test writes to, with a `Shadow` of every
disk) and a `ReplicaSide` (where its points go): sides.py. The source contract puts the platform under
test on the VM side and a memory target on the other; the target contract puts a memory VM on the VM
side and the platform under test on the other. Connectors are always made by the platform registry
from a JobSpec (`source_for` / `target_for`), and data always moves through
`sendense.datapath.sync.copy_disk` (`helpers_kvm.sync_point`, as the workflow runs a sync). Points are
read back through the target's `export` (raw) and compared byte for byte with the shadows taken at
the snapshot instant.

What a platform cannot do is said by its side, with why, and the tests skip that combination by that
reason (or check what it does instead).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.shadow import Shadow
from contract.sides import ReplicaSide, VmSide
from helpers_kvm import Synced, sync_point

from sendense.models import JobSpec
from sendense.platforms import source_for, target_for
from sendense.protocols import SourceConnector, TargetConnector

# ---------------------------------------------------------------------------------------- rig


class Rig:
    def __init__(self, tmp: Path, vm: VmSide, replicas: ReplicaSide) -> None:
        self.tmp, self.vm, self.replicas = tmp, vm, replicas
        self.job = f"c{uuid.uuid4().hex[:8]}"
        self.work = tmp / "work"
        self.shadows = {k: Shadow(s) for k, s in vm.sizes.items()}
        self.keys = list(vm.sizes)
        self._made: dict[tuple[str, str | None], Any] = {}  # connectors by (end, job)

    def spec(self, job: str | None = None) -> JobSpec:
        """The rig's job (or another job `job` between the same VM and target)."""
        return JobSpec(name=job or self.job, source=self.vm.spec(), target=self.replicas.spec())

    def source(self, job: str | None = None, *, fresh: bool = False) -> SourceConnector:
        """The job's source connector, made once by the registry (`fresh`: a new one, as a new activity
        in another worker would make it)."""
        if fresh or ("source", job) not in self._made:
            work = self.work if job is None else self.tmp / f"work-{job}"
            self._made["source", job] = source_for(self.spec(job), work)
        return self._made["source", job]  # type: ignore[no-any-return]

    def target(self, job: str | None = None, *, fresh: bool = False) -> TargetConnector:
        if fresh or ("target", job) not in self._made:
            self._made["target", job] = target_for(self.spec(job))
        return self._made["target", job]  # type: ignore[no-any-return]

    # the guest's I/O, on the VM and on its shadow
    def write(self, key: str, offset: int, length: int, byte: int) -> None:
        self.vm.write(key, offset, bytes([byte]) * length)
        self.shadows[key].write(offset, bytes([byte]) * length)

    def zero(self, key: str, offset: int, length: int) -> None:
        self.vm.zero(key, offset, length)
        self.shadows[key].zero(offset, length)

    def discard(self, key: str, offset: int, length: int) -> None:
        """Whole granules only: what a partial one reads after a discard is the platform's choice."""
        assert offset % self.vm.granule == 0 and length % self.vm.granule == 0
        self.vm.discard(key, offset, length)
        self.shadows[key].zero(offset, length)

    def resize(self, key: str, size: int) -> None:
        self.vm.resize(key, size)
        self.shadows[key].resize(size)

    def now(self) -> dict[str, Shadow]:
        return {k: s.copy() for k, s in self.shadows.items()}

    def sync(
        self,
        sync_id: str,
        base: dict[str, str | None] | None = None,
        *,
        after_snapshot: Callable[[Any], None] | None = None,
        job: str | None = None,
    ) -> tuple[Synced, dict[str, Shadow]]:
        """One sync (snapshot, prepare, copy_disk per disk, commit, release) with the shadows at its
        snapshot instant; `after_snapshot(snap)` runs right after the snapshot, before the copy."""
        at: dict[str, Shadow] = {}

        def instant(snap: Any) -> None:
            at.update(self.now())
            if after_snapshot is not None:
                after_snapshot(snap)

        return sync_point(self.source(job), self.target(job), sync_id, base, before_copy=instant), at

    def differs(self, point_id: str, shadows: dict[str, Shadow], job: str | None = None) -> list[str]:
        """How the point's exported disks differ from `shadows` (empty: exactly equal)."""
        out = self.tmp / f"export-{point_id}"
        try:
            files = dict(self.target(job).export(point_id, "raw", out))
            if sorted(files) != sorted(shadows):
                return [f"point {point_id} has disks {sorted(files)}, expected {sorted(shadows)}"]
            return [
                f"point {point_id} disk {k}: {d}" for k, p in files.items() if (d := shadows[k].differs(p))
            ]
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def close(self) -> None:
        self.vm.close()
