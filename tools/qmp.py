"""A small synchronous QMP client over a unix socket.

QMP is newline-delimited JSON: the server greets, the client negotiates with `qmp_capabilities`, then
every command gets exactly one `return` or `error` reply; asynchronous events may arrive in between
and are kept (bounded) in `events`. One command at a time per client (a lock serializes callers).

A QEMU monitor serves one client at a time: a second client's connection is accepted by the kernel
but gets no greeting until the first one leaves, hence the greeting timeout.

The socket is the user's (a spec names it) and whatever listens there is not trusted: a reply line
is at most MAX_REPLY bytes and an event line at most MAX_EVENT (a peer sending 40 MB without a
newline pushed the CLI to 1.1 GB), and a reply nested too deep to parse is malformed; each is one
line naming the socket.
"""

from __future__ import annotations

import collections
import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError

MAX_REPLY = 4 << 20  # query-block of 60 disks with backing chains is well under 1 MiB; JSON parsed
# from a line can take ~15x its size (many small keys), so this also bounds the parse
MAX_EVENT = 64 << 10  # QEMU's events are a few hundred bytes; up to 256 are kept


class QmpError(SendenseError):
    """QEMU answered a command with an error; `error_class` is QMP's class (GenericError, ...)."""

    kind = "QmpError"

    def __init__(self, message: str, *, error_class: str = "GenericError", desc: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class
        self.desc = desc


class VmNotRunning(ResourceUnavailable):
    """The QMP socket file exists but nothing listens on it (QEMU exited or crashed)."""

    kind = "ResourceUnavailable"


class QmpClient:
    def __init__(self, path: Path | str, *, timeout: float = 10.0, command_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.command_timeout = command_timeout
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._lock = threading.RLock()
        self.greeting: dict[str, Any] = {}

    # ------------------------------------------------------------------ connection

    def connect(self) -> QmpClient:
        with self._lock:
            if self._sock is not None:
                return self
            if not self.path.exists():
                raise ResourceNotFound(f"QMP socket {self.path}: not found (is the VM running?)")
            s = self._open_socket()
            self._sock, self._buf, self._scanned = s, bytearray(), 0
            try:
                greeting = self._recv(self.timeout, what="greeting")
                if "QMP" not in greeting:
                    raise ResourceUnavailable(f"QMP socket {self.path}: not a QMP monitor")
                self.greeting = greeting["QMP"]
                self._command("qmp_capabilities", {}, self.timeout)
            except BaseException:
                self.close()
                raise
            return self

    def _open_socket(self) -> socket.socket:
        # QEMU listens with a backlog of 1: while another client holds the monitor and one more waits,
        # connect() fails with EAGAIN; retry until the connect timeout.
        deadline = time.monotonic() + self.timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(str(self.path))
                return s
            except FileNotFoundError:
                s.close()
                raise ResourceNotFound(f"QMP socket {self.path}: not found (is the VM running?)") from None
            except ConnectionRefusedError:
                s.close()
                raise VmNotRunning(
                    f"QMP socket {self.path}: connection refused (the VM is not running)"
                ) from None
            except (BlockingIOError, TimeoutError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise ResourceUnavailable(
                        f"QMP socket {self.path}: busy (other clients hold the monitor): {e.strerror or e}"
                    ) from None
                time.sleep(0.05)
            except OSError as e:
                s.close()
                raise ResourceUnavailable(f"QMP socket {self.path}: {e.strerror or e}") from None

    def peer_pid(self) -> int | None:
        """The pid of the process serving the monitor (SO_PEERCRED of the unix socket), None when not
        connected or not known."""
        with self._lock:
            if self._sock is None:
                return None
            try:
                creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            except OSError:
                return None
            pid = struct.unpack("3i", creds)[0]
            return pid if pid > 0 else None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock, self._buf, self._scanned = None, bytearray(), 0

    def __enter__(self) -> QmpClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ commands

    def execute(self, cmd: str, **args: Any) -> Any:
        """Run one command and return its `return` value. Hyphenated argument names go through a dict:
        `execute("block-export-add", **{"node-name": "n"})`."""
        with self._lock:
            self.connect()
            return self._command(cmd, args, self.command_timeout)

    def hmp(self, cmdline: str) -> str:
        """An HMP command through `human-monitor-command`; returns its text output."""
        return str(self.execute("human-monitor-command", **{"command-line": cmdline}))

    def wait_event(
        self, name: str, timeout: float = 30.0, match: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The first event `name` (already received or arriving within `timeout`) whose data holds `match`."""

        def ok(ev: dict[str, Any]) -> bool:
            data = ev.get("data", {})
            return ev.get("event") == name and all(data.get(k) == v for k, v in (match or {}).items())

        with self._lock:
            self.connect()
            for ev in list(self.events):
                if ok(ev):
                    self.events.remove(ev)
                    return ev
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceUnavailable(
                        f"QMP socket {self.path}: no {name} event within {timeout:.0f}s"
                    )
                msg = self._recv(left, what=f"{name} event")
                if "event" in msg:
                    if ok(msg):
                        return msg
                    self._keep(msg)

    # ------------------------------------------------------------------ wire

    def _command(self, cmd: str, args: dict[str, Any], timeout: float) -> Any:
        assert self._sock is not None
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            self.close()
            raise ResourceUnavailable(f"QMP socket {self.path}: {cmd}: {e.strerror or e}") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(max(0.001, deadline - time.monotonic()), what=f"reply to {cmd}")
            if "event" in reply:
                self._keep(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                desc = str(err.get("desc", "unknown error"))
                raise QmpError(
                    f"QMP {cmd} on {self.path}: {desc}", error_class=err.get("class", ""), desc=desc
                )
            if "return" in reply:
                return reply["return"]

    def _keep(self, event: dict[str, Any]) -> None:
        if self._last_len > MAX_EVENT:
            self.close()
            raise SendenseError(
                f"QMP socket {self.path}: an event of {self._last_len} bytes (max {MAX_EVENT}): "
                "not a QEMU monitor"
            )
        self.events.append(event)

    _last_len = 0  # the length of the line _recv returned last

    def _too_long(self, what: str) -> SendenseError:
        self.close()
        return SendenseError(
            f"QMP socket {self.path}: {what} is longer than {MAX_REPLY >> 20} MiB: not a QEMU monitor, "
            "or a reply too large to trust"
        )

    def _recv(self, timeout: float, *, what: str) -> dict[str, Any]:
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while (nl := self._buf.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self._buf)
            if self._scanned > MAX_REPLY:
                raise self._too_long(what)
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise ResourceUnavailable(
                    f"QMP socket {self.path}: no {what} within {timeout:.0f}s "
                    "(monitor busy or held by another client)"
                )
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                self.close()
                raise ResourceUnavailable(f"QMP socket {self.path}: {what}: {e.strerror or e}") from None
            if not chunk:
                self.close()
                raise ResourceUnavailable(
                    f"QMP socket {self.path}: connection closed by QEMU while waiting for {what}"
                )
            self._buf += chunk
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        self._scanned = 0
        self._last_len = len(line)
        if len(line) > MAX_REPLY:
            raise self._too_long(what)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            self.close()
            raise ResourceUnavailable(f"QMP socket {self.path}: malformed reply {line[:80]!r}") from None
        if not isinstance(msg, dict):
            self.close()
            raise ResourceUnavailable(f"QMP socket {self.path}: malformed reply {line[:80]!r}")
        return msg
