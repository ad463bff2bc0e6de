"""The six EBS direct APIs (rest-json, paths and shapes of botocore's `ebs` 2019-11-02 model).

Request validation follows the model's constraints and AWS's observed order: model constraints first
(`constraint`, answered in AWS's "1 validation error detected" wording), then the checksum of a
PutSnapshotBlock body (403 InvalidSignatureException, as AWS answers a checksum mismatch), then the
service's own checks (snapshot existence and state, block range, data length). See the package
docstring for the semantics.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl

from labs.aws.blockstore import BLOCK_SIZE
from labs.aws.constraints import at_least, at_most, integer, integer_value, pattern, required
from labs.aws.ebs_lists import list_changed_blocks, list_snapshot_blocks
from labs.aws.state import BLOCKS_PER_GIB, BlockRef, LabState, Snapshot
from labs.aws.tokens import block_scope
from labs.aws.wire import EbsError, Response, constraint, invalid, json_response, not_found

log = logging.getLogger(__name__)

_ROUTES = [
    ("POST", re.compile(r"^/snapshots/?$"), "StartSnapshot"),
    ("POST", re.compile(r"^/snapshots/completion/(?P<sid>[^/]+)/?$"), "CompleteSnapshot"),
    ("PUT", re.compile(r"^/snapshots/(?P<sid>[^/]+)/blocks/(?P<index>[^/]+)/?$"), "PutSnapshotBlock"),
    ("GET", re.compile(r"^/snapshots/(?P<sid>[^/]+)/blocks/(?P<index>[^/]+)/?$"), "GetSnapshotBlock"),
    ("GET", re.compile(r"^/snapshots/(?P<sid>[^/]+)/blocks/?$"), "ListSnapshotBlocks"),
    ("GET", re.compile(r"^/snapshots/(?P<sid>[^/]+)/changedblocks/?$"), "ListChangedBlocks"),
]
_SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]+$")
_CHECKSUM = re.compile(r"^[A-Za-z0-9+/=]+$")
_BLOCK_TOKEN = re.compile(r"^[A-Za-z0-9+/=_-]+$")
_MAX_GIB = 65536


class DirectSnapshots(Protocol):
    """What the EBS APIs need from EC2: direct snapshots also exist as EC2 snapshots."""

    owner_id: str

    def create_direct_snapshot(
        self,
        size_gib: int,
        description: str | None,
        tags: list[dict[str, str]],
        parent: Snapshot | None,
        timeout: int,
    ) -> Snapshot: ...


def route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    for verb, regex, operation in _ROUTES:
        m = regex.match(path)
        if m and verb == method:
            return operation, m.groupdict()
    return None


class EbsApi:
    def __init__(self, state: LabState, ec2: DirectSnapshots) -> None:
        self.state = state
        self.ec2 = ec2
        self._idempotency: dict[str, tuple[str, dict[str, Any]]] = {}
        self._start_lock = threading.Lock()

    def handle(
        self, operation: str, params: Mapping[str, str], query: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        q = dict(parse_qsl(query, keep_blank_values=True))
        try:
            if operation == "StartSnapshot":
                return self.start_snapshot(body)
            if operation == "PutSnapshotBlock":
                return self.put_snapshot_block(params["sid"], params["index"], headers, body)
            if operation == "CompleteSnapshot":
                return self.complete_snapshot(params["sid"], headers)
            if operation == "GetSnapshotBlock":
                return self.get_snapshot_block(params["sid"], params["index"], q)
            if operation == "ListSnapshotBlocks":
                return list_snapshot_blocks(self.state, self._readable(params["sid"], q), q)
            if operation == "ListChangedBlocks":
                if not q.get("firstSnapshotId"):
                    raise invalid("INVALID_SNAPSHOT_ID", "First snapshot should not be empty or null")
                first = self._readable(q["firstSnapshotId"], q)
                return list_changed_blocks(self.state, first, self._readable(params["sid"], {}), q)
            raise EbsError("UnknownOperationException", f"unknown operation {operation}")
        except EbsError as e:
            return e.response()

    # ------------------------------------------------------------------ helpers

    def _readable(self, snapshot_id: str, q: Mapping[str, str]) -> Snapshot:
        """A completed snapshot (EBS answers pending and failed snapshots as not found)."""
        max_results = integer(q.get("maxResults"), "maxResults")
        at_least(max_results, "maxResults", 100)
        at_most(max_results, "maxResults", 10000)
        at_least(integer(q.get("startingBlockIndex"), "startingBlockIndex"), "startingBlockIndex", 0)
        pattern(snapshot_id, "snapshotId", _SNAPSHOT_ID)
        snap = self.state.find_snapshot(snapshot_id)
        if snap is None or self.state.status(snap)[0] != "completed":
            raise not_found(snapshot_id)
        return snap

    # ------------------------------------------------------------------ StartSnapshot

    def start_snapshot(self, body: bytes) -> Response:
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            raise EbsError("SerializationException", "the request body is not JSON") from None
        size = integer_value(req.get("VolumeSize"), "volumeSize")
        required(size, "volumeSize")
        assert size is not None
        at_least(size, "volumeSize", 1)
        timeout = integer_value(req.get("Timeout"), "timeout")
        at_least(timeout, "timeout", 10)
        at_most(timeout, "timeout", 4320)
        description = req.get("Description")
        if description is not None and len(description) > 255:
            raise constraint(
                f"Value '{description}' at 'description' failed to satisfy constraint: "
                "Member must have length less than or equal to 255"
            )
        token = req.get("ClientToken")
        if token is not None and len(token) > 255:
            raise constraint(
                f"Value '{token}' at 'clientToken' failed to satisfy constraint: "
                "Member must have length less than or equal to 255"
            )
        pattern(token, "clientToken", re.compile(r"^[\S]+$"))
        parent_id = req.get("ParentSnapshotId")
        pattern(parent_id, "parentSnapshotId", _SNAPSHOT_ID)
        if req.get("Encrypted") or req.get("KmsKeyArn"):
            raise invalid("INVALID_PARAMETER_VALUE", "the AWS lab does not emulate encrypted snapshots")
        if parent_id is not None and "Encrypted" in req:
            raise invalid(
                "INVALID_PARAMETER_VALUE",
                "You can't specify ParentSnapshotId and Encrypted in the same request.",
            )
        if size > _MAX_GIB:
            raise invalid(
                "INVALID_VOLUME_SIZE", f"Volume size {size} GiB is more than the maximum of {_MAX_GIB} GiB"
            )
        tags = req.get("Tags") or []
        fingerprint = json.dumps({k: v for k, v in req.items() if k != "ClientToken"}, sort_keys=True)
        with self._start_lock:
            if token is not None and token in self._idempotency:
                stored, earlier = self._idempotency[token]
                if stored != fingerprint:
                    raise EbsError(
                        "ConflictException", "Current request does not match request stored with this token."
                    )
                return json_response(201, earlier)
            parent = None
            if parent_id is not None:
                parent = self.state.find_snapshot(parent_id)
                if parent is None:
                    raise not_found(parent_id)
                if self.state.status(parent)[0] != "completed":
                    raise invalid("INVALID_SNAPSHOT_ID", f"Source snapshot ({parent_id}) is not complete.")
                if parent.size_gib > size:
                    raise invalid(
                        "INVALID_VOLUME_SIZE",
                        f"Volume size {size} GiB is smaller than the parent snapshot's {parent.size_gib} GiB",
                    )
            snap = self.ec2.create_direct_snapshot(size, description, tags, parent, timeout or 60)
            answer: dict[str, Any] = {
                "BlockSize": BLOCK_SIZE,
                "OwnerId": self.ec2.owner_id,
                "SnapshotId": snap.snapshot_id,
                "StartTime": snap.created,
                "Status": "pending",
                "VolumeSize": size,
            }
            if description is not None:
                answer["Description"] = description
            if tags:
                answer["Tags"] = tags
            if parent_id is not None:
                answer["ParentSnapshotId"] = parent_id
            if token is not None:
                self._idempotency[token] = (fingerprint, answer)
        log.info("StartSnapshot %s: %d GiB, parent %s", snap.snapshot_id, size, parent_id)
        return json_response(201, answer)

    # ------------------------------------------------------------------ PutSnapshotBlock

    def put_snapshot_block(
        self, sid: str, index_text: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        index = integer(index_text, "blockIndex")
        at_least(index, "blockIndex", 0)
        assert index is not None
        length = integer(headers.get("x-amz-data-length"), "dataLength")
        required(length, "dataLength")
        checksum = headers.get("x-amz-checksum")
        required(checksum, "checksum")
        pattern(checksum, "checksum", _CHECKSUM)
        algorithm = headers.get("x-amz-checksum-algorithm")
        required(algorithm, "checksumAlgorithm")
        progress = integer(headers.get("x-amz-progress"), "progress")
        at_least(progress, "progress", 0)
        at_most(progress, "progress", 100)
        pattern(sid, "snapshotId", _SNAPSHOT_ID)
        digest = hashlib.sha256(body).digest()
        computed = base64.b64encode(digest).decode()
        if algorithm == "SHA256" and computed != checksum:
            raise EbsError(
                "InvalidSignatureException",
                "The value passed in as x-amz-Checksum does not match the computed checksum. "
                f"Computed checksum: {computed} expected checksum: {checksum}",
                layer="coral",
            )
        snap = self.state.find_snapshot(sid)
        if snap is None:
            raise not_found(sid)
        if algorithm != "SHA256":
            raise invalid(
                "INVALID_PARAMETER_VALUE",
                f"Unsupported Checksum Algorithm '{algorithm}', supported algorithms are SHA256",
            )
        self._check_writable(snap)
        if index >= snap.size_gib * BLOCKS_PER_GIB:
            raise invalid("INVALID_BLOCK", f"Block index {index} is beyond the volume size extent")
        if len(body) == BLOCK_SIZE and length != BLOCK_SIZE:
            raise invalid("INVALID_BLOCK", f"Block data length {length} is not valid, expected {BLOCK_SIZE}")
        if len(body) != BLOCK_SIZE or length != BLOCK_SIZE:
            raise invalid(
                "INVALID_PARAMETER_VALUE",
                f"Failed to read block data (the AWS lab received {len(body)} bytes, "
                f"x-amz-Data-Length {length}; a block is exactly {BLOCK_SIZE} bytes)",
            )
        self.state.pin_and_store(digest, body)
        try:
            with self.state.lock:
                self._check_writable(snap)  # CompleteSnapshot may have sealed it meanwhile
                snap.blocks[index] = BlockRef(digest, self.state.next_version())
                snap.written.add(index)
                snap.last_activity = self.state.now()
        finally:
            self.state.unpin(digest)
        return json_response(201, {}, [("x-amz-Checksum", computed), ("x-amz-Checksum-Algorithm", "SHA256")])

    def _check_writable(self, snap: Snapshot) -> None:
        state, _ = self.state.status(snap)
        if not snap.direct:
            raise invalid(
                "INVALID_SNAPSHOT_ID",
                f"Snapshot {snap.snapshot_id} was not started by StartSnapshot and is read-only",
            )
        if state == "error":
            raise invalid("INVALID_SNAPSHOT_ID", f"Snapshot {snap.snapshot_id} is in the error state")
        if snap.sealed_at is not None or state == "completed":
            raise invalid("INVALID_SNAPSHOT_ID", "Snapshot is already completed")

    # ------------------------------------------------------------------ CompleteSnapshot

    def complete_snapshot(self, sid: str, headers: Mapping[str, str]) -> Response:
        count = integer(headers.get("x-amz-changedblockscount"), "changedBlocksCount")
        required(count, "changedBlocksCount")
        at_least(count, "changedBlocksCount", 0)
        assert count is not None
        checksum = headers.get("x-amz-checksum")
        algorithm = headers.get("x-amz-checksum-algorithm")
        method = headers.get("x-amz-checksum-aggregation-method")
        pattern(checksum, "checksum", _CHECKSUM)
        if algorithm is not None and algorithm != "SHA256":
            raise constraint(
                f"Value '{algorithm}' at 'checksumAlgorithm' failed to satisfy constraint: "
                "Member must satisfy enum value set: [SHA256]"
            )
        if method is not None and method != "LINEAR":
            raise constraint(
                f"Value '{method}' at 'checksumAggregationMethod' failed to satisfy constraint: Member must "
                "satisfy enum value set: [LINEAR]"
            )
        if checksum is not None and algorithm is None:
            raise invalid(
                "INVALID_PARAMETER_VALUE", "Invalid parameter combination. Checksum algorithm is missing."
            )
        if checksum is None and (algorithm is not None or method is not None):
            raise invalid(
                "INVALID_PARAMETER_VALUE", "Invalid parameter combination. Snapshot checksum is missing."
            )
        if checksum is not None and method is None:
            raise invalid(
                "INVALID_PARAMETER_VALUE",
                "Invalid parameter combination. Checksum aggregation method is missing.",
            )
        pattern(sid, "snapshotId", _SNAPSHOT_ID)
        snap = self.state.find_snapshot(sid)
        if snap is None:
            raise not_found(sid)
        if not snap.direct:
            raise invalid("INVALID_SNAPSHOT_ID", f"Snapshot {sid} was not started by StartSnapshot")
        with self.state.lock:
            state, _ = self.state.status(snap)
            if snap.sealed_at is not None or state != "pending":
                return json_response(202, {"Status": state})
            snap.sealed_at = self.state.now()
            written = sorted(snap.written)
            aggregate = hashlib.sha256(b"".join(snap.blocks[i].digest for i in written)).digest()
            if count != len(written):
                snap.outcome = "stuck"
                snap.outcome_message = (
                    f"ChangedBlocksCount {count} does not match the {len(written)} blocks written: "
                    "the snapshot stayed pending until its timeout"
                )
            elif checksum is not None and base64.b64encode(aggregate).decode() != checksum:
                snap.outcome, snap.outcome_message = "error", "Checksum mismatch for snapshot"
            else:
                snap.outcome = "completed"
        log.info(
            "CompleteSnapshot %s: %d blocks written, count %d -> %s", sid, len(written), count, snap.outcome
        )
        return json_response(202, {"Status": "pending"})

    # ------------------------------------------------------------------ GetSnapshotBlock

    def get_snapshot_block(self, sid: str, index_text: str, q: Mapping[str, str]) -> Response:
        index = integer(index_text, "blockIndex")
        at_least(index, "blockIndex", 0)
        token = q.get("blockToken")
        required(token, "blockToken")
        assert token is not None and index is not None
        pattern(token, "blockToken", _BLOCK_TOKEN)
        snap = self._readable(sid, {})
        bad = invalid("INVALID_BLOCK_TOKEN", f"The block token {token} is invalid.")
        if self.state.signer.open(token, block_scope(sid), self.state.now()) != index:
            raise bad
        with self.state.lock:
            ref = snap.blocks.get(index)
        if ref is None:
            raise bad
        data = self.state.read_block(ref)
        hdrs = [
            ("Content-Type", "application/octet-stream"),
            ("x-amz-Data-Length", str(len(data))),
            ("x-amz-Checksum", base64.b64encode(ref.digest).decode()),
            ("x-amz-Checksum-Algorithm", "SHA256"),
        ]
        return Response(200, data, hdrs)
