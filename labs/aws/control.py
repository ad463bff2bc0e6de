"""The lab's control endpoints under /_lab (no AWS authentication; the server binds loopback only).

    GET    /_lab/health                                 {"ok": true, "pid": ...}
    GET    /_lab/volumes/{volume_id}                    {"volume_id", "size_gib", "written_blocks": [...]}
    POST   /_lab/volumes/{volume_id}/write?offset=N     body: the bytes the guest writes (any offset/length)
    GET    /_lab/volumes/{volume_id}/read?offset=N&length=M   the bytes
    POST   /_lab/instances  {"name", "disks_gib": [8, 2], "image"?: PATH}
                            -> {"instance_id", "volumes": [{"device", ...}]}; with an image (a disk image
                            file on this machine, any format qemu-img reads), the root volume holds it
    GET    /_lab/instances/{instance_id}   its VM: {"running", "pid", "disks": [volume ids], "console"}
    POST   /_lab/snapshots/{snapshot_id}/fail  {"message"?}: a pending snapshot of a volume fails (error)
    POST   /_lab/faults     {"operation", "error", "count", "status"?, "after"?, "lost"?};  GET lists;
                            DELETE clears (lost: the call runs, its answer is replaced by the error)
    GET    /_lab/stats      {"PutSnapshotBlock": 12, ...};  DELETE resets
    POST   /_lab/clock      {"advance_seconds": N}: the lab clock moves (snapshot delays, timeouts, expiry)
    POST   /_lab/settings   {"capture_pause_seconds": S}: each volume capture of CreateSnapshot(s) takes S;
                            {"snapshot_delay_seconds": D}: snapshots complete D seconds after they start;
                            {"instance_state_delay_seconds": T}: instances stay stopping/pending T seconds

Errors answer {"error": message} with 400 (bad request) or 404 (unknown volume or path).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from labs.aws.ec2_bridge import Ec2Bridge
from labs.aws.ec2_instances import InstanceHooks
from labs.aws.faults import Faults
from labs.aws.images import import_image
from labs.aws.state import LabState, LabStateError
from labs.aws.wire import Response, content_length, json_response

_VOLUME = re.compile(r"^/_lab/volumes/(?P<vid>[^/]+)(?P<op>/write|/read)?/?$")
_FAIL = re.compile(r"^/_lab/snapshots/(?P<sid>[^/]+)/fail/?$")
_INSTANCE = re.compile(r"^/_lab/instances/(?P<iid>i-[0-9a-f]+)/?$")


MAX_CONTROL_BODY = 1 << 20


def _error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


def _int_arg(query: dict[str, list[str]], name: str) -> int:
    try:
        return int(query[name][0])
    except (KeyError, IndexError, ValueError):
        raise LabStateError(400, f"query parameter {name} must be an integer") from None


class Control:
    def __init__(self, state: LabState, ec2: Ec2Bridge, faults: Faults, instances: InstanceHooks) -> None:
        self.state = state
        self.ec2 = ec2
        self.faults = faults
        self.instances = instances

    def handle(self, method: str, path: str, query_string: str, environ: dict[str, Any]) -> Response:
        query = parse_qs(query_string)
        read = environ["wsgi.input"].read
        length = content_length(environ)
        if length is None:
            return _error(400, "the request's Content-Length is not a byte count")
        try:
            m = _VOLUME.match(path)
            if m:  # a write streams its body into the volume, bounded by the volume's size
                return self._volume(method, m["vid"], m["op"] or "", query, read, length)
            if length > MAX_CONTROL_BODY:  # everything else takes a small JSON object
                return _error(413, f"a request body of {length} bytes is too large (max {MAX_CONTROL_BODY})")
            f = _FAIL.match(path)
            if f and method == "POST":
                message = str(_json(read, length).get("message") or "the AWS lab failed this snapshot")
                self.state.fail_snapshot(f["sid"], message)
                return json_response(200, {"snapshot_id": f["sid"], "state": "error"})
            if path == "/_lab/health":
                return json_response(200, {"ok": True, "pid": os.getpid()})
            if path == "/_lab/instances" and method == "POST":
                req = _json(read, length)
                image = import_image(self.ec2, Path(str(req["image"]))) if req.get("image") else None
                try:
                    made = self.ec2.make_instance(str(req["name"]), [int(s) for s in req["disks_gib"]], image)
                except (KeyError, TypeError, ValueError) as e:
                    raise LabStateError(
                        400, f"an instance needs a name and disks_gib (sizes in GiB): {e}"
                    ) from None
                return json_response(201, made)
            i = _INSTANCE.match(path)
            if i and method == "GET":
                return json_response(200, self.instances.machines.describe(i["iid"]))
            if path == "/_lab/faults":
                return self._faults(method, read, length)
            if path == "/_lab/stats":
                if method == "DELETE":
                    self.faults.reset_stats()
                return json_response(200, self.faults.stats())
            if path == "/_lab/settings" and method == "POST":
                req = _json(read, length)
                if "capture_pause_seconds" in req:
                    self.state.capture_pause = max(0.0, float(req["capture_pause_seconds"]))
                if "snapshot_delay_seconds" in req:
                    self.state.delay = max(0.0, float(req["snapshot_delay_seconds"]))
                if "instance_state_delay_seconds" in req:
                    self.instances.state_delay = max(0.0, float(req["instance_state_delay_seconds"]))
                return json_response(
                    200,
                    {
                        "capture_pause_seconds": self.state.capture_pause,
                        "snapshot_delay_seconds": self.state.delay,
                        "instance_state_delay_seconds": self.instances.state_delay,
                    },
                )
            if path == "/_lab/clock" and method == "POST":
                offset = self.state.advance_clock(float(_json(read, length).get("advance_seconds", 0)))
                return json_response(200, {"offset_seconds": offset, "now": self.state.now()})
            return _error(404, f"no lab endpoint {method} {path}")
        except LabStateError as e:
            return _error(e.status, str(e))

    def _volume(
        self,
        method: str,
        vid: str,
        op: str,
        query: dict[str, list[str]],
        read: Callable[[int], bytes],
        length: int,
    ) -> Response:
        if op == "/write" and method == "POST":
            self.state.write(vid, _int_arg(query, "offset"), length, read)
            return json_response(200, {"volume_id": vid, "written": length})
        if op == "/read" and method == "GET":
            offset, size = _int_arg(query, "offset"), _int_arg(query, "length")
            pieces = self.state.read(vid, offset, size)
            return Response(
                200, pieces, [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
            )
        if op == "" and method == "GET":
            vol = self.state.volume(vid)
            with self.state.lock:
                written = sorted(vol.blocks)
            return json_response(200, {"volume_id": vid, "size_gib": vol.size_gib, "written_blocks": written})
        return _error(404, f"no lab endpoint {method} /_lab/volumes/{vid}{op}")

    def _faults(self, method: str, read: Callable[[int], bytes], length: int) -> Response:
        if method == "POST":
            req = _json(read, length)
            try:
                self.faults.inject(
                    str(req["operation"]),
                    str(req["error"]),
                    int(req.get("count", 1)),
                    req.get("status"),
                    int(req.get("after", 0)),
                    bool(req.get("lost", False)),
                )
            except (KeyError, ValueError) as e:
                raise LabStateError(400, f"a fault needs operation, error and count >= 1: {e}") from None
        elif method == "DELETE":
            self.faults.clear()
        return json_response(200, {"faults": self.faults.pending()})


def _json(read: Callable[[int], bytes], length: int) -> dict[str, Any]:
    try:
        value = json.loads(read(length) or b"{}")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise LabStateError(400, "the request body must be JSON") from None
    if not isinstance(value, dict):
        raise LabStateError(400, "the request body must be a JSON object")
    return value
