"""Failback on a CloudStack source (sendense.protocols.FailbackSink): the original VM's volumes written in
place on primary storage, through a writable `qemu-nbd` on their qcow2 files, with the VM Stopped
(`SourcePower.power_off_vm`; a Running VM is refused in one line, and QEMU's image lock would refuse
it too). Runs on the agent of a host that mounts the pool (the one that synced the job last).

Change tracking, as the stopped-VM reader keeps it (connectors.cloudstack.stopped): the job's change
ids are libvirt checkpoints `<checkpoint>@<identity>`, whose bitmaps QEMU stored in the volumes when
the VM stopped. `diverged(key, since)` reads the failover point's bitmap at rest (what the source
wrote after its last point, and every reverse write since: an enabled bitmap records qemu-nbd's writes
too); it must be there, consistent and recording, else ChangeTrackingLost and the reverse sync
compares the whole volume. Writing in place keeps the volumes' identity (file, inode), so the job's
next forward sync can go on from those change ids. `rebase` adds the bitmaps a snapshot of the stopped
VM would add (StoppedVolumes.create_snapshot, nothing read): once the VM runs again, its host's libvirt
adopts them as checkpoints (LibvirtSource._adopt_carried) and the next forward sync is incremental
from the rebase. No cutover: the volumes are written in place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from connectors.cloudstack.source import CloudStackSourceConnector
from connectors.cloudstack.spec import CloudStackSource
from connectors.cloudstack.stopped import StoppedVolumes
from connectors.kvm.identity import split_change_id, tracking_problem
from connectors.kvm.target import PendingDisk
from sendense.datapath.extents import Extent, coalesce
from sendense.datapath.nbd import ALLOCATION, NbdConnection, dirty_context
from sendense.errors import ChangeTrackingLost, ResourceNotFound, TargetError
from sendense.models import DiskInfo, SnapshotRef
from tools.qemu import image_info, qcow2_bitmaps, qemu_nbd

log = logging.getLogger(__name__)


class CloudStackFailbackSink:
    platform = "cloudstack"

    def __init__(self, job: str, spec: CloudStackSource, work_dir: Path) -> None:
        self.job = job
        self.source = CloudStackSourceConnector(job, spec, work_dir)

    def _stopped(self) -> StoppedVolumes:
        vm = self.source.vm()
        if vm.get("state") != "Stopped":
            raise TargetError(
                f"CloudStack VM {self.source.spec.vm} is {vm.get('state')}: stop it before a failback writes "
                "its volumes"
            )
        return self.source._stopped()

    def _volume(self, key: str) -> Path:
        vols = self._stopped().volumes
        if key not in vols:
            raise ResourceNotFound(f"volume {key} of CloudStack VM {self.source.spec.vm}: not attached to it")
        return vols[key]

    def disks(self) -> list[DiskInfo]:
        out = []
        for key, path in sorted(self._stopped().volumes.items()):
            if not path.is_file():
                raise ResourceNotFound(
                    f"volume {key} of CloudStack VM {self.source.spec.vm}: not on this agent's storage"
                )
            out.append(DiskInfo(key=key, size=int(image_info(path)["virtual-size"]), ref=str(path)))
        return out

    @contextmanager
    def open_disk(self, key: str) -> Iterator[PendingDisk]:
        path = self._volume(key)
        label = f"volume {key} of CloudStack VM {self.source.spec.vm} (failback of job {self.job})"
        with qemu_nbd(path, readonly=False) as srv:
            with NbdConnection(srv.uri, label=label) as probe:
                size = probe.size
            yield PendingDisk(srv.uri, size, has_base=True, label=label)

    def diverged(self, key: str, since: str) -> Iterator[Extent]:
        path = self._volume(key)
        cp, _ = split_change_id(since)
        bitmaps = qcow2_bitmaps(image_info(path))
        why = tracking_problem(bitmaps, cp, f"volume {key}")
        if why is None and "auto" not in bitmaps[cp]:
            why = f"dirty bitmap {cp} of volume {key} is disabled: it misses later writes"
        if why:
            raise ChangeTrackingLost(why)
        with (
            qemu_nbd(path, readonly=True, bitmaps=[cp]) as srv,
            NbdConnection(srv.uri, contexts=(ALLOCATION, dirty_context(cp)), label=f"volume {key}") as c,
        ):
            yield from coalesce(c.changed_extents(cp))

    def rebase(self, snapshot_id: str) -> SnapshotRef:
        ref = self._stopped().create_snapshot(snapshot_id, {})
        log.info("job %s: failback rebased the CloudStack VM's change tracking at %s", self.job, snapshot_id)
        return ref

    def drop_base(self, ref: SnapshotRef) -> None:
        self._stopped().release_snapshot(ref, committed=False)

    def cut_over(self) -> None:
        return None

    def undo_cut_over(self) -> None:
        return None

    def cleanup(self) -> None:
        return None
