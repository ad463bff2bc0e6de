"""Ask a VM's QEMU guest agent whether it answers: `guest-sync` over the agent's unix socket.

The QGA protocol is one JSON object per line. The socket (QEMU's chardev for the virtio-serial port
`org.qemu.guest_agent.0`) keeps what an earlier client sent and the agent's late replies to it, so a
client sends a 0xFF byte first (the agent resets its parser on it), then `guest-sync` with an id of its
own, and takes as the answer only `{"return": <that id>}`: anything else on the line is stale output.

While the guest has not opened its port yet, QEMU leaves the request in the socket; the agent reads it
once it starts. The request is sent again, with a new id, every `RESEND` seconds (an agent that started
after a reset would have dropped it); any of this call's ids answers.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import time
from pathlib import Path

RESEND = 1.0
MAX_LINE = 64 << 10  # an agent's guest-sync answer is a few bytes; a longer line is dropped unread


def sync_request(ident: int) -> bytes:
    return b"\xff" + json.dumps({"execute": "guest-sync", "arguments": {"id": ident}}).encode() + b"\n"


def answered(line: bytes, ids: set[int]) -> bool:
    """Whether one line from the agent is `{"return": id}` for one of `ids` (stale or malformed: no)."""
    line = line.strip(b"\xff \t\r\n")
    try:
        reply = json.loads(line)
    except ValueError:
        return False
    if not isinstance(reply, dict):
        return False
    ret = reply.get("return")
    return isinstance(ret, int) and not isinstance(ret, bool) and ret in ids


def new_id() -> int:
    return secrets.randbelow(1 << 31) + 1  # positive, fits QGA's int on every agent


def sync_unix(path: Path, timeout: float) -> bool:
    """Whether the agent behind `path` answers `guest-sync` with this call's id within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(min(left, 2.0))
                s.connect(str(path))
                if _sync_on(s, deadline):
                    return True
        except OSError:
            pass  # not there yet, refused, or dropped: try again until the deadline
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _sync_on(s: socket.socket, deadline: float) -> bool:
    ids: set[int] = set()
    buf = bytearray()
    dropping = False
    next_send = 0.0
    while (now := time.monotonic()) < deadline:
        if now >= next_send:
            ident = new_id()
            ids.add(ident)
            s.sendall(sync_request(ident))
            next_send = now + RESEND
        ready, _, _ = select.select([s], [], [], max(0.0, min(next_send, deadline) - now))
        if not ready:
            continue
        chunk = s.recv(4096)
        if not chunk:
            return False  # QEMU closed the connection (the VM stopped): the caller connects again
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line, buf = bytes(buf[:nl]), buf[nl + 1 :]
            if not dropping and answered(line, ids):
                return True
            dropping = False
        if len(buf) > MAX_LINE:
            buf.clear()
            dropping = True  # the rest of this line is dropped too
    return False


__all__ = ["answered", "sync_request", "sync_unix"]
