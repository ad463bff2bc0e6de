"""Connector protocols: what every platform provides, as a source and as a target.

The shapes fit hypervisors with dirty bitmaps or changed-block tracking (a snapshot plus a change id
per disk, blocks read over NBD or a file) as well as clouds that diff snapshots (two snapshots diffed
by an API, blocks read over HTTP). Data moves through `SourceDisk` / `TargetDisk`, which hand
the copy engine one reader or writer per connection; how bytes travel is the connector's business.
Connectors know nothing of Temporal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from sendense.errors import ResourceNotFound
from sendense.models import BootCheck, DiskInfo, NetworkInfo, PointInfo, SnapshotRef, VmInfo, VmPlan, VmRef

if TYPE_CHECKING:  # (workflows import the registry, which names these protocols: no data path for them)
    from sendense.datapath.copy import BlockReader, BlockWriter
    from sendense.datapath.extents import Extent


class SourceDisk(Protocol):
    """One disk of a source snapshot, opened for reading."""

    size: int
    # Capability: its change tracking sees a disk shrunk (and grown back) since the base, so an
    # incremental need not look for untracked zeros (datapath.sync.untracked_ranges). False: it may not.
    tracks_resize: bool

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        """Ranges to replicate from `start`, in offset order.

        `since` is the change id of the last committed point: only ranges changed after it, each
        tagged data or zero. None: every range of the disk (allocated data, and zero ranges).
        Raises ChangeTrackingLost if the change id cannot be used.
        """
        ...

    def connect(self) -> BlockReader:
        """A new reader; the copy engine opens one per connection."""
        ...


class TargetDisk(Protocol):
    """One replica disk being written by a sync.

    Capability `block_size`: 1 for a target that writes any byte range; a target that writes only whole
    blocks (a snapshot API's block) gives its size: the copy then widens every range to whole blocks,
    reads them whole from the source, and its requests (chunks, compare blocks) are multiples of it; a
    write that ends at the disk's end may be short.
    """

    size: int
    has_base: bool  # True when it starts from an earlier point's content (incremental or resync)
    block_size: int

    def connect(self) -> BlockWriter: ...

    def data_extents(self, start: int, end: int) -> Iterator[Extent]:
        """Where in [start, end) the replica may hold data (data extents; the rest reads zero). A target
        that cannot tell lists the whole range as data: correct, only slower."""
        ...


@runtime_checkable
class SourceConnector(Protocol):
    platform: str

    def validate(self) -> None:
        """Check that the VM and its resources exist and are usable; one-line errors."""
        ...

    def discover(self) -> VmInfo: ...

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        """A crash-consistent point across all disks; `base` maps disk key -> change id to diff against.

        A disk whose change id is unusable comes back with `tracking_lost` set, never silently full.
        """
        ...

    def open_disk(self, snap: SnapshotRef, key: str) -> AbstractContextManager[SourceDisk]: ...

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        """Drop what the snapshot holds. If committed, its change ids become the base of the next sync
        and older change tracking state may go; if not, the previous base must stay usable."""
        ...

    def forget(self) -> None:
        """Remove all change tracking state this job created on the source (the job is deleted).

        Bitmaps, checkpoints or change ids of the job, and whatever an earlier crashed sync left
        (exports, backup jobs, fleece or scratch files) go; other jobs' state on the same VM is never
        touched. Idempotent. A VM that is gone, or stopped where cleaning up without it is safe, is no
        error; what cannot be removed raises a one-line error saying what stays.
        """
        ...


# What `SourcePower.power_state` answers: the VM's state as its platform says it.
PowerState = Literal["running", "paused", "stopped", "gone", "unreachable"]
POWER_STATES: tuple[PowerState, ...] = ("running", "paused", "stopped", "gone", "unreachable")


@runtime_checkable
class SourcePower(Protocol):
    """The source VM's power, for a failover (pause it, take the final sync, power it off) and a
    failback's cutover (start the original VM again). An optional capability of a source platform
    (`Platform.source_power`, made by `sendense.platforms.source_power_for`), on the VM the job's
    source spec names.

    Every verb is idempotent (a retried step finds its effect done and does nothing more) and has its
    undo named. A verb that cannot reach the platform raises a retryable error (ResourceUnavailable);
    one that the platform refuses, a one-line error naming the VM. A pause or power-off whose VM is
    already in that state, or stopped, or gone, is no error.

    Undo and state: `pause_vm`'s undo is `resume_vm`, `power_off_vm`'s is `power_on_vm` (where
    `can_power_on`), `power_on_vm`'s is `power_off_vm`. Undos act on the state they find, not on who
    made it: `resume_vm` resumes a paused VM whoever paused it. A caller registers an undo only when
    `power_state()` showed that its step changes something (e.g. resume only a VM that was running
    before the pause), so that rolling back never starts what the operator had stopped.

    Capabilities:
    - `can_power_on`: False where the product cannot start the VM (a stopped VM given by its disks, a
      VM process the product did not start): `power_on_vm` then raises VmNotStartable, at once;
    - `pause_stops`: True where the platform has no pause and `pause_vm` stops the VM (a cloud instance): its
      `resume_vm` boots the guest again (a restart, not a continuation), and `power_state` after a
      pause says "stopped", never "paused".
    """

    platform: str

    @property
    def can_power_on(self) -> bool: ...

    @property
    def pause_stops(self) -> bool: ...

    def power_state(self) -> PowerState:
        """The VM's state as its platform says it, in bounded time (a few seconds), never raising for a
        platform that does not answer: that is how a failover decides planned (the source answers) or
        unplanned (it does not).

        - running: the guest runs and may write (also starting, or shutting down: not stopped yet);
        - paused: the VM exists and its vCPUs are stopped (paused, suspended, never started), so nothing
          writes its disks; `resume_vm` continues it;
        - stopped: no process runs the VM (or its platform says stopped) and its disks are there;
        - gone: the platform answers and the VM is not there (no domain, terminated, disks missing);
        - unreachable: the platform does not answer in time (socket busy or dead, connection refused,
          timeout, throttled or failing). A platform that answers with a configuration fault (bad
          credentials, a missing permission) raises that one-line error: it never means the VM is down.
        """
        ...

    def pause_vm(self) -> None:
        """Stop the VM's writes, so that nothing lands on its disks after the next snapshot (a planned
        failover's final sync): returns once no guest write can land any more (in-flight I/O drained).
        Paused already, stopped or gone: no error. Undo: `resume_vm`. Where `pause_stops`, the VM is
        stopped (waited for until the platform says stopped: a stopping guest still writes)."""
        ...

    def resume_vm(self) -> None:
        """Undo of `pause_vm`: a paused VM runs again (where `pause_stops`: a stopped VM is started and
        waited for until running). Running already, or stopped (not by a pause) or gone where the
        platform has a pause: no error, nothing done."""
        ...

    def power_off_vm(self) -> None:
        """The VM off for good (after a failover: the VM now runs on the target), hard: the guest gets
        no chance to write (its last writes are those of the final sync's point), while the platform's
        own state is kept (the VM process's I/O drained, its change tracking stored). Returns once the
        platform says the VM is off. Off already, or gone: no error. Undo: `power_on_vm`."""
        ...

    def power_on_vm(self) -> None:
        """Start the VM (a failback's cutover, the original VM on its current disks) and return once
        the platform says it runs (its guest then boots); paused: it is resumed; running already: no
        error. Where the product cannot start the VM (`can_power_on` False) raises VmNotStartable at
        once: the disks are current and the VM is the operator's to start. A VM that is gone raises
        ResourceNotFound. Undo: `power_off_vm`."""
        ...


@runtime_checkable
class TargetConnector(Protocol):
    platform: str

    def validate(self) -> None: ...

    def prepare(self, sync_id: str, disks: list[DiskInfo]) -> None:
        """Make replica disks ready for a sync, sized as given, starting afresh.

        Called right after the sync's snapshot was taken. A retried snapshot step takes a new
        snapshot under the same sync id, so nothing an earlier attempt of this sync wrote belongs to
        it: whatever is pending for `sync_id` (or for an abandoned sync) is discarded and the sync's
        replicas start again from the latest point (or empty). Never touches a committed point.
        Resuming a copy within one snapshot is `open_disk`'s business, never prepare's."""
        ...

    def open_disk(self, sync_id: str, key: str) -> AbstractContextManager[TargetDisk]: ...

    def commit(self, sync_id: str, point: PointInfo) -> PointInfo:
        """Atomically turn the sync's writes into an immutable recovery point."""
        ...

    def abort(self, sync_id: str) -> None: ...

    def list_points(self) -> list[PointInfo]:
        """Committed points, newest first."""
        ...

    def get_point(self, point_id: str | None) -> PointInfo:
        """The point `point_id` (None: the newest); ResourceNotFound naming the job if there is none."""
        ...

    def prune(self, keep: int) -> list[str]:
        """Delete the oldest points beyond `keep`; newer points keep their content."""
        ...

    def export(self, point_id: str, fmt: str, out_dir: Path) -> list[tuple[str, Path]]:
        """Write the point's disks as standalone images; returns (disk key, path)."""
        ...

    def hold(self, point_id: str, hold_id: str, reason: str) -> None:
        """Pin a point (a drill's or a failover's VM runs on it): prune never removes, merges or rewrites
        a held point, whatever the retention. Idempotent by `hold_id`; its undo is `release`."""
        ...

    def release(self, point_id: str, hold_id: str) -> None:
        """Drop a hold; a hold that is gone is no error."""
        ...

    def destroy(self) -> None:
        """Remove every replica and point of the job."""
        ...


def pick_point(job: str, points: list[PointInfo], point_id: str | None) -> PointInfo:
    """`TargetConnector.get_point` over a target's points (newest first): `point_id`, or the newest
    for None; a one-line error naming the job when there is none."""
    if not points:
        raise ResourceNotFound(f"job {job}: no recovery point yet")
    for p in points:
        if point_id is None or p.point_id == point_id:
            return p
    raise ResourceNotFound(f"job {job}: no recovery point {point_id}")


@runtime_checkable
class VmProvisioner(Protocol):
    """VMs made from a job's recovery points on its target: a drill's test VM or a failover's VM.

    Every mutating verb has its undo, and every verb is idempotent by the VM's name, which the caller
    chooses before the VM exists: a saga registers `destroy_vm(name)` before `create_vm(plan)` runs, so
    a step killed half-way is undone by name. A VM never changes its point: it runs on an overlay or a
    copy, and the point is held (`TargetConnector.hold`) by whoever created the VM.
    """

    platform: str

    def list_networks(self) -> list[NetworkInfo]:
        """Networks a production VM can be mapped to (test VMs get an isolated one of their own)."""
        ...

    def create_vm(self, plan: VmPlan) -> VmRef:
        """Create (not start) a VM from `plan.point_id`. test mode: on an isolated network, reaching
        nothing of production; production mode: on the networks `plan.network_map` names. A VM of this
        name made from the same plan already: returned as it is. Undo: `destroy_vm(plan.name)`."""
        ...

    def power_on(self, name: str) -> VmRef:
        """Start the VM (running already: no error). Undo: `power_off`."""
        ...

    def power_off(self, name: str) -> VmRef:
        """Stop the VM, hard (stopped already, or gone: no error)."""
        ...

    def boot_check(
        self, name: str, pattern: str, timeout: float, guest_agent: bool = False, status_checks: bool = False
    ) -> BootCheck:
        """Wait until `pattern` (a regular expression) shows on the VM's console, the platform reports
        it failed, or `timeout` seconds pass; say which, with the evidence. With `guest_agent`, the
        guest's agent must answer too; with `status_checks`, the platform's own status checks must
        pass (both within the same `timeout`); a platform without a guest agent channel refuses
        `guest_agent` in one line (InvalidSpec)."""
        ...

    def console(self, name: str) -> str:
        """The VM's console text so far (serial console, or the platform's console output)."""
        ...

    def list_vms(self) -> list[VmRef]:
        """Every VM this job's target made from its points (a leak check sees them all)."""
        ...

    def destroy_vm(self, name: str) -> None:
        """Remove the VM and everything made for it (process, overlay, image, volumes, snapshots,
        network, tap, namespace); its point's hold is the caller's to release. Gone already: no
        error. What cannot be removed raises a one-line error naming it."""
        ...


# The change id that stands for "the content of the VM's point": a failed-over VM's first reverse sync
# is an incremental from it (only what the VM changed since it was made from the point).
POINT_BASE = "point:"


def point_base(point_id: str) -> str:
    return f"{POINT_BASE}{point_id}"


@runtime_checkable
class VmChanges(Protocol):
    """A failback's reverse source: what a VM made from a point (`VmProvisioner`, a failover's VM)
    changed since it was made, read back for the copy engine. An optional capability of a target
    platform (`Platform.vm_changes`, made by `sendense.platforms.vm_changes_for`).

    Disk keys are the point's. Change ids: `point_base(point_id)` is the point's content itself, which
    the original place holds after the failover (where the source diverged after the point, the sink's
    `FailbackSink.diverged` lists where); every snapshot's `change_id` is the base of the next reverse
    sync. A base that cannot be used any more (tracking state lost with the VM's process) falls back to
    `point_base`, never to a full read: what a VM changed since its point is always known.

    Every verb is idempotent; `snapshot_vm`'s undo is `release(ref, committed=False)`.
    """

    platform: str

    def snapshot_vm(self, name: str, snapshot_id: str, base: dict[str, str] | None = None) -> SnapshotRef:
        """A crash-consistent snapshot of VM `name`'s disks, running or stopped. Each disk's
        `base_change_id` is `base[key]` where that is usable, else the VM's point (`point_base`), so a
        copy of it is always an incremental. A retried call with the same id takes the snapshot again
        (an earlier attempt's state is discarded). Undo: `release(ref, committed=False)`."""
        ...

    def changed_since_point(self, ref: SnapshotRef, key: str) -> Iterator[Extent]:
        """What disk `key` of the VM holds that its point does not (written, or zeroed), at the snapshot,
        in offset order: the ranges a first reverse sync copies."""
        ...

    def open_disk(self, ref: SnapshotRef, key: str) -> AbstractContextManager[SourceDisk]:
        """The disk at the snapshot, for the copy engine: `extents(point_base(...))` is
        `changed_since_point`, `extents(change id of an earlier reverse snapshot)` what changed since
        it, `extents(None)` everything."""
        ...

    def release(self, ref: SnapshotRef, committed: bool) -> None:
        """Drop what the snapshot holds. Committed: its change ids are the next reverse sync's base;
        not: the previous base stays usable. Released already, or the VM gone: no error."""
        ...

    def forget(self, name: str) -> None:
        """Remove every change tracking state failback made on VM `name` (a failback given up with the
        VM kept). Destroying the VM removes it as well. Idempotent."""
        ...


@runtime_checkable
class FailbackSink(Protocol):
    """A failback's reverse target: the original source place, its disks written in place. An optional
    capability of a source platform (`Platform.failback_sink`, made by
    `sendense.platforms.failback_sink_for`), on the VM the job's source spec names; keys are the
    source's disk keys (as in the job's points).

    The source VM must be off while its disks are written (`SourcePower.power_off_vm`): `open_disk`
    refuses, in one line, a disk a VM runs on. Every verb is idempotent.
    """

    platform: str

    def disks(self) -> list[DiskInfo]:
        """The source's disks as they are now (key, size, image or volume)."""
        ...

    def open_disk(self, key: str) -> AbstractContextManager[TargetDisk]:
        """Disk `key` of the source, writable (`has_base`: it holds the failover point's content, or
        more). What is written stays written: undoing a reverse sync is another reverse sync."""
        ...

    def diverged(self, key: str, since: str) -> Iterator[Extent]:
        """Where disk `key` changed since the job's change id `since` (the failover point's), by the
        source's own change tracking: what the source wrote after its last point (an unplanned
        failover) and what reverse syncs wrote since. A reverse sync copies these ranges too, so the
        disk ends up equal to the VM. Raises ChangeTrackingLost when `since` cannot be used: the
        reverse sync must then compare the whole disk (a resync)."""
        ...

    def rebase(self, snapshot_id: str) -> SnapshotRef:
        """New change tracking bases on every disk, named as the job's own snapshot `snapshot_id`
        would be: the job's next forward sync is an incremental from the returned change ids, if the
        job's latest point on the target reads what the disks hold now. Older bases stay (the next
        committed forward sync removes them). Undo: `drop_base(ref)`."""
        ...

    def drop_base(self, ref: SnapshotRef) -> None:
        """Undo of `rebase`: remove exactly the bases it added; gone already: no error."""
        ...

    # Where the source's disks cannot be written in place (a cloud whose block API writes snapshots,
    # not volumes), the reverse syncs write beside them and the cutover swaps them in. A platform that
    # writes in place does nothing in these three.

    def cut_over(self) -> None:
        """With the VM off and after the final reverse sync: make what the reverse syncs wrote the disks
        the VM starts on (volumes made from the written snapshots replace the old ones at their devices;
        the old ones are kept for the undo). Refuses, in one line, a reverse sync that did not
        finish. Idempotent. Undo: `undo_cut_over()`. In place: nothing to do."""
        ...

    def undo_cut_over(self) -> None:
        """Undo of `cut_over` (the VM off): the disks the VM had before it again; what the cutover made
        stays until `cleanup`. Nothing cut over: no error."""
        ...

    def cleanup(self) -> None:
        """Remove what the failback made or kept beside the source's disks (written snapshots, volumes
        no VM uses: after a cutover the replaced ones, after an undo the new ones), never a disk the VM
        uses nor the job's own change tracking. Call it once the failback is over either way (after the
        job's next forward point, when undo is no longer wanted). Idempotent."""
        ...
