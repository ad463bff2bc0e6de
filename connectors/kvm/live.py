"""KVM source, running VM: QEMU's own pull-backup over its QMP socket (what libvirt's backupBegin does).

Change id = a dirty bitmap on each disk's format node, `sendense.<job>.<snapshot>.<tag>`, the tag
being the disk's identity (key and image path: `identity.disk_tag`), so a base is used only on the disk
and image it was made on (disks swapped behind node names are a resync, with the reason). Persistent
on qcow2; on a raw disk non-persistent (QEMU tracks it while the VM runs; after a restart that disk
is resynced, with the reason). Which nodes are disks, under which key: `live_disks`.
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

QEMU 7.2 notes: node names are at most 31 characters, so QEMU-side ids use short hashes of the job and
disk key; `query-block` shows the implicit copy-before-write filter as the device's node during a
backup; `block-export-del` and `block-job-cancel` finish asynchronously.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.kvm.identity import base_problem, bitmap_name, bitmap_prefix, disk_tag, tracking_problem
from connectors.kvm.live_disks import QemuDisk, list_disks, named_nodes, record, recorded, refusal
from connectors.kvm.offline import NbdSourceDisk
from connectors.kvm.qemu import qemu_img, read_qcow2_header, remove_bitmaps
from connectors.kvm.qmp import QmpClient, QmpError, VmNotRunning
from sendense.datapath.nbd import unix_uri
from sendense.errors import (
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    SnapshotInconsistent,
)
from sendense.models import DiskInfo, DiskSnapshot, SnapshotRef, VmInfo

log = logging.getLogger(__name__)

GRANULARITY = 64 << 10
WAIT_SECONDS = 60.0
NBD_DIR = "sendense-qemu-nbd"


def nbd_socket(qmp: Path) -> Path:
    """QEMU runs one NBD server per process: every job on a VM shares it, so its socket is named after
    the VM's QMP socket, in a directory shared by all jobs of the host (not a job's work dir)."""
    return Path(tempfile.gettempdir()) / NBD_DIR / f"{_h(str(qmp.absolute()))}.sock"


def _h(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _act(kind: str, **data: Any) -> dict[str, Any]:
    """One action of a QMP `transaction`."""
    return {"type": kind, "data": data}


def temp_prefix(job: str) -> str:
    """Temporary (exported) bitmaps: '/' cannot occur in a job name, so prefixes of jobs never collide."""
    return f"sendense-tmp/{job}/"


class QmpSource:
    platform = "kvm"

    def __init__(self, job: str, qmp: Path, work_dir: Path) -> None:
        self.job = job
        self.qmp = Path(qmp)
        self.work_dir = Path(work_dir)
        self._jh = _h(job)

    # ------------------------------------------------------------------ names

    def _ids(self, key: str, nonce: str) -> dict[str, str]:
        """QEMU-side names of one disk's snapshot. The nonce makes them differ between attempts at the
        same snapshot, so a late release of an abandoned attempt cannot tear down the current one."""
        tail = f"{self._jh}-{_h(key)}-{nonce}"  # node names: at most 31 characters
        return {  # every name from hex digits: safe in an NBD URI whatever the disk's key or node
            "export": f"sde-{tail}",
            "export_id": f"sde-{tail}",
            "job_id": f"sdb-{tail}",
            "fleece_node": f"sdf-{tail}",
            "fleece_file": str(self._fleece_dir() / f"{_h(key)}.{nonce}.qcow2"),
        }

    def _fleece_dir(self) -> Path:
        return self.work_dir / "fleece" / self.job

    def _nbd_socket(self) -> Path:
        return nbd_socket(self.qmp)

    def _client(self) -> QmpClient:
        # another job's snapshot may hold the monitor (one client at a time): wait for it
        return QmpClient(self.qmp, timeout=WAIT_SECONDS).connect()

    # ------------------------------------------------------------------ QEMU state

    def _named_nodes(self, c: QmpClient) -> dict[str, dict[str, Any]]:
        return named_nodes(c)

    def _disks(self, c: QmpClient) -> list[QemuDisk]:
        """The VM's disks; one that cannot be replicated is refused (InvalidSpec), never skipped."""
        disks = list_disks(c)
        why = refusal(disks, self.qmp)
        if why:
            raise InvalidSpec(why)
        record(self.work_dir, self.qmp, disks)
        return disks

    def _bitmaps(
        self, c: QmpClient, node: str, named: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        named = named if named is not None else self._named_nodes(c)
        return {b["name"]: b for b in named.get(node, {}).get("dirty-bitmaps", []) or [] if b.get("name")}

    @staticmethod
    def _flags(bitmaps: dict[str, Any]) -> dict[str, list[str]]:
        return {n: (["inconsistent"] if b.get("inconsistent") else []) for n, b in bitmaps.items()}

    def _wait(self, what: str, gone: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not gone():
            if time.monotonic() > deadline:
                raise ResourceUnavailable(
                    f"QMP socket {self.qmp}: {what} did not finish in {WAIT_SECONDS:.0f}s"
                )
            time.sleep(0.02)

    @staticmethod
    def _try(c: QmpClient, cmd: str, **args: Any) -> bool:
        """A cleanup command whose target may already be gone: False instead of an error then."""
        try:
            c.execute(cmd, **args)
            return True
        except QmpError as e:
            log.debug("%s: %s", cmd, e.desc)
            return False

    # ------------------------------------------------------------------ teardown helpers

    def _del_exports(self, c: QmpClient, ids: set[str]) -> None:
        present = {e["id"] for e in c.execute("query-block-exports")} & ids
        for i in present:
            self._try(c, "block-export-del", id=i, mode="hard")
        if present:
            self._wait(
                f"removing NBD exports {', '.join(sorted(present))}",
                lambda: not ({e["id"] for e in c.execute("query-block-exports")} & present),
            )

    def _end_jobs(self, c: QmpClient, ids: set[str]) -> None:
        def ours() -> dict[str, str]:
            return {j["id"]: j["status"] for j in c.execute("query-jobs") if j["id"] in ids}

        for i, status in ours().items():
            if status == "concluded":
                self._try(c, "job-dismiss", id=i)
            elif status != "null":
                self._try(c, "block-job-cancel", device=i, force=True)
        if ours():

            def done() -> bool:
                left = ours()
                for i, status in left.items():
                    if status == "concluded":
                        self._try(c, "job-dismiss", id=i)
                return not left

            self._wait(f"cancelling backup jobs {', '.join(sorted(ours()))}", done)

    def _del_nodes(self, c: QmpClient, names: set[str]) -> None:
        for n in sorted(names & set(self._named_nodes(c))):
            self._try(c, "blockdev-del", **{"node-name": n})
        left = names & set(self._named_nodes(c))
        if left:  # still in use: deleting its file now would leave QEMU writing to an unlinked image
            raise ResourceUnavailable(
                f"QMP socket {self.qmp}: cannot remove fleece nodes {', '.join(sorted(left))}"
            )

    def _cleanup_stale(self, c: QmpClient) -> None:
        """What an earlier, crashed sync of this job left in QEMU and in work_dir."""
        mine = (f"sde-{self._jh}-", f"sdb-{self._jh}-", f"sdf-{self._jh}-")
        exports = {e["id"] for e in c.execute("query-block-exports") if e["id"].startswith(mine[0])}
        jobs = {j["id"] for j in c.execute("query-jobs") if j["id"].startswith(mine[1])}
        self._del_exports(c, exports)
        self._end_jobs(c, jobs)
        named = self._named_nodes(c)
        self._del_nodes(c, {n for n in named if n.startswith(mine[2])})
        if exports or jobs:
            log.info("removed stale exports %s and backup jobs %s of job %s", exports, jobs, self.job)
        if self._fleece_dir().is_dir():
            for f in self._fleece_dir().glob("*.qcow2"):
                f.unlink(missing_ok=True)
        tp = temp_prefix(self.job)
        for node, info in self._named_nodes(c).items():
            for b in info.get("dirty-bitmaps", []) or []:
                if b.get("name", "").startswith(tp):
                    self._try(c, "block-dirty-bitmap-remove", node=node, name=b["name"])
        self._stop_nbd_if_idle(c)

    def _stop_nbd_if_idle(self, c: QmpClient) -> None:
        sock = self._nbd_socket()
        if not sock.exists():
            return
        if not any(e["id"].startswith("sde-") for e in c.execute("query-block-exports")):
            self._try(c, "nbd-server-stop")

    def _start_nbd(self, c: QmpClient) -> Path:
        """Start QEMU's NBD server, or share the one another job of this host started on this VM."""
        sock = self._nbd_socket()
        sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            c.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        except QmpError as e:
            if "already running" not in e.desc:
                raise
            if not sock.exists():
                raise ResourceUnavailable(
                    f"QMP socket {self.qmp}: QEMU already runs an NBD server that sendense did not start; "
                    "the snapshot waits until its owner stops it"
                ) from None
        return sock

    def _rollback_checkpoint(
        self, c: QmpClient, node: str, new: str, prevs: list[str] | None, bitmaps: dict[str, Any]
    ) -> None:
        """Undo checkpoint `new`: merge it into `prevs` (None: every other checkpoint of the job), make
        them record again, remove it. The old bases then still cover every write."""
        if new not in bitmaps:
            return
        if bitmaps[new].get("inconsistent"):
            self._try(c, "block-dirty-bitmap-remove", node=node, name=new)
            return
        prefix = bitmap_prefix(self.job)
        if prevs is None:
            prevs = [n for n in bitmaps if n.startswith(prefix) and n != new]
        usable = [p for p in prevs if p in bitmaps and not bitmaps[p].get("inconsistent")]
        if prevs and not usable:
            log.warning("checkpoint %s on node %s kept: the checkpoints before it are gone", new, node)
            return
        actions: list[dict[str, Any]] = []
        for p in usable:
            actions.append(_act("block-dirty-bitmap-merge", node=node, target=p, bitmaps=[new]))
            actions.append(_act("block-dirty-bitmap-enable", node=node, name=p))
        actions.append(_act("block-dirty-bitmap-remove", node=node, name=new))
        c.execute("transaction", actions=actions)

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
        return VmInfo(
            name=name, platform="kvm", disks=[DiskInfo(key=d.key, size=d.size, ref=d.image) for d in disks]
        )

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
        if lost:
            log.warning("disk %s of %s: change tracking lost: %s", d.key, self.qmp, lost)
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
            try:
                for p in plans:
                    opts = f"cluster_size={GRANULARITY}"
                    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p["fleece_file"], str(p["size"]))
                    fleece = {"driver": "file", "filename": p["fleece_file"]}
                    node_args = {"driver": "qcow2", "node-name": p["fleece_node"], "backing": p["node"]}
                    c.execute("blockdev-add", **node_args, file=fleece)
                    added.append(p["fleece_node"])
                actions: list[dict[str, Any]] = []
                for p in plans:
                    node = p["node"]
                    if p["sources"]:
                        actions += [
                            _act(
                                "block-dirty-bitmap-add",
                                node=node,
                                name=tmp,
                                persistent=False,
                                disabled=True,
                                granularity=GRANULARITY,
                            ),
                            _act("block-dirty-bitmap-merge", node=node, target=tmp, bitmaps=p["sources"]),
                        ]
                    actions.append(
                        _act(
                            "block-dirty-bitmap-add",
                            node=node,
                            name=p["new"],
                            persistent=p["persistent"],  # raw: tracked while the VM runs
                            granularity=GRANULARITY,
                        )
                    )
                    actions += [
                        _act("block-dirty-bitmap-disable", node=node, name=prev) for prev in p["prevs"]
                    ]
                    backup = {
                        "device": node,
                        "target": p["fleece_node"],
                        "sync": "none",
                        "job-id": p["job_id"],
                    }
                    actions.append(_act("blockdev-backup", **backup))
                c.execute("transaction", actions=actions)
            except BaseException:
                self._del_nodes(c, set(added))
                for p in plans:
                    Path(p["fleece_file"]).unlink(missing_ok=True)
                raise
            created_at = datetime.now(UTC)

            snap_disks = [
                DiskSnapshot(
                    key=p["key"],
                    size=p["size"],
                    change_id=p["new"],
                    base_change_id=p["since"],
                    tracking_lost=p["lost"],
                    handle={
                        "qmp": str(self.qmp),
                        "node": p["node"],
                        "socket": str(self._nbd_socket()),
                        "export": p["export"],
                        "export_id": p["export_id"],
                        "job_id": p["job_id"],
                        "fleece_node": p["fleece_node"],
                        "fleece_file": p["fleece_file"],
                        "temp_bitmap": tmp if p["sources"] else "",
                        "prev_bitmaps": json.dumps(p["prevs"]),
                    },
                )
                for p in plans
            ]
            snap = SnapshotRef(
                snapshot_id=snapshot_id,
                created_at=created_at,
                disks=snap_disks,
                handle={"qmp": str(self.qmp), "socket": str(self._nbd_socket()), "job": self.job},
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
        h = d.handle
        with self._client() as c:
            exports = {e["id"]: e for e in c.execute("query-block-exports")}
        e = exports.get(h.get("export_id", ""))
        if e is None or e.get("shutting-down") or e.get("node-name") != h.get("fleece_node"):
            raise SnapshotInconsistent(  # it can never pass: a new snapshot is needed
                f"snapshot {snap.snapshot_id} of disk {key} is gone from the VM behind {self.qmp} "
                "(VM restarted or snapshot released)"
            )
        uri = unix_uri(h["socket"], h["export"])
        bitmap_for = {d.base_change_id: h["temp_bitmap"]} if d.base_change_id and h.get("temp_bitmap") else {}
        with NbdSourceDisk(uri, d.size, bitmap_for=bitmap_for) as disk:
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
                if d.handle.get("fleece_file"):
                    Path(d.handle["fleece_file"]).unlink(missing_ok=True)
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
                    if b.get("name", "").startswith(prefix)
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
                [n for n in read_qcow2_header(img).bitmaps if n.startswith(prefix)],
                f"QMP socket {self.qmp}: the VM is not running but image {img} is in use by another "
                f"process: the dirty bitmaps {prefix}* of job {self.job} stay in it",
            )
        record(self.work_dir, self.qmp, [])  # forgotten: a repeat finds nothing to do

    def _release(self, c: QmpClient, snap: SnapshotRef, committed: bool) -> None:
        hs = [d.handle for d in snap.disks]
        self._del_exports(c, {h["export_id"] for h in hs if h.get("export_id")})
        self._end_jobs(c, {h["job_id"] for h in hs if h.get("job_id")})
        self._del_nodes(c, {h["fleece_node"] for h in hs if h.get("fleece_node")})
        for h in hs:
            if h.get("fleece_file"):
                Path(h["fleece_file"]).unlink(missing_ok=True)
        prefix = bitmap_prefix(self.job)
        named = self._named_nodes(c)
        for d in snap.disks:
            node = d.handle.get("node", d.key)
            bitmaps = self._bitmaps(c, node, named)
            tmp = d.handle.get("temp_bitmap")
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
            else:
                prevs = json.loads(d.handle.get("prev_bitmaps", "[]"))
                self._rollback_checkpoint(c, node, d.change_id, prevs, bitmaps)
        self._stop_nbd_if_idle(c)
