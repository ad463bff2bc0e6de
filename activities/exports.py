"""Source disks served to another agent: this agent's data server and the exports it serves.

A sync whose source and target are served by different agents exports its snapshot on the source's
agent (`export_snapshot`): a record in the job's work directory (the spec, the snapshot, the agent
that may read it, the hash of a fresh token) that the data server (sendense.datapath.remote) checks
for each connection. The record is a file, so an agent killed and started again serves the same
export; releasing the snapshot removes it and ends the connections reading it (`unexport`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal

from temporalio import activity

from activities.errors import mapped
from activities.guard import authorized
from sendense import config, policy
from sendense.datapath.remote import AgentTls, DiskServer, Hello, Opener, Peer, RemoteSourceDisk
from sendense.errors import NotAllowed, ResourceNotFound
from sendense.models import ExportRequest, JobSpec, RemoteExport, SnapshotRef, Wire
from sendense.platforms import source_for, vm_changes_for
from sendense.private import work_dir, write_atomic
from sendense.protocols import SourceDisk

log = logging.getLogger(__name__)

_JOB = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_SYNC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")

_server: DiskServer | None = None
_advertised: str | None = None


class ExportRecord(Wire):
    spec: JobSpec
    sync_id: str
    snapshot: SnapshotRef
    peer_host: str
    token_sha256: str
    kind: Literal["sync", "reverse"] = "sync"


def agent_tls() -> AgentTls:
    f = config.agent_tls_files()
    return AgentTls(f.cert, f.key, f.ca)


def start_server() -> DiskServer | None:
    """Start this agent's data server if SENDENSE_DATA_LISTEN says where (the worker calls it)."""
    global _server, _advertised
    listen = config.data_listen()
    if listen is None:
        return None
    try:
        server = DiskServer(listen, agent_tls(), authorize).start()
    except OSError as e:
        raise NotAllowed(f"SENDENSE_DATA_LISTEN {listen[0]}:{listen[1]}: {e.strerror}") from None
    _server, _advertised = server, config.data_advertise(server.address)
    return server


def advertised() -> str | None:
    """host:port other agents reach this one's data server at, if it runs."""
    return _advertised


def stop_server() -> None:
    global _server, _advertised
    if _server is not None:
        _server.close()
    _server, _advertised = None, None


def _record_path(job: str, sync_id: str) -> Path:
    return config.home() / "work" / job / "exports" / f"{sync_id}.json"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@activity.defn(name="export_snapshot")
@mapped
@authorized
def export_snapshot(req: ExportRequest) -> RemoteExport:
    """Serve the sync's snapshot to the agent `req.peer_host` (the target's). Idempotent: a retry makes
    a new token, and the old one stops working."""
    if _server is None or _advertised is None:
        raise NotAllowed(
            f"job {req.spec.name}: agent host-{config.host_id()} serves no data to other agents; "
            f"start its worker with --data-listen HOST:PORT (SENDENSE_DATA_LISTEN) and agent certificates"
        )
    token = secrets.token_urlsafe(24)
    path = work_dir(req.spec.name) / "exports" / f"{req.sync_id}.json"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    record = ExportRecord(
        spec=req.spec,
        sync_id=req.sync_id,
        snapshot=req.snapshot,
        peer_host=req.peer_host,
        token_sha256=_digest(token),
        kind=req.kind,
    )
    write_atomic(path, record.model_dump_json())
    return RemoteExport(
        address=_advertised, host_id=config.host_id(), export=f"{req.spec.name}/{req.sync_id}", token=token
    )


def unexport(spec: JobSpec, sync_id: str) -> None:
    """The snapshot is being released: its export ends, with the connections reading it."""
    _record_path(spec.name, sync_id).unlink(missing_ok=True)
    if _server is not None:
        _server.drop(f"{spec.name}/{sync_id}/")


def authorize(hello: Hello, peer: str) -> tuple[str, Opener]:
    """The data server's check of one connection (sendense.datapath.remote.Authorize)."""
    job, _, sync_id = hello.export.partition("/")
    if not _JOB.match(job) or not _SYNC.match(sync_id):
        raise ResourceNotFound(f"export {hello.export[:80]!r}: not an export name")
    try:
        record = ExportRecord.model_validate_json(_record_path(job, sync_id).read_text())
    except (OSError, ValueError):
        raise ResourceNotFound(
            f"export {hello.export}: not served by agent host-{config.host_id()} "
            "(released, or never exported)"
        ) from None
    if not hmac.compare_digest(_digest(hello.token), record.token_sha256):
        raise NotAllowed(f"export {hello.export}: the token is not this export's (a stale or forged one)")
    if peer != record.peer_host:
        raise NotAllowed(
            f"agent host-{peer} is not the target of export {hello.export} (host-{record.peer_host} is)"
        )
    if record.snapshot.disks and hello.disk not in {d.key for d in record.snapshot.disks}:
        raise ResourceNotFound(f"export {hello.export}: no disk {hello.disk!r}")
    policy.authorize(record.spec)  # the policy may have changed since the export

    def opener() -> AbstractContextManager[SourceDisk]:
        if record.kind == "reverse":  # failback: the failed-over VM's snapshot, read by the source's agent
            return vm_changes_for(record.spec).open_disk(record.snapshot, hello.disk)
        return source_for(record.spec, work_dir(job)).open_disk(record.snapshot, hello.disk)

    return f"{job}/{sync_id}/{hello.disk}", opener


# DSCP per job priority on the link (RFC 4594 classes): a WAN that honours them can queue by them too
DSCP = {"critical": 34, "normal": 18, "low": 8}  # AF41, AF21, CS1


def remote_source(export: RemoteExport, key: str, spec: JobSpec) -> RemoteSourceDisk:
    """The source disk `key` of an export, read across the link by this (the target's) agent."""
    peer = Peer(address=export.address, host_id=export.host_id, export=export.export, token=export.token)
    t = spec.tuning
    return RemoteSourceDisk(
        peer,
        key,
        agent_tls(),
        compress=t.compression != "off",
        in_flight=t.in_flight,
        dscp=DSCP.get(spec.priority, 0),
    )
