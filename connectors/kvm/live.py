"""KVM source, running VM: QEMU's own pull-backup over its QMP socket (what libvirt's backupBegin does).

Change id = a dirty bitmap on each disk's format node, `sendense.<job>.<snapshot>.<tag>`, the tag
being the disk's identity (key and image path: `identity.disk_tag`), so a base is used only on the disk
and image it was made on (disks swapped behind node names are a resync, with the reason). Persistent
on qcow2; on a raw disk non-persistent (QEMU tracks it while the VM runs; after a restart that disk
is resynced, with the reason). Which nodes are disks, under which key: `live_disks`.
Each checkpoint has two disabled shrink markers merged in by the same transaction from a scratch node
(`image_bitmaps.add_shrink_markers` explains them): block_resize truncates bitmaps on a shrink and
extends them clean on a grow, so a disk shrunk and grown back since the base is copied from the shrunk
size on.
The job's bitmaps form a chain like libvirt checkpoints: the newest is enabled (records writes), older
ones are disabled and hold the writes between their instant and the next checkpoint's.

A snapshot is one QMP `transaction` across all disks (so the point is crash-consistent), per disk:

1. `block-dirty-bitmap-add` a temporary, disabled, non-persistent bitmap and `block-dirty-bitmap-merge`
   into it the chain from the base on: what changed between the base and now (incremental only);
2. `block-dirty-bitmap-add` the new persistent checkpoint and `block-dirty-bitmap-disable` the one
   that was recording;
3. `blockdev-backup sync=none` from the disk node into a fleece qcow2 whose backing is the disk node:
   a copy-before-write filter saves old data into the fleece before a guest write overwrites it, so
   the fleece reads as the disk at the snapshot instant.

The fleece node is exported read-only over QEMU's NBD server with the temporary bitmap, under a
name made of hex digits whatever the node names are (`-drive` gives `#block113`, which no NBD URI
takes). QEMU runs one NBD server per process: every job on the VM shares it (`nbd_socket`, named
after the QMP socket), and it is stopped only when no sendense export remains. `open_disk` reads
the export (`NbdSourceDisk`, `base:allocation` + the bitmap).
Every name a later process needs is in the snapshot's handles: the copy may run in another worker
process, which reopens the export from the `SnapshotRef` alone.

Release tears it down (export, backup job, fleece node and file, temporary bitmap, NBD server when
no sendense export remains). Committed: the job's older checkpoints go. Not committed: the new
checkpoint is merged back into the previous one, which records again, so the old base still covers
every write. `forget` (the job is deleted) clears leftovers as a new snapshot would, then removes every
checkpoint of the job; with the VM stopped, from the images recorded at the last snapshot.

Ordering: QEMU does not keep bitmaps in creation order (a restart reverses them), so the chain is
known only by which bitmap records. A recording base is the newest and alone covers everything since
its instant. A base that no longer records (a crash left newer checkpoints around) is merged with
every other checkpoint of the job: a superset of the changes, never less.

QEMU 7.2 notes: `query-block` shows the implicit copy-before-write filter as the device's node during a
backup (`live_disks` looks through it); names and teardown of QEMU-side objects: `live_qemu`.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.kvm import handles
from connectors.kvm.hardware import qmp_hardware
from connectors.kvm.identity import (
    base_problem,
    bitmap_name,
    bitmap_prefix,
    disk_tag,
    marker_prefix,
    shrink_markers,
    tracking_problem,
)
from connectors.kvm.live_disks import QemuDisk, record, recorded
from connectors.kvm.live_qemu import QmpJob, action, temp_prefix
from connectors.kvm.offline import NbdSourceDisk
from sendense.datapath.nbd import unix_uri
from sendense.errors import (
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    SnapshotInconsistent,
)
from sendense.models import DiskInfo, DiskSnapshot, SnapshotRef, VmInfo
from tools.qemu import qemu_img, read_qcow2_header, remove_bitmaps
from tools.qmp import QmpClient, VmNotRunning

log = logging.getLogger(__name__)

GRANULARITY = 64 << 10


class QmpSource(QmpJob):
    platform = "kvm"
    # export `qemu:allocation-depth` too (which layer of the fleece's chain holds a range): a failed-over
    # VM's reverse sync reads what its overlay holds (vm_changes)
    allocation_depth = False

    # ------------------------------------------------------------------ protocol

    def validate(self) -> None:
        try:
            with self._client() as c:
                self._disks(c)
        except (ResourceNotFound, ResourceUnavailable) as e:
            raise type(e)(f"source.qmp: {e.message}") from None

    def discover(self) -> VmInfo:
        with self._client() as c:
            disks = self._disks(c)
            name = c.execute("query-name").get("name") or self.qmp.stem
            hw = qmp_hardware(c, [DiskInfo(key=d.key, size=d.size, ref=d.image) for d in disks])
        return VmInfo(name=name, platform="kvm", **hw)

    def _plan(
        self,
        c: QmpClient,
        d: QemuDisk,
        snapshot_id: str,
        nonce: str,
        since: str | None,
        named: dict[str, Any],
    ) -> dict[str, Any]:
        """What the snapshot transaction does to one disk: its new checkpoint, the bitmaps merged into
        the exported one (none: a full or resync read), the checkpoints to stop recording."""
        prefix = bitmap_prefix(self.job)
        node, tag = d.node, disk_tag(d.key, d.image)
        new = bitmap_name(self.job, snapshot_id, tag)
        bitmaps = self._bitmaps(c, node, named)
        lost = (
            base_problem(self.job, since, d.key, d.image, self._flags(bitmaps), f"node {node}")
            if since
            else None
        )
        if lost and since and since not in bitmaps and not d.persistent:
            lost = (
                f"disk {d.key} ({d.image}) is raw: QEMU tracks its changes only while the VM runs, and "
                f"checkpoint {since} is gone (VM restarted)"
            )
        chain = {n: b for n, b in bitmaps.items() if n.startswith(prefix)}
        sources: list[str] = []
        if since and not lost:
            if bitmaps[since].get("recording"):
                sources = [since]
            else:  # every checkpoint of this disk since the base: a superset of the changes
                sources = sorted(n for n in chain if n != new and n.endswith("." + tag))
                bad = next((n for n in sources if chain[n].get("inconsistent")), None)
                if bad:
                    lost = tracking_problem(self._flags(chain), bad, f"node {node}")
                    sources = []
        regrown = None
        if since and not lost:
            lost, regrown = self._shrunk(since, bitmaps, node)
        if lost:
            log.warning("disk %s of %s: change tracking lost: %s", d.key, self.qmp, lost)
        for m in shrink_markers(new, self.job):  # an earlier attempt's markers: made afresh
            if m in bitmaps:
                self._try(c, "block-dirty-bitmap-remove", node=node, name=m)
        # leftovers: a checkpoint of an earlier attempt at this very snapshot, unusable bitmaps
        if new in chain:
            self._rollback_checkpoint(c, node, new, None, chain)
        for n, b in chain.items():
            if n != new and b.get("inconsistent"):
                self._try(c, "block-dirty-bitmap-remove", node=node, name=n)
        if new in chain or any(b.get("inconsistent") for b in chain.values()):
            chain = {n: b for n, b in self._bitmaps(c, node).items() if n.startswith(prefix)}
            if since in sources and since not in chain:
                lost, sources = f"dirty bitmap {since} is missing from node {node}", []
            sources = [s for s in sources if s in chain]
        return {
            "key": d.key,
            "node": node,
            "size": d.size,
            "new": new,
            "markers": shrink_markers(new, self.job),
            "regrown": regrown,
            "persistent": d.persistent,
            "since": since,
            "lost": lost,
            "sources": sources,
            "prevs": sorted(n for n, b in chain.items() if b.get("recording") and n != new),
            **self._ids(d.key, nonce),
        }

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        nonce = secrets.token_hex(3)
        tmp = f"{temp_prefix(self.job)}{snapshot_id}/{nonce}"
        with self._client() as c:
            self._cleanup_stale(c)
            disks = self._disks(c)
            named = self._named_nodes(c)
            plans = [self._plan(c, d, snapshot_id, nonce, base.get(d.key), named) for d in disks]

            # fleece images, backed by the live disk nodes
            self._fleece_dir().mkdir(parents=True, exist_ok=True)
            added: list[str] = []
            scratch: dict[int, str] = {}  # disk size -> marker scratch node
            try:
                for p in plans:
                    opts = f"cluster_size={GRANULARITY}"
                    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p["fleece_file"], str(p["size"]))
                    fleece = {"driver": "file", "filename": p["fleece_file"]}
                    node_args = {"driver": "qcow2", "node-name": p["fleece_node"], "backing": p["node"]}
                    c.execute("blockdev-add", **node_args, file=fleece)
                    added.append(p["fleece_node"])
                actions = self._add_markers(c, plans, nonce, scratch)  # at the snapshot instant too
                for p in plans:
                    node = p["node"]
                    if p["sources"]:
                        actions += [
                            action(
                                "block-dirty-bitmap-add",
                                node=node,
                                name=tmp,
                                persistent=False,
                                disabled=True,
                                granularity=GRANULARITY,
                            ),
                            action("block-dirty-bitmap-merge", node=node, target=tmp, bitmaps=p["sources"]),
                        ]
                    actions.append(
                        action(
                            "block-dirty-bitmap-add",
                            node=node,
                            name=p["new"],
                            persistent=p["persistent"],  # raw: tracked while the VM runs
                            granularity=GRANULARITY,
                        )
                    )
                    actions += [
                        action("block-dirty-bitmap-disable", node=node, name=prev) for prev in p["prevs"]
                    ]
                    backup = {
                        "device": node,
                        "target": p["fleece_node"],
                        "sync": "none",
                        "job-id": p["job_id"],
                    }
                    actions.append(action("blockdev-backup", **backup))
                c.execute("transaction", actions=actions)
            except BaseException:
                self._del_nodes(c, set(added) | set(scratch.values()))
                for p in plans:
                    Path(p["fleece_file"]).unlink(missing_ok=True)
                raise
            created_at = datetime.now(UTC)
            self._del_nodes(c, set(scratch.values()))

            snap_disks = [
                DiskSnapshot(
                    key=p["key"],
                    size=p["size"],
                    change_id=p["new"],
                    base_change_id=p["since"],
                    tracking_lost=p["lost"],
                    handle=handles.QmpDisk(
                        qmp=str(self.qmp),
                        node=p["node"],
                        socket=str(self._nbd_socket()),
                        export=p["export"],
                        export_id=p["export_id"],
                        job_id=p["job_id"],
                        fleece_node=p["fleece_node"],
                        fleece_file=p["fleece_file"],
                        temp_bitmap=tmp if p["sources"] else "",
                        regrown=p["regrown"],
                        prev_bitmaps=p["prevs"],
                    ).dump(),
                )
                for p in plans
            ]
            snap = SnapshotRef(
                snapshot_id=snapshot_id,
                created_at=created_at,
                disks=snap_disks,
                handle=handles.QmpSnapshot(
                    qmp=str(self.qmp), socket=str(self._nbd_socket()), job=self.job
                ).dump(),
            )
            try:
                sock = self._start_nbd(c)
                for p in plans:
                    args: dict[str, Any] = {
                        "type": "nbd",
                        "id": p["export_id"],
                        "node-name": p["fleece_node"],
                        "name": p["export"],
                        "writable": False,
                    }
                    if p["sources"]:
                        args["bitmaps"] = [tmp]
                    if self.allocation_depth:
                        args["allocation-depth"] = True
                    c.execute("block-export-add", **args)
            except BaseException:
                try:
                    self._release(c, snap, committed=False)
                except SendenseError as e:  # pragma: no cover - best effort, the original error matters
                    log.warning("could not undo snapshot %s: %s", snapshot_id, e)
                raise
            log.info("snapshot %s of %s: %d disks exported on %s", snapshot_id, self.qmp, len(plans), sock)
            return snap

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[NbdSourceDisk]:
        d = snap.disk(key)
        h = handles.QmpDisk.parse(d.handle)
        with self._client() as c:
            exports = {e["id"]: e for e in c.execute("query-block-exports")}
        e = exports.get(h.export_id)
        if e is None or e.get("shutting-down") or e.get("node-name") != h.fleece_node:
            raise SnapshotInconsistent(  # it can never pass: a new snapshot is needed
                f"snapshot {snap.snapshot_id} of disk {key} is gone from the VM behind {self.qmp} "
                "(VM restarted or snapshot released)"
            )
        uri = unix_uri(h.socket, h.export)
        bitmap_for = {d.base_change_id: h.temp_bitmap} if d.base_change_id and h.temp_bitmap else {}
        regrown = h.regrown
        label = f"disk {key} of the VM behind {self.qmp}"
        with NbdSourceDisk(
            uri, d.size, bitmap_for=bitmap_for, regrown=regrown, tracks_resize=True, label=label
        ) as disk:
            try:
                size = disk.status().size  # the connection the copy's block status queries use
            except ResourceUnavailable as err:  # the export was there: worth a retry in place
                raise ResourceUnavailable(f"snapshot {snap.snapshot_id} of disk {key}: {err}") from None
            if size != d.size:
                raise SnapshotInconsistent(
                    f"disk {key} reads {size} bytes, snapshot {snap.snapshot_id} says {d.size} (resized)"
                )
            yield disk

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        try:
            c = self._client()
        except (ResourceNotFound, VmNotRunning) as e:
            # QEMU is gone, and with it exports, jobs and fleece nodes; checkpoints stay in the images
            log.warning("release of snapshot %s: %s; only local files are removed", snap.snapshot_id, e)
            for d in snap.disks:
                if fleece := handles.QmpDisk.parse(d.handle).fleece_file:
                    Path(fleece).unlink(missing_ok=True)
            return
        with c:
            self._release(c, snap, committed)

    def forget(self) -> None:
        """Tear down what a crashed sync of this job left, then remove every checkpoint of the job from
        every node. VM not running: the checkpoints are removed from the images recorded at the last
        discover or snapshot (`live_disks.record`), where no process holds them; what cannot be
        removed raises a one-line error saying what stays. Local fleece files go either way."""
        try:
            c = self._client()
        except (ResourceNotFound, VmNotRunning) as e:
            log.info("forget job %s: %s; removing its checkpoints from the images", self.job, e)
            shutil.rmtree(self._fleece_dir(), ignore_errors=True)
            self._forget_stopped()
            return
        prefix = bitmap_prefix(self.job)

        def ours() -> list[tuple[str, str]]:
            return sorted(
                {
                    (node, b["name"])
                    for node, info in self._named_nodes(c).items()
                    for b in info.get("dirty-bitmaps", []) or []
                    if b.get("name", "").startswith((prefix, marker_prefix(self.job)))
                }
            )

        with c:
            self._cleanup_stale(c)
            for node, name in ours():
                if self._try(c, "block-dirty-bitmap-remove", node=node, name=name):
                    log.info("forget job %s: removed checkpoint %s from node %s", self.job, name, node)
            left = ours()
            if left:
                raise ResourceUnavailable(
                    f"QMP socket {self.qmp}: could not remove the checkpoints of job {self.job}: "
                    + ", ".join(f"{n} on node {node}" for node, n in left)
                )
        shutil.rmtree(self._fleece_dir(), ignore_errors=True)
        record(self.work_dir, self.qmp, [])  # forgotten: a repeat finds nothing to do

    def _forget_stopped(self) -> None:
        prefix = bitmap_prefix(self.job)
        disks = recorded(self.work_dir)
        if disks is None:
            raise SendenseError(
                f"QMP socket {self.qmp}: the VM is not running and job {self.job} has no record of its "
                f"images: the dirty bitmaps {prefix}* stay in them (qemu-img bitmap --remove IMG NAME)"
            )
        for d in disks:
            img = Path(d.image)
            if not d.persistent:
                continue  # a raw disk's bitmaps lived in QEMU only
            if not img.is_file():
                log.info("forget job %s: image %s is gone, nothing to remove", self.job, img)
                continue
            remove_bitmaps(
                img,
                [
                    n
                    for n in read_qcow2_header(img).bitmaps
                    if n.startswith((prefix, marker_prefix(self.job)))
                ],
                f"QMP socket {self.qmp}: the VM is not running but image {img} is in use by another "
                f"process: the dirty bitmaps {prefix}* of job {self.job} stay in it",
            )
        record(self.work_dir, self.qmp, [])  # forgotten: a repeat finds nothing to do

    def _release(self, c: QmpClient, snap: SnapshotRef, committed: bool) -> None:
        hs = [handles.QmpDisk.parse(d.handle) for d in snap.disks]
        self._del_exports(c, {h.export_id for h in hs if h.export_id})
        self._end_jobs(c, {h.job_id for h in hs if h.job_id})
        self._del_nodes(c, {h.fleece_node for h in hs if h.fleece_node})
        for h in hs:
            if h.fleece_file:
                Path(h.fleece_file).unlink(missing_ok=True)
        prefix = bitmap_prefix(self.job)
        named = self._named_nodes(c)
        for d, h in zip(snap.disks, hs, strict=True):
            node = h.node or d.key
            bitmaps = self._bitmaps(c, node, named)
            tmp = h.temp_bitmap
            if tmp and tmp in bitmaps:
                self._try(c, "block-dirty-bitmap-remove", node=node, name=tmp)
            if committed:
                for n, b in bitmaps.items():
                    if (
                        n.startswith(prefix)
                        and n != d.change_id
                        and (not b.get("recording") or b.get("inconsistent"))
                    ):
                        self._try(c, "block-dirty-bitmap-remove", node=node, name=n)
                keep = set(shrink_markers(d.change_id, self.job))
                for n in bitmaps:
                    if n.startswith(marker_prefix(self.job)) and n not in keep:
                        self._try(c, "block-dirty-bitmap-remove", node=node, name=n)
            else:
                prevs = h.prev_bitmaps
                self._rollback_checkpoint(c, node, d.change_id, prevs, bitmaps)
                left = self._bitmaps(c, node)
                if d.change_id not in left:  # (kept: a later attempt's under the same name, say)
                    for n in shrink_markers(d.change_id, self.job):
                        if n in left:
                            self._try(c, "block-dirty-bitmap-remove", node=node, name=n)
        self._stop_nbd_if_idle(c)
