"""nbdkit plugin standing in for nbdkit's ``vddk`` plugin in the vSphere lab.

VDDK (VMware's Virtual Disk Development Kit) cannot be installed here, so the lab serves disks with this
nbdkit Python plugin instead.  It takes the parameters of nbdkit's vddk plugin
(https://libguestfs.org/nbdkit-vddk-plugin.1.html) and serves the bytes the lab's vcsim-lab holds for
the disk, so the product's connector runs the same command line with only the plugin word swapped:

production::

    nbdkit -U SOCK --exit-with-parent [-r] vddk libdir=/opt/vmware-vix-disklib-distrib \\
        server=vc.example port=443 user=U password=+/path/pwfile thumbprint=AA:BB:... \\
        vm=moref=vm-42 snapshot=snapshot-7 'file=[ds1] web/web.vmdk' transports=nbdssl:nbd

lab::

    nbdkit -U SOCK --exit-with-parent [-r] python /path/to/labs/vsphere/vddk_standin.py \\
        libdir=/opt/vmware-vix-disklib-distrib \\
        server=127.0.0.1 port=PORT user=U password=+/path/pwfile thumbprint=AA:BB:... \\
        vm=moref=vm-42 snapshot=snapshot-7 'file=[ds1] web/web.vmdk' transports=nbdssl:nbd

Runs inside nbdkit's embedded system Python (3.11): stdlib and Debian's python3-libnbd (``import nbd``)
only.

Parameters (all of the vddk plugin's listed below; any other key is ``unknown parameter 'KEY'``):

- ``file`` (required): the datastore path ``[ds] dir/name.vmdk`` (remote) or a local disk path (local).
- ``server``, ``port`` (default 443), ``user``, ``password``, ``vm``, ``thumbprint``, ``cookie``,
  ``nfchostport``: any of them makes the connection remote, as in the vddk plugin; a remote connection
  needs ``server``, ``user``, ``password``, ``vm`` (``moref=ID``), in the vddk plugin's order, then
  ``thumbprint`` (VDDK refuses a remote connection without it; checked here up front).  ``cookie`` is
  sent as a ``vmware_soap_session`` cookie beside Basic auth (the lab's endpoint ignores it).
  ``password`` as nbdkit_read_password takes it: the value, ``+FILE`` (its first line), ``-FD`` (a line
  from inherited fd FD, not 0/1/2) or ``-`` (a line typed on stdin, which must be a tty: a pipe is
  refused, as by nbdkit).
- ``snapshot``: snapshot moref (``snapshot-7``); the disk as of that snapshot, always read-only.
- ``transports``: colon list of ``nbd``, ``nbdssl``, ``hotadd``, ``san``; parsed and validated, served
  all the same way (the lab has one data path).
- ``single-link=true``: only this link of the disk's chain (qemu ``"backing": null``); its holes are
  reported as holes, not zeros, as the vddk plugin does.
- ``libdir``, ``config``, ``compression`` (none/zlib/fastlz/skipz), ``unbuffered``,
  ``nfchostport``, ``vimapiver``, ``noreexec``: accepted (values checked as the vddk plugin checks them)
  and otherwise ignored; there is no VDDK library to load.  Unlike the vddk plugin, ``libdir`` and
  ``config`` need not exist (the lab has no /opt/vmware-vix-disklib-distrib), and a bare disk name is not
  taken as ``file`` (the python plugin's own magic key is the script).

Per NBD connection (``open``), as VDDK's ConnectEx + Open do: connect to ``https://server:port``, check
the SHA-1 thumbprint of the certificate the server presents against ``thumbprint`` (case-insensitive),
then, on that same TLS connection, ``GET /sendense-lab/disk?vm=&snapshot=&file=`` with HTTP Basic auth
(the lab's contract; 200 JSON ``{path, format, capacity, writable, disk_key, power_state}``).  It then
starts ``qemu-nbd`` on the file (``setpriv --pdeathsig KILL``: it dies with the nbdkit thread that
started it) on a unix socket in a private temp dir, connects with libnbd and removes the temp dir at once
(nothing is left behind even if nbdkit is SIGKILLed), and forwards pread/pwrite/zero/trim/flush and
block status (``base:allocation``, so clients see holes and zeros); I/O not aligned to 512-byte sectors
is refused, as by the vddk plugin.  qemu-nbd runs read-only (``--read-only``; ``"read-only": true,
"force-share": true`` in its ``json:`` filename) unless nbdkit is writable, no ``snapshot`` is given and
the lab says the disk is writable (a powered-off VM's current disk).  ``close`` (and ``cleanup`` at exit)
kill it.  The export size is the lab's capacity.  Without ``server`` (local mode) ``file`` is a local
disk path, served writable unless ``-r``.

Errors are one line in the style of the vddk plugin and never contain the password: parameter errors
from config/config_complete (nbdkit exits 1); ``VixDiskLib_ConnectEx: ...`` (unreachable server,
thumbprint mismatch, bad user name or password) and ``VixDiskLib_Open: ...`` (unknown VM/snapshot/file,
qemu-nbd refusing the file) from ``open``, as with VDDK: nbdkit keeps running and that client's handshake
fails; ``VixDiskLib_Read/Write/...: ...`` from the data path, with the errno passed on.  Caveat: nbdkit
1.32's core prints every ``key=value`` with ``-v``, the password too (as with the real plugin), so pass it
as ``+FILE`` or ``-FD``.
"""

