"""The scenario rig: one job on real qcow2 images (the stopped-VM KVM source) replicated to a real
target (the KVM qcow2 directory, or the AWS lab), driven at the activity layer as the workflow
drives it, step by step, with the shadow model (shadow.py) kept alongside and checked after every
step (checks.py).

A step is a small JSON-able list, so a failing sequence is printed, stored and replayed as data
(test_regressions.py):

    ["write", disk, offset, length, pattern]   guest write (qemu-io write -P)
    ["zero", disk, offset, length]             qemu-io write -z
    ["discard", disk, offset, length]          qemu-io discard (whole 64 KiB clusters: reads zero)
    ["resize", disk, size]                     qemu-img resize [--shrink]
    ["add_disk", size] / ["remove_disk", disk] the job's disk list changes (between syncs)
    ["restart", a, b]                          the running VM restarts, devices a and b swapped
    ["begin", mode, copy_up_to, k]             inline: begin_and_copy(finish); split: begin_sync.
                                               k > 0: the inline copy fails at its k-th checkpoint.
                                               With a sync open after a failed begin: its retry,
                                               a new snapshot under the same sync id
    ["copy", fault, k]                         copy_disk of the next disk; fault "raise" (exception
                                               at checkpoint k) or "kill" (SIGKILL of the worker
                                               process at checkpoint k; the retry resumes from
                                               its token) or "none"
    ["finish"] / ["fail"]                      finish_sync / abort_sync + release_snapshot(False)
    ["retention", n] / ["bandwidth", n]        job settings (0: no limit)
    ["prune"]                                  prune_points at the retention
    ["export_during_prune"]                    one thread exports the oldest point, one prunes it
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

from scenarios import checks
from scenarios.faults import INJECTED, killed_copy, raise_at
from scenarios.shadow import OpenSync, Shadow
from scenarios.sources import RunningVm, StoppedVm
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.replication import (
    abort_sync,
    begin_and_copy,
    begin_sync,
    copy_disk,
    finish_sync,
    prune_points,
    release_snapshot,
)
from connectors.aws.spec import AwsTarget
from connectors.kvm.spec import KvmTarget
from connectors.vsphere.spec import VsphereTarget
from sendense.errors import SendenseError
from sendense.models import (
    AbortRequest,
    BeginResult,
    CommitRequest,
    CopyRequest,
    DiskCopyResult,
    FinishResult,
    JobSpec,
    PruneRequest,
    ReleaseRequest,
    Retention,
    SnapshotRef,
    SnapshotRequest,
    Tuning,
)
from sendense.platforms import target_for

MiB = 1 << 20
CLUSTER = 64 << 10
Step = list[Any]


class ScenarioFailure(AssertionError):
    """The system did not do what the model says it must: `what`, after `steps`."""

    def __init__(self, what: str, steps: list[Step]) -> None:
        super().__init__(f"after steps {steps}: {what}")
        self.what, self.steps = what, steps


class Scenario:
    def __init__(
        self,
        root: Path,
        target: str,
        lab: Any = None,  # the AWS lab (aws target), the vSphere lab (vsphere target)
        *,
        keep: int = 3,
        tuning: dict[str, Any],
        source: str = "disks",
    ) -> None:
        self.root, self.target_kind, self.lab = Path(root), target, lab
        self.src: StoppedVm | RunningVm = RunningVm(self.root) if source == "qmp" else StoppedVm(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "home"
        self._old_home = os.environ.get("SENDENSE_HOME")
        os.environ["SENDENSE_HOME"] = str(self.home)
        self.job = f"sc{uuid.uuid4().hex[:8]}"
        self.job_id = uuid.uuid4().hex
        self.tuning = Tuning(**tuning)
        self.shadow = Shadow(keep, live=source == "qmp")
        self.env = ActivityEnvironment()
        self.base: dict[str, str | None] = {}  # the change ids of the last committed point
        self.seq = 0
        self.log: list[Step] = []
        self.open_snap: SnapshotRef | None = None
        self.open_spec: JobSpec | None = None
        self.results: list[DiskCopyResult] = []
        self.committed: dict[str, dict[str, Any]] = {}  # point id -> its metadata at commit
        # vSphere target: the placeholder's disk capacities as of its newest point (vSphere cannot
        # extend a disk of a VM with snapshots: a sync of a disk grown past its capacity is refused)
        self.capacity: dict[str, int] = {}
        self.pending_capacity: dict[str, int] = {}
        self.refused = False  # the open sync's last begin was refused (a replay's copy steps do nothing)
        self._target: Any = None
        self._lab_ec2: Any = None

    def target(self) -> Any:
        """The target connector the checks read points through (as `point list`/`export` do); one
        for the scenario, so that the AWS one's clients are made once."""
        if self._target is None:
            self._target = target_for(self.spec())
        return self._target

    def lab_ec2(self) -> Any:
        if self._lab_ec2 is None:
            assert self.lab is not None
            self._lab_ec2 = self.lab.client("ec2")
        return self._lab_ec2

    def close(self) -> None:
        self.src.close()
        if self._old_home is None:
            os.environ.pop("SENDENSE_HOME", None)
        else:
            os.environ["SENDENSE_HOME"] = self._old_home

    # ------------------------------------------------------------------ the job

    def spec(self) -> JobSpec:
        if self.target_kind == "aws":
            assert self.lab is not None
            target: Any = AwsTarget(
                platform="aws", region=self.lab.region, endpoint_url=self.lab.endpoint_url
            )
        elif self.target_kind == "vsphere":
            lab = self.lab
            target = VsphereTarget(
                platform="vsphere",
                server=f"{lab.host}:{lab.port}",
                thumbprint=lab.thumbprint,
                datacenter="DC0",
                datastore="LocalDS_0",
            )
        else:
            target = KvmTarget(platform="kvm", path=self.root / "rep")
        return JobSpec(
            name=self.job,
            job_id=self.job_id,
            source=self.src.spec(),
            target=target,
            retention=Retention(points=self.shadow.keep),
            tuning=self.tuning,
        )

    def live_spec(self) -> JobSpec:
        """The spec an activity of the open sync gets: its disks as at its begin, the settings now."""
        spec = self.open_spec or self.spec()
        return spec.model_copy(
            update={"retention": Retention(points=self.shadow.keep), "tuning": self.tuning}
        )

    # ------------------------------------------------------------------ steps

    def step(self, s: Step) -> None:
        self.log.append(list(s))
        getattr(self, f"_do_{s[0]}")(*s[1:])

    def replay(self, steps: list[Step]) -> None:
        self.check()
        for s in steps:
            self.step(s)
            self.check()

    def check(self) -> None:
        checks.check_all(self)

    def fail(self, what: str) -> None:
        raise ScenarioFailure(what, [list(s) for s in self.log])

    # the source --------------------------------------------------------

    def _io(self, i: int, cmd: str) -> None:
        self.src.io(i, cmd)
        self.shadow.touched(i)

    def _do_write(self, i: int, offset: int, length: int, pattern: int) -> None:
        self._io(i, f"write -P 0x{pattern:02x} {offset} {length}")
        self.shadow.disks[i].write(offset, bytes([pattern]) * length)

    def _do_zero(self, i: int, offset: int, length: int) -> None:
        self._io(i, f"write -z {offset} {length}")
        self.shadow.disks[i].zero(offset, length)

    def _do_discard(self, i: int, offset: int, length: int) -> None:
        assert offset % CLUSTER == 0 and (
            length % CLUSTER == 0 or offset + length == self.shadow.disks[i].size
        )
        self._io(i, f"discard {offset} {length}")
        self.shadow.disks[i].zero(offset, length)

    def _do_resize(self, i: int, size: int) -> None:
        assert not (self.shadow.live and self.shadow.open), "the running VM is resized between syncs"
        self.src.resize(i, size, shrink=size < self.shadow.disks[i].size)
        self.shadow.disks[i].resize(size)
        self.shadow.resized_disk(i)

    def _do_add_disk(self, size: int) -> None:
        assert self.shadow.open is None, "the disk list changes between syncs"
        d = self.shadow.add_disk(size)
        self.src.add(d.ident, size)

    def _do_remove_disk(self, i: int) -> None:
        assert self.shadow.open is None, "the disk list changes between syncs"
        self.src.remove(i)
        del self.shadow.disks[i]

    def _do_restart(self, a: int, b: int) -> None:
        """The running VM restarted, devices a and b getting each other's image."""
        assert self.shadow.open is None
        self.src.restart(a, b)
        d = self.shadow.disks
        d[a], d[b] = d[b], d[a]

    # syncs -------------------------------------------------------------

    def _do_begin(self, mode: str, copy_up_to: int, k: int) -> None:
        sh = self.shadow
        if sh.open is None:
            self.seq += 1
            sh.open = OpenSync(sync_id=f"s{self.seq:04d}", mode=mode)
            self.open_spec, self.results = self.spec(), []
        sync = sh.open
        assert not sync.snapped, "begin is retried only after a failed begin"
        checks.source_matches_shadow(self)
        sh.snapshot(sync)
        refused = self._placeholder_refuses(sync)
        self.refused = False
        req = SnapshotRequest(spec=self.live_spec(), snapshot_id=sync.sync_id, base=dict(self.base))
        if sync.mode == "split":
            try:
                self.open_snap = self.env.run(begin_sync, req)
            except ApplicationError as e:
                if refused is None:
                    raise
                self._expect_refusal(e, refused, injected=False)
                sync.snapped = False
                return
            if refused is not None:
                self.fail(
                    f"begin of {sync.sync_id}: not refused although disk {refused} grew past its capacity"
                )
            self._check_snapshot(self.open_snap)
            return
        req = req.model_copy(update={"copy_up_to": copy_up_to, "finish": True})
        try:
            if k:
                with raise_at(k):
                    begun: BeginResult = self.env.run(begin_and_copy, req)
            else:
                begun = self.env.run(begin_and_copy, req)
        except ApplicationError as e:
            if refused is not None:
                self._expect_refusal(e, refused, injected=bool(k))
            else:
                self._expect_injected(e)
            sync.snapped = False  # the activity released its snapshot; the workflow retries the begin
            return
        if refused is not None:
            self.fail(f"begin of {sync.sync_id}: not refused although disk {refused} grew past its capacity")
        self.open_snap = begun.snapshot
        self._check_snapshot(begun.snapshot)
        self.results = list(begun.copied)
        sync.copied = [r.key for r in begun.copied]
        if begun.finished is not None:
            self._committed(begun.finished)

    def _placeholder_refuses(self, sync: OpenSync) -> str | None:
        """vSphere target: the disk whose size is past its placeholder disk's capacity (the sync is
        refused in one line: vSphere cannot extend a disk of a VM with snapshots), else None. The
        capacities the sync's prepare leaves are kept for its commit. Each prepare starts from the
        newest point's configuration (it reverts to it); before the first point the placeholder is made
        anew with the source's sizes."""
        if self.target_kind != "vsphere":
            return None
        latest = self.shadow.latest()
        cap = dict(self.capacity) if latest is not None else {}
        in_point = set(latest.disks) if latest is not None else set()
        for key, data in sync.contents.items():
            size = -(-len(data) // 1024) * 1024  # vSphere sizes disks in KiB
            if key in cap and key in in_point:
                if cap[key] < len(data):
                    return key
            else:
                cap[key] = size  # a new disk device for the key
        self.pending_capacity = cap
        return None

    def _expect_refusal(self, e: ApplicationError, key: str, injected: bool) -> None:
        if injected and INJECTED in e.message:
            return  # the injected fault fired before the prepare
        self.refused = True
        if "vSphere cannot extend a disk of a VM with snapshots" not in e.message or key not in e.message:
            self.fail(
                f"disk {key} grew past its placeholder disk: expected the refusal, got {e.type}: {e.message}"
            )
        if "\n" in e.message:
            self.fail(f"a multi-line error: {e.message!r}")

    def _check_snapshot(self, snap: SnapshotRef) -> None:
        sync = self.shadow.open
        assert sync is not None
        got = [(d.key, d.size) for d in snap.disks]
        want = [(k, len(v)) for k, v in sync.contents.items()]
        if got != want:
            self.fail(f"snapshot {snap.snapshot_id} has disks {got}, the source {want}")
        for d in snap.disks:
            if sync.kinds[d.key] == "resync" and not d.tracking_lost:
                sync.kinds[d.key] = "resync?"  # expected resync; whether a reason was given is checked below

    def _expect_injected(self, e: ApplicationError) -> None:
        if INJECTED not in e.message:
            self.fail(f"unexpected error: {e.type}: {e.message}")
        if "\n" in e.message:
            self.fail(f"a multi-line error: {e.message!r}")

    def _do_copy(self, fault: str, k: int) -> None:
        if self.refused and self.shadow.open is not None and not self.shadow.open.snapped:
            return  # (a replayed case: its begin was refused, nothing to copy)
        sync, snap = self.shadow.open, self.open_snap
        assert sync is not None and sync.snapped and snap is not None
        if len(self.results) == len(snap.disks):
            return  # (a replay whose earlier fault did not fire this time: the copy is done)
        key = snap.disks[len(self.results)].key
        req = CopyRequest(spec=self.live_spec(), sync_id=sync.sync_id, snapshot=snap, disk=key)
        # written, shrunk below its snapshot size or resized to another size after the snapshot: the
        # copy must refuse; resized back to its size (grown, then shrunk back): it may
        other_size = self.shadow.disks[int(key[4:])].size != len(sync.contents[key])
        stale = key in sync.touched or key in sync.shrunk or other_size
        may_refuse = key in sync.resized
        result: DiskCopyResult | None = None
        error: tuple[str, str] | None = None
        if fault == "kill":
            out = killed_copy(lambda: self.env.run(copy_disk, req), k)
            if out is None:  # killed: the workflow's retry resumes from the token (the next copy step)
                return
            if "ok" in out:
                result = DiskCopyResult.model_validate(out["ok"])
            else:
                error = (out["error"], out["message"])
        else:
            try:
                if fault == "raise":
                    with raise_at(k):
                        result = self.env.run(copy_disk, req)
                else:
                    result = self.env.run(copy_disk, req)
            except ApplicationError as e:
                error = (e.type or "", e.message)
        if error is not None:
            if (stale or may_refuse) and error[0] == "SnapshotInconsistent":
                return
            if not stale and fault == "raise" and INJECTED in error[1]:
                return
            self.fail(f"copy of {key}: unexpected error {error[0]}: {error[1]}")
        assert result is not None
        if stale:
            self.fail(f"copy of {key} succeeded although the disk changed after the snapshot")
        self.results.append(result)
        sync.copied.append(key)

    def _do_finish(self) -> None:
        if self.refused and self.shadow.open is not None and not self.shadow.open.snapped:
            self._do_fail()  # (a replayed case whose begin was refused: the workflow gives the sync up)
            return
        sync, snap = self.shadow.open, self.open_snap
        assert sync is not None and snap is not None
        while len(self.results) < len(snap.disks):  # (a replay whose fault fired where it did not before)
            copied = len(self.results)
            self._do_copy("none", 0)
            if len(self.results) == copied:
                self.fail("finish: a disk of the sync cannot be copied (the replay diverged)")
        req = CommitRequest(
            spec=self.live_spec(),
            sync_id=sync.sync_id,
            snapshot=snap,
            results=self.results,
            keep=self.shadow.keep,
        )
        self._committed(self.env.run(finish_sync, req))

    def _committed(self, done: FinishResult) -> None:
        sync, snap = self.shadow.open, self.open_snap
        assert sync is not None and snap is not None
        if done.release_error is not None:
            self.fail(f"release after commit failed: {done.release_error}")
        point = done.point
        for r in self.results:
            want = sync.kinds[r.key]
            if want == "resync?":
                self.fail(
                    f"disk {r.key} is another image than in the last point, and no reason was given "
                    f"(tracking_lost empty; copied as {r.kind})"
                )
            if r.kind != want:
                self.fail(f"disk {r.key} was synced as {r.kind}, the model expects {want}")
        want_kind = self.shadow.point_kind(sync)
        if point.kind != want_kind:
            self.fail(f"point {point.point_id} is {point.kind}, the model expects {want_kind}")
        self.committed[point.point_id] = checks.point_meta(point)
        self.base = {d.key: d.change_id for d in snap.disks}
        self.capacity = self.pending_capacity
        self.shadow.commit(sync)
        self.open_snap, self.open_spec, self.results = None, None, []

    def _do_fail(self) -> None:
        sync = self.shadow.open
        assert sync is not None
        spec = self.live_spec()
        self.env.run(abort_sync, AbortRequest(spec=spec, sync_id=sync.sync_id))
        if self.open_snap is not None and sync.snapped:
            self.env.run(
                release_snapshot, ReleaseRequest(spec=spec, snapshot=self.open_snap, committed=False)
            )
        self.shadow.open = None
        self.open_snap, self.open_spec, self.results = None, None, []

    # settings and points -----------------------------------------------

    def _do_retention(self, n: int) -> None:
        self.shadow.keep = n

    def _do_bandwidth(self, n: int) -> None:
        self.tuning = self.tuning.model_copy(update={"bandwidth_limit": n or None})

    def _do_prune(self) -> None:
        res = self.env.run(prune_points, PruneRequest(spec=self.live_spec(), keep=self.shadow.keep))
        gone = self.shadow.prune(self.shadow.keep)
        if sorted(res.removed) != sorted(gone):
            self.fail(f"prune to {self.shadow.keep} removed {res.removed}, the model {gone}")

    def _do_export_during_prune(self) -> None:
        sh = self.shadow
        assert len(sh.points) >= 2
        oldest, keep = sh.points[0], len(sh.points) - 1
        out = self.root / "export-during-prune"
        got: dict[str, Any] = {}

        def export() -> None:
            try:
                got["files"] = self.target().export(oldest.point_id, "raw", out)
            except SendenseError as e:
                got["error"] = e

        t = threading.Thread(target=export)
        t.start()
        res = self.env.run(prune_points, PruneRequest(spec=self.live_spec(), keep=keep))
        t.join()
        before = list(sh.points)
        gone = sh.prune(keep)
        if res.removed == [] and "files" in got:  # skipped: the export had it open (a point in use)
            sh.points = before
        elif sorted(res.removed) != sorted(gone):
            self.fail(f"prune to {keep} during an export removed {res.removed}, the model {gone}")
        if "error" in got:
            if "\n" in got["error"].message:
                self.fail(f"export during prune: a multi-line error {got['error'].message!r}")
        else:
            checks.files_match(self, oldest, dict(got["files"]), "export during prune")
        left = [f.name for f in out.glob("*")]
        if left:
            self.fail(f"export during prune left {left}")


def replay_log(root: Path, target: str, lab: Any, log: list[Step]) -> None:
    """Replay a scenario as the soak prints it: ["start", keep, tuning, source] and its steps."""
    _, keep, tuning, source = log[0]
    sc = Scenario(root, target, lab, keep=keep, tuning=tuning, source=source)
    try:
        sc.replay(log[1:])
    finally:
        sc.close()
