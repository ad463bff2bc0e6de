"""The QMP source's dealings with QEMU apart from the protocol: the names of one job's objects in QEMU,
QEMU's state (nodes, bitmaps), the NBD server every job on the VM shares, and teardown of exports,
backup jobs and fleece nodes, whether the current sync's or a crashed one's (see `live` for the flow).

QEMU 7.2 notes: node names are at most 31 characters, so QEMU-side ids use short hashes of the job and
disk key; `block-export-del` and `block-job-cancel` finish asynchronously, hence the waits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from connectors.kvm.identity import bitmap_prefix, shrink_markers
from connectors.kvm.image_bitmaps import SPAN_GRANULARITY, marker_scratch
from connectors.kvm.live_disks import QemuDisk, list_disks, named_nodes, record, refusal
from sendense.errors import InvalidSpec, ResourceUnavailable
from sendense.private import private_dir
from tools.qmp import QmpClient, QmpError

log = logging.getLogger(__name__)

WAIT_SECONDS = 60.0
NBD_DIR = "sendense-qemu-nbd"


def nbd_socket(qmp: Path) -> Path:
    """QEMU runs one NBD server per process: every job on a VM shares it, so its socket is named after
    the VM's QMP socket, in a directory shared by all jobs of the host (not a job's work dir)."""
    return Path(tempfile.gettempdir()) / NBD_DIR / f"{_h(str(qmp.absolute()))}.sock"


def _h(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def action(kind: str, **data: Any) -> dict[str, Any]:
    """One action of a QMP `transaction`."""
    return {"type": kind, "data": data}


def temp_prefix(job: str) -> str:
    """Temporary (exported) bitmaps: '/' cannot occur in a job name, so prefixes of jobs never collide."""
    return f"sendense-tmp/{job}/"


class QmpJob:
    """One job's view of one QEMU: its names, QEMU's state, teardown. `QmpSource` adds the protocol."""

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
        self._del_nodes(
            c, {n for n in named if n.startswith((mine[2], f"sdm-{self._jh}-"))}
        )  # + marker scratch
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
        private_dir(sock.parent, "NBD socket directory")  # (in /tmp: anyone could have made it first)
        try:
            c.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
            with suppress(OSError):
                os.chmod(sock, 0o600)  # QEMU makes it under its own umask
        except QmpError as e:
            if "already running" not in e.desc:
                raise
            legacy = self.work_dir / "nbd" / sock.name  # where sendense started it before it was shared
            idle = not any(e["id"].startswith("sde-") for e in c.execute("query-block-exports"))
            if not sock.exists() and legacy.exists() and idle:
                c.execute("nbd-server-stop")
                legacy.unlink(missing_ok=True)
                c.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
            elif not sock.exists():
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
            actions.append(action("block-dirty-bitmap-merge", node=node, target=p, bitmaps=[new]))
            actions.append(action("block-dirty-bitmap-enable", node=node, name=p))
        actions.append(action("block-dirty-bitmap-remove", node=node, name=new))
        c.execute("transaction", actions=actions)

    # ------------------------------------------------------------------ shrink markers

    def _shrunk(self, since: str, bitmaps: dict[str, Any], node: str) -> tuple[str | None, int | None]:
        """As `OfflineQcow2Source._shrunk`, from QEMU's dirty counts: a clean tail marker means the disk
        was shrunk since base `since` (block_resize truncates bitmaps and extends them clean), and the
        span marker's count (a dirty prefix) is how far, within one granule."""
        span, tail = shrink_markers(since, self.job)
        for m in (span, tail):
            if m not in bitmaps or bitmaps[m].get("inconsistent"):
                return f"the shrink marker {m} of checkpoint {since} is missing from node {node}", None
        if int(bitmaps[tail].get("count", 0)):
            return None, None
        return None, max(0, int(bitmaps[span].get("count", 0)) - SPAN_GRANULARITY)

    def _add_markers(
        self, c: QmpClient, plans: list[dict[str, Any]], nonce: str, nodes: dict[int, str]
    ) -> list[dict[str, Any]]:
        """Scratch nodes holding the marker bitmaps to merge from (one per disk size; the caller deletes
        them), and the transaction actions that add each disk's markers."""
        actions: list[dict[str, Any]] = []
        for p in plans:
            if p["size"] not in nodes:
                nodes[p["size"]] = f"sdm-{self._jh}-{nonce}-{len(nodes)}"
                scratch = {"driver": "file", "filename": str(marker_scratch(p["size"])), "read-only": True}
                args = {"driver": "qcow2", "node-name": nodes[p["size"]], "read-only": True, "file": scratch}
                c.execute("blockdev-add", **args)
            for name, src, gran in zip(p["markers"], ("span", "tail"), (SPAN_GRANULARITY, 512), strict=True):
                add = {"node": p["node"], "name": name, "granularity": gran, "disabled": True}
                actions.append(action("block-dirty-bitmap-add", **add, persistent=p["persistent"]))
                merge = {
                    "node": p["node"],
                    "target": name,
                    "bitmaps": [{"node": nodes[p["size"]], "name": src}],
                }
                actions.append(action("block-dirty-bitmap-merge", **merge))
        return actions