from __future__ import annotations

import base64
import builtins
import errno
import functools
import hashlib
import http.client
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import nbd  # Debian's python3-libnbd
import nbdkit  # provided by nbdkit's python plugin

API_VERSION = 2

F = TypeVar("F", bound=Callable[..., Any])

TRANSPORTS = ("nbd", "nbdssl", "hotadd", "san")
COMPRESSIONS = ("none", "zlib", "fastlz", "skipz")
FORMATS = ("vmdk", "qcow2", "raw")
BOOLS = ("1", "true", "t", "yes", "y", "on", "0", "false", "f", "no", "n", "off", "")  # nbdkit_parse_bool
REMOTE_KEYS = ("server", "user", "password", "vm", "thumbprint", "cookie", "port", "nfchostport")
KNOWN_KEYS = (
    "compression", "config", "cookie", "file", "libdir", "nfchostport", "noreexec", "password", "port",
    "server", "single-link", "snapshot", "thumbprint", "transports", "unbuffered", "user", "vimapiver", "vm",
)  # fmt: skip  # the vddk plugin's keys (nbdkit 1.32) but its internal reexeced_
START_TIMEOUT = 20.0
SECTOR = 512  # VIXDISKLIB_SECTOR_SIZE


class VixError(Exception):
    """An error reported as one line (no traceback), like nbdkit's vddk plugin."""


# nbdkit's python plugin prints an exception with traceback.format_exception; errors of this plugin are
# meant to be one line, so VixError is printed as its message alone.
_format_exception = traceback.format_exception


def _one_line_format_exception(exc, value=None, tb=None, *args, **kwargs):  # type: ignore[no-untyped-def]
    if isinstance(value, VixError):
        return [" ".join(str(value).split())]
    return _format_exception(exc, value, tb, *args, **kwargs)


traceback.format_exception = _one_line_format_exception  # type: ignore[assignment]

params: dict[str, str] = {}
transports: list[str] = []
password: str | None = None
remote = False
_live: set[Handle] = set()
_live_lock = threading.Lock()


def _line(data: bytes) -> str:
    """getline's first line, one trailing newline removed (EOF at once: the empty password)."""
    line = data.split(b"\n", 1)[0]
    return line.decode("utf-8", errors="surrogateescape")


def _read_fd_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096 if fd != 0 else 1)  # stdin: no read beyond the line
        if not chunk:
            break
        data += chunk
    return data


