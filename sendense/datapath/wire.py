"""NBD transmission on the socket itself, so that a copy moves payload kernel-to-kernel with splice(2).

libnbd negotiates the connection (handshake, export, flags) with simple replies, then hands over its
socket: `NbdWire` speaks the transmission phase directly (requests, simple replies, see the NBD
protocol's "Transmission phase"). A chunk is copied by sending READ to the source and WRITE to the
target, then splicing the READ reply's payload from the source socket through a pipe into the target
socket. The payload never enters this process, which saves two of the five copies a block costs on
its way from the source's page cache to the target's disk; qemu-nbd's own receive and send remain.

An all-zero chunk must still become a zero range on the target, not allocated zero data. The first
4 KiB of each payload are peeked (MSG_PEEK); when they are all zero the chunk is read into memory and
checked whole, and written as WRITE_ZEROES if it is. Data chunks, whose first bytes are almost never
all zero, pay only the peek.

Plain sockets only (unix or TCP): a TLS connection is never handed over, so `wire()` gives None.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from sendense.errors import DataPathError

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, cookie
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES = 0, 1, 6
PEEK = 4096
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size
F_SETPIPE_SZ = 1031
_ZEROS = bytes(PEEK)


def available() -> bool:
    return hasattr(os, "splice")


class NbdWire:
    """The transmission phase of one negotiated NBD connection (simple replies), on its socket.

    Owned by one thread. The socket is switched to blocking mode while in use; `release()` hands it
    back to libnbd (non-blocking) for the disconnect.
    """

    def __init__(self, fd: int, name: str, *, can_zero: bool) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(True)
        self.name = name
        self.can_zero = can_zero
        self._cookie = 0
        self._header = bytearray(REPLY.size)

    def release(self) -> None:
        try:
            self.sock.setblocking(False)
        except OSError:
            pass
        self.sock.close()

    # ------------------------------------------------------------------ requests and replies

    def send_request(self, cmd: int, offset: int, length: int, *, more: bool = False) -> int:
        self._cookie += 1
        msg = REQUEST.pack(REQUEST_MAGIC, 0, cmd, self._cookie, offset, length)
        try:
            self.sock.sendall(msg, socket.MSG_MORE if more else 0)
        except OSError as e:
            raise self._broken(e) from None
        return self._cookie

    def recv_reply(self, cookie: int, what: str) -> None:
        """Read one simple reply header; raise on an error reply."""
        self._recv_into(memoryview(self._header))
        magic, error, got = REPLY.unpack(self._header)
        if magic != SIMPLE_REPLY_MAGIC or got != cookie:
            raise DataPathError(f"NBD export {self.name}: protocol error (magic {magic:#x}, cookie {got})")
        if error:
            if error == errno.ENOSPC:
                raise DataPathError(f"target {self.name} is full ({what})", retryable=False)
            raise DataPathError(f"{what} on {self.name}: {os.strerror(error)}")

    def _recv_into(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            try:
                n = self.sock.recv_into(buf[got:])
            except OSError as e:
                raise self._broken(e) from None
            if n == 0:
                raise DataPathError(f"NBD export {self.name} closed the connection")
            got += n

    def _broken(self, e: OSError) -> DataPathError:
        return DataPathError(f"NBD export {self.name}: connection lost ({e.strerror or e})")

    # ------------------------------------------------------------------ verbs

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        cookie = self.send_request(CMD_WRITE, offset, len(data), more=True)
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise self._broken(e) from None
        self.recv_reply(cookie, f"write at {offset}")

    def zero(self, offset: int, length: int) -> None:
        if not self.can_zero:
            step = 4 << 20
            for off in range(offset, offset + length, step):
                self.write(off, bytes(min(step, offset + length - off)))
            return
        cookie = self.send_request(CMD_WRITE_ZEROES, offset, length)
        self.recv_reply(cookie, f"zero {length}@{offset}")


@dataclass
class SpliceResult:
    written: int = 0
    zeroed: int = 0


class Splicer:
    """Copies chunks from one wire to another through a pipe of its own (one per copy thread)."""

    def __init__(self, src: NbdWire, dst: NbdWire) -> None:
        self.src, self.dst = src, dst
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only means more splice calls

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)

    def copy(self, offset: int, length: int) -> SpliceResult:
        """Copy [offset, offset+length): spliced, or as a zero range when the data is all zero."""
        src, dst = self.src, self.dst
        cookie = src.send_request(CMD_READ, offset, length)
        src.recv_reply(cookie, f"read {length}@{offset}")
        peek = min(PEEK, length)
        try:
            head = src.sock.recv(peek, socket.MSG_PEEK | socket.MSG_WAITALL)
        except OSError as e:
            raise src._broken(e) from None
        if len(head) < peek:
            raise DataPathError(f"NBD export {src.name} closed the connection")
        if head == _ZEROS[:peek]:
            buf = bytearray(length)
            src._recv_into(memoryview(buf))
            if buf.count(0) == length:
                dst.zero(offset, length)
                return SpliceResult(zeroed=length)
            dst.write(offset, buf)
            return SpliceResult(written=length)
        wcookie = dst.send_request(CMD_WRITE, offset, length, more=True)
        self._move(length)
        dst.recv_reply(wcookie, f"write at {offset}")
        return SpliceResult(written=length)

    def _move(self, length: int) -> None:
        sfd, dfd = self.src.sock.fileno(), self.dst.sock.fileno()
        left = length
        while left:
            try:
                n = os.splice(sfd, self.w, left)
            except OSError as e:
                raise self.src._broken(e) from None
            if n == 0:
                raise DataPathError(f"NBD export {self.src.name} closed the connection")
            left -= n
            while n:
                try:
                    n -= os.splice(self.r, dfd, n)
                except OSError as e:
                    raise self.dst._broken(e) from None
