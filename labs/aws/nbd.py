"""The lab's volumes over NBD, for the QEMU that runs an instance: guest I/O lands in the block maps.

A small NBD server (fixed newstyle handshake, `NBD_OPT_GO`/`INFO`/`EXPORT_NAME`, simple replies) on a
private unix socket in the lab process. The export name is a volume id; reads come from the volume's
blocks, and every write (`NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES`) is applied to the volume at once,
whole, under the state's write lock, like a guest write through `/_lab/volumes/{id}/write`: a snapshot
taken while the instance runs holds exactly the writes QEMU had sent before it (crash-consistent, as
EBS), and the volume's written blocks count them. `NBD_CMD_FLUSH` has nothing to do: an answered
write is already in the volume. Structured replies, metadata contexts and trim are not offered
(QEMU falls back to simple replies and does not send them).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from labs.aws.state import LabState, LabStateError

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TX_HAS_FLAGS, TX_SEND_FLUSH, TX_SEND_WRITE_ZEROES = 1, 4, 64
TX_FLAGS = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_WRITE_ZEROES
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 2, 3, 6
_DIR_PREFIX = "awslab-nbd-"
MAX_REQUEST = 32 << 20  # the largest read or write payload a client may send (told in INFO_BLOCK_SIZE)


class _Closed(Exception):
    pass


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise _Closed
        buf += chunk
    return bytes(buf)


class _Handler(socketserver.BaseRequestHandler):
    server: VolumeNbdServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            volume_id = self._negotiate(sock)
            if volume_id is not None:
                self._transmit(sock, volume_id)
        except (_Closed, ConnectionError, OSError):
            pass  # QEMU killed or stopped: nothing half-applied (writes apply whole, once received)

    # ---------------------------------------------------------------- handshake

    def _negotiate(self, sock: socket.socket) -> str | None:
        sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv(sock, 4))
        no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            magic, option, length = struct.unpack(">QII", _recv(sock, 16))
            if magic != IHAVEOPT or length > 4096:
                return None
            data = _recv(sock, length)
            if option == OPT_EXPORT_NAME:
                name = data.decode(errors="replace")
                size = self._size(name)
                if size is None:
                    return None  # the protocol has no error reply here: close
                sock.sendall(struct.pack(">QH", size, TX_FLAGS) + (b"" if no_zeroes else bytes(124)))
                return name
            if option in (OPT_INFO, OPT_GO):
                asked = self._export_name(data)
                size = None if asked is None else self._size(asked)
                if asked is None:
                    self._reply(sock, option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")
                elif size is None:
                    self._reply(sock, option, REP_ERR_UNKNOWN, f"no volume {asked}".encode())
                else:
                    self._reply(sock, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, TX_FLAGS))
                    block = struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST)
                    self._reply(sock, option, REP_INFO, block)
                    self._reply(sock, option, REP_ACK)
                    if option == OPT_GO:
                        return asked
                continue
            if option == OPT_ABORT:
                self._reply(sock, option, REP_ACK)
                return None
            self._reply(sock, option, REP_ERR_UNSUP)

    @staticmethod
    def _export_name(data: bytes) -> str | None:
        if len(data) < 6:
            return None
        (n,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + n + 2:
            return None
        return data[4 : 4 + n].decode(errors="replace")

    def _size(self, volume_id: str) -> int | None:
        try:
            return self.server.state.volume(volume_id).size_bytes
        except LabStateError:
            return None

    @staticmethod
    def _reply(sock: socket.socket, option: int, kind: int, data: bytes = b"") -> None:
        sock.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, kind, len(data)) + data)

    # ---------------------------------------------------------------- transmission

    def _transmit(self, sock: socket.socket, volume_id: str) -> None:
        state = self.server.state
        while True:
            magic, _flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", _recv(sock, 28))
            if magic != REQUEST_MAGIC:
                return
            if cmd == CMD_DISC:
                return
            payload = _recv(sock, length) if cmd == CMD_WRITE else b""
            err, data = 0, b""
            try:
                if cmd == CMD_READ:
                    data = b"".join(state.read(volume_id, offset, length))
                elif cmd in (CMD_WRITE, CMD_WRITE_ZEROES):
                    body = payload if cmd == CMD_WRITE else None
                    state.write(volume_id, offset, length, _reader(body, length))
                elif cmd != CMD_FLUSH:
                    err = errno.EINVAL
            except LabStateError as e:
                log.warning("NBD %s: %s", volume_id, e)
                err = errno.ENOSPC if e.status == 400 and cmd != CMD_READ else errno.EIO
            sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, err, handle) + (data if not err else b""))


def _reader(body: bytes | None, length: int) -> Callable[[int], bytes]:
    """A `read(n)` over the request's payload (or over `length` zeros)."""
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        n = min(n, length - pos)
        piece = bytes(n) if body is None else body[pos : pos + n]
        pos += n
        return piece

    return read


def socket_dir() -> Path:
    """A private directory for this process's NBD socket (unix socket paths must stay short: /tmp). Those
    of lab processes that died without cleaning up (SIGKILL) are removed."""
    for stale in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        try:
            os.kill(int((stale / "pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (OSError, ValueError):
            continue  # starting up, or not ours to judge
    made = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))
    (made / "pid").write_text(str(os.getpid()))
    return made


class VolumeNbdServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves every lab volume by its id on `path` (a thread per connection, daemon threads)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, state: LabState, path: Path) -> None:
        self.state = state
        self.path = path
        path.unlink(missing_ok=True)
        super().__init__(str(path), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="lab-nbd", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)