def _read_password(value: str) -> str:
    """nbdkit_read_password (nbdkit 1.32 server/public.c), which the vddk plugin uses: VALUE; ``-`` a line
    from stdin, only when stdin is a tty (prompt, no echo); ``-FD`` a line from fd FD (not 0/1/2, closed
    after); ``+FILE`` the file's first line. The python plugin does not expose the C function."""
    if value == "-":
        if not os.isatty(0):
            raise VixError("stdin is not a tty, cannot read password interactively")
        import termios

        os.write(1, b"password: ")
        old = termios.tcgetattr(0)
        new = termios.tcgetattr(0)
        new[3] &= ~termios.ECHO
        termios.tcsetattr(0, termios.TCSAFLUSH, new)
        try:
            data = _read_fd_line(0)
        finally:
            termios.tcsetattr(0, termios.TCSAFLUSH, old)
            os.write(1, b"\n")
        return _line(data)
    if value.startswith("-"):
        try:
            fd = int(value[1:], 10)
        except ValueError:
            raise VixError(f"password file descriptor: could not parse number: {value[1:]!r}") from None
        if fd in (0, 1, 2):
            raise VixError("cannot use password -FD for stdin/stdout/stderr")
        try:
            try:
                data = _read_fd_line(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise VixError(f"could not read password from {value[1:]}: {e.strerror}") from None
        return _line(data)
    if value.startswith("+"):
        try:
            fd = os.open(value[1:], os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise VixError(f"open {value[1:]}: {e.strerror}") from None
        try:
            try:
                data = _read_fd_line(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise VixError(f"could not read password from {value[1:]}: {e.strerror}") from None
        return _line(data)
    return value


def _single_link() -> bool:
    return params.get("single-link", "").strip().lower() in ("1", "true", "t", "yes", "y", "on")


def _uint16(key: str, value: str) -> None:
    """nbdkit_parse_uint16_t's checks and messages."""
    try:
        n = int(value, 0)
    except ValueError:
        raise VixError(f'{key}: could not parse number: "{value}"') from None
    if not 0 <= n <= 0xFFFF:
        raise VixError(f'{key}: value is out of range: "{value}"')


def config(key: str, value: str) -> None:
    """The vddk plugin's vddk_config (nbdkit 1.32): the same keys, checks and messages, except that
    ``libdir`` and ``config`` need not exist (the vddk plugin realpath()s them) and ``transports`` is
    checked word by word (the vddk plugin hands it to VDDK unchecked)."""
    global password
    if key not in KNOWN_KEYS:
        raise VixError(f"unknown parameter '{key}'")
    if key == "password":
        password = _read_password(value)
        value = "***"
    elif key in ("port", "nfchostport"):
        _uint16(key, value)
    elif key in ("single-link", "unbuffered", "noreexec"):
        if value.strip().lower() not in BOOLS:
            raise VixError(f"could not decipher boolean ({value})")
    elif key == "compression":
        if value not in COMPRESSIONS:
            raise VixError(f"unknown compression type: {value}")
    elif key == "transports":
        words = value.split(":")
        bad = [w for w in words if w not in TRANSPORTS]
        if bad or not value:
            raise VixError(
                f"transports: unknown transport mode '{bad[0] if bad else value}'"
                f" (expected a colon list of {':'.join(TRANSPORTS)})"
            )
        transports[:] = words
    params[key] = value


def config_complete() -> None:
    global remote
    if "file" not in params or not params["file"]:
        raise VixError(
            "you must supply the file=<FILENAME> parameter after the plugin name on the command line"
        )
    # the vddk plugin's is_remote test (a port of 0 counts as unset, as there)
    remote = any(k in params for k in REMOTE_KEYS if k not in ("port", "nfchostport")) or any(
        int(params.get(k, "0"), 0) != 0 for k in ("port", "nfchostport")
    )
    if remote:
        # the vddk plugin's order and message; then what VDDK refuses at ConnectEx, checked up front here
        for key in ("server", "user", "password", "vm", "thumbprint"):
            if (password is None) if key == "password" else not params.get(key):
                raise VixError(f"remote connection requested, missing parameter: {key}")
        vm = params["vm"]
        if not vm.startswith("moref=") or len(vm) == len("moref="):
            raise VixError(f"vm: expected moref=<managed object reference> (e.g. moref=vm-42), got '{vm}'")


def config_help() -> str:  # shown by nbdkit python SCRIPT --help
    return (
        "file=<DISK> [server=HOST port=443 user=USER password=+FILE thumbprint=XX:XX:.. vm=moref=vm-N "
        "snapshot=snapshot-N transports=nbdssl:nbd ...] (lab stand-in for the vddk plugin)"
    )


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS)


def _lab_disk() -> dict:
    """VDDK's ConnectEx + Open against vcsim-lab: thumbprint check, then the lab's disk endpoint."""
    server = params["server"]
    port = int(params.get("port", "443"))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust is the thumbprint, as with VDDK
    conn = http.client.HTTPSConnection(server, port, context=ctx, timeout=30)
    try:
        try:
            conn.connect()
        except (OSError, ssl.SSLError) as e:
            raise VixError(
                f"VixDiskLib_ConnectEx: Cannot connect to host {server}:{port}: "
                f"{getattr(e, 'strerror', None) or e}"
            ) from None
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        got = ":".join(f"{b:02X}" for b in hashlib.sha1(der or b"").digest())
        if got.lower() != params["thumbprint"].strip().lower():
            raise VixError(
                f"VixDiskLib_ConnectEx: Cannot connect to host {server}: The host's thumbprint does not match"
            )
        query = urllib.parse.urlencode(
            {
                "vm": params["vm"].removeprefix("moref="),
                "snapshot": params.get("snapshot", ""),
                "file": params["file"],
            }
        )
        headers = {"Accept": "application/json"}
        if password is not None or "user" in params:
            token = f"{params.get('user', '')}:{password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        if "cookie" in params:
            headers["Cookie"] = f'vmware_soap_session="{params["cookie"]}"'
        try:
            conn.request("GET", "/sendense-lab/disk?" + query, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise VixError(f"VixDiskLib_ConnectEx: Cannot connect to host {server}:{port}: {e}") from None
    finally:
        conn.close()
    if resp.status == 401:
        raise VixError(f"VixDiskLib_ConnectEx: Cannot connect to host {server}: bad user name or password")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if resp.status == 404:
        raise VixError(
            f"VixDiskLib_Open: {params['file']}: The system cannot find the file specified "
            f"({answer.get('error', 'not found')})"
        )
    if resp.status != 200:
        raise VixError(
            f"VixDiskLib_Open: {params['file']}: lab endpoint answered HTTP {resp.status} "
            f"({answer.get('error', '')})"
        )
    for key, kind in (("path", str), ("format", str), ("capacity", int), ("writable", bool)):
        if not isinstance(answer.get(key), kind):
            raise VixError(f"VixDiskLib_Open: {params['file']}: lab endpoint answer lacks {key}")
    if answer["format"] not in FORMATS:
        raise VixError(f"VixDiskLib_Open: {params['file']}: unsupported disk format {answer['format']!r}")
    return answer


def _local_disk() -> dict:
    """Local mode (no server): file is a local disk path, as with VDDK's local connections."""
    path = params["file"]
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", "--force-share", path],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError as e:
        raise VixError(f"VixDiskLib_Open: {path}: {e.strerror}") from None
    if out.returncode != 0:
        raise VixError(f"VixDiskLib_Open: {path}: {out.stderr.strip() or 'cannot open'}")
    info = json.loads(out.stdout)
    return {
        "path": os.path.abspath(path),
        "format": info["format"],
        "capacity": int(info["virtual-size"]),
        "writable": True,
    }


class Handle:
    """One NBD connection: a qemu-nbd of its own, reached through libnbd."""

    def __init__(self, disk: dict, writable: bool) -> None:
        self.disk = disk
        self.writable = writable
        self.capacity = int(disk["capacity"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.nbd: nbd.NBD | None = None
        tmp = tempfile.mkdtemp(prefix="vddk-standin-")
        try:
            self._start(tmp)
        except BaseException:
            self.close()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # connected (or failed): the socket is no longer needed

    def _start(self, tmp: str) -> None:
        sock = os.path.join(tmp, "qemu-nbd.sock")
        # a json: filename: qemu-nbd 7.2 has no --force-share option, and single-link needs "backing": null.
        # force-share (read-only only) lets a reader share the file with a writer of it.
        spec: dict[str, Any] = {
            "driver": self.disk["format"],
            "file": {"driver": "file", "filename": self.disk["path"]},
        }
        if _single_link():
            spec["backing"] = None  # VIXDISKLIB_FLAG_OPEN_SINGLE_LINK: this link of the chain only
        cmd = ["setpriv", "--pdeathsig", "KILL", "--", "qemu-nbd", "--socket", sock, "--shared", "1"]
        if self.writable:
            cmd += ["--discard", "unmap"]
        else:
            cmd += ["--read-only"]
            spec["read-only"] = True
            spec["force-share"] = True
        cmd.append("json:" + json.dumps(spec))
        errpath = os.path.join(tmp, "stderr")
        with builtins.open(errpath, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, close_fds=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                with builtins.open(errpath, encoding="utf-8", errors="replace") as f:
                    why = " ".join(f.read().split()) or f"exit {self.proc.returncode}"
                raise VixError(f"VixDiskLib_Open: {params['file']}: {why}")
            if os.path.exists(sock):
                h = nbd.NBD()
                h.add_meta_context("base:allocation")
                try:
                    h.connect_unix(sock)
                except nbd.Error:
                    pass
                else:
                    self.nbd = h
                    break
            if time.monotonic() > deadline:
                raise VixError(f"VixDiskLib_Open: {params['file']}: qemu-nbd did not start")
            time.sleep(0.01)
        size = self.nbd.get_size()
        if size != self.capacity:
            raise VixError(
                f"VixDiskLib_Open: {params['file']}: disk file holds {size} bytes, "
                f"the VM's disk has capacity {self.capacity}"
            )

    def close(self) -> None:
        if self.nbd is not None:
            try:
                self.nbd.shutdown()
            except nbd.Error:
                pass
            self.nbd = None  # libnbd 1.14's Python handle closes when collected
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


def open(readonly: bool) -> Handle:  # noqa: A001 - nbdkit's callback name
    disk = _lab_disk() if remote else _local_disk()
    writable = not readonly and not params.get("snapshot") and bool(disk["writable"])
    h = Handle(disk, writable)
    with _live_lock:
        _live.add(h)
    return h


def close(h: Handle) -> None:
    with _live_lock:
        _live.discard(h)
    h.close()


def cleanup() -> None:
    # nbdkit 1.32 calls no close for a connection still open when it quits (SIGTERM) and the python
    # plugin has no unload callback; cleanup runs at exit. (The connection thread's exit already killed
    # qemu-nbd through its parent-death signal.)
    with _live_lock:
        handles = list(_live)
        _live.clear()
    for h in handles:
        h.close()


def _nbd(h: Handle) -> nbd.NBD:
    assert h.nbd is not None
    return h.nbd


def get_size(h: Handle) -> int:
    return h.capacity


def can_write(h: Handle) -> bool:
    return h.writable


def can_flush(h: Handle) -> bool:
    return h.writable and bool(_nbd(h).can_flush())


def can_trim(h: Handle) -> bool:
    return h.writable and bool(_nbd(h).can_trim())


def can_zero(h: Handle) -> bool:
    return h.writable


def can_fast_zero(h: Handle) -> bool:
    return h.writable and bool(_nbd(h).can_fast_zero())


def can_fua(h: Handle) -> int:
    return int(nbdkit.FUA_NATIVE if h.writable and _nbd(h).can_fua() else nbdkit.FUA_EMULATE)


def can_multi_conn(h: Handle) -> bool:
    return False  # like the vddk plugin; each connection has its own qemu-nbd


def can_extents(h: Handle) -> bool:
    return True


def can_cache(h: Handle) -> int:
    return int(nbdkit.CACHE_NONE)


def is_rotational(h: Handle) -> bool:
    return False


def _vix(name: str) -> Callable[[F], F]:
    """Data-path errors from qemu-nbd/libnbd: one line named like VDDK's call, errno passed to the client
    (ENOTSUP for an unsupported fast zero matters to clients)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except nbd.Error as e:
                code = e.errno  # libnbd 1.14: the errno's name ("ENOTSUP"), or None
                nbdkit.set_error(
                    getattr(errno, code, errno.EIO) if isinstance(code, str) else code or errno.EIO
                )
                raise VixError(f"{name}: {e.string}") from None

        return call  # type: ignore[return-value]

    return wrap


def _fua(flags: int) -> int:
    return nbd.CMD_FLAG_FUA if flags & nbdkit.FLAG_FUA else 0


def _aligned(what: str, count: int, offset: int) -> None:
    """The vddk plugin refuses I/O not aligned to VDDK's 512-byte sectors (zero and trim, which it
    emulates with writes or lacks, too)."""
    if offset % SECTOR or count % SECTOR:
        nbdkit.set_error(errno.EINVAL)
        raise VixError(f"{what} is not aligned to sectors")


@_vix("VixDiskLib_Read")
def pread(h: Handle, buf: memoryview, offset: int, flags: int) -> None:
    _aligned("read", len(buf), offset)
    buf[:] = _nbd(h).pread(len(buf), offset)


@_vix("VixDiskLib_Write")
def pwrite(h: Handle, buf: memoryview, offset: int, flags: int) -> None:
    _aligned("write", len(buf), offset)
    _nbd(h).pwrite(buf, offset, _fua(flags))


@_vix("VixDiskLib_Flush")
def flush(h: Handle, flags: int) -> None:
    _nbd(h).flush()


@_vix("VixDiskLib_Unmap")
def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    _aligned("write", count, offset)
    _nbd(h).trim(count, offset, _fua(flags))


@_vix("VixDiskLib_Write (zero)")
def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    _aligned("write", count, offset)
    f = _fua(flags)
    if not flags & nbdkit.FLAG_MAY_TRIM:
        f |= nbd.CMD_FLAG_NO_HOLE
    if flags & nbdkit.FLAG_FAST_ZERO:
        f |= nbd.CMD_FLAG_FAST_ZERO
    _nbd(h).zero(count, offset, f)


@_vix("VixDiskLib_QueryAllocatedBlocks")
def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    single = _single_link()

    def collect(metacontext: str, start: int, entries: list[int], err: list[int]) -> int:
        if metacontext == "base:allocation":
            pos = start
            for i in range(0, len(entries) - 1, 2):
                length, state = entries[i], entries[i + 1]
                kind = state & (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
                if single and kind & nbdkit.EXTENT_HOLE:
                    kind = (
                        nbdkit.EXTENT_HOLE
                    )  # as the vddk plugin: a single link's holes may not read as zero
                out.append((pos, length, kind))
                pos += length
        return 0

    n = _nbd(h)
    if not n.can_meta_context("base:allocation"):
        return [(offset, count, 0)]
    n.block_status(count, offset, collect, nbd.CMD_FLAG_REQ_ONE if flags & nbdkit.FLAG_REQ_ONE else 0)
    return out or [(offset, count, 0)]
