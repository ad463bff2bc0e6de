"""qemu-img and qemu-nbd, run as subprocesses."""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError, TargetError

log = logging.getLogger(__name__)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SendenseError(f"{name} is not installed (run scripts/install.sh)")
    return path


def qemu_img(*args: str, check: bool = True, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    cmd = [tool("qemu-img"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        err = p.stderr.strip()
        msg = (err.splitlines() or ["failed"])[-1]
        low = err.lower()
        if "no space left" in low:
            raise TargetError(f"qemu-img {args[0]}: {msg}")
        if "failed to get" in low and "lock" in low:
            raise ResourceUnavailable(f"qemu-img {args[0]}: image is in use by another process ({msg})")
        raise SendenseError(f"qemu-img {args[0]}: {msg}")
    return p


def image_info(path: Path, *, force_share: bool = True) -> dict[str, Any]:
    """`qemu-img info` as JSON. Raises ResourceNotFound for a missing file."""
    if not path.exists():
        raise ResourceNotFound(f"disk image {path}: not found")
    args = ["info", "--output=json"]
    if force_share:
        args.append("-U")
    p = qemu_img(*args, str(path))
    return json.loads(p.stdout)


def qcow2_bitmaps(info: dict[str, Any]) -> dict[str, list[str]]:
    """Bitmap name -> flags (e.g. ['auto'], or ['in-use'] for one left inconsistent by a crash)."""
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: list(b.get("flags", [])) for b in data.get("bitmaps", [])}


QCOW2_MAGIC = b"QFI\xfb"
_BITMAPS_EXT = 0x23852875
_BITMAP_FLAGS = ((1, "in-use"), (2, "auto"))


@dataclass(frozen=True)
class Qcow2Header:
    """What the hot paths need from a qcow2 header, read in-process (`qemu-img info` costs a process
    and ~4 ms of CPU per call; a sync used to make two per disk)."""

    size: int  # virtual size
    backing: str | None  # the backing file name as written in the header
    bitmaps: dict[str, list[str]]  # persistent bitmap name -> flags, as qcow2_bitmaps() gives them
    version: int = 3  # 2: compat=0.10, which cannot hold persistent bitmaps
    cluster_size: int = 65536
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)  # bitmap -> (table offset, entries)


def is_qcow2(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == QCOW2_MAGIC


def read_qcow2_header(path: Path) -> Qcow2Header:
    """Parse the header, its extensions and the bitmap directory (qcow2 spec, docs/interop/qcow2.txt).

    The bitmaps extension counts only while autoclear bit 0 is set: a program that does not know
    bitmaps clears it on write, and then the bitmaps are stale (QEMU ignores them the same way).
    """
    with open(path, "rb") as f:
        head = f.read(112)
        if len(head) < 72 or head[:4] != QCOW2_MAGIC:
            raise SendenseError(f"{path} is not a qcow2 image")
        version, b_off, b_len, cluster_bits = struct.unpack(">IQII", head[4:24])
        (size,) = struct.unpack(">Q", head[24:32])
        backing = None
        if b_off and b_len:
            f.seek(b_off)
            backing = f.read(b_len).decode("utf-8", "replace")
        bitmaps: dict[str, list[str]] = {}
        tables: dict[str, tuple[int, int]] = {}
        if version < 3 or len(head) < 104:
            return Qcow2Header(size, backing, bitmaps, version, 1 << cluster_bits)
        (autoclear,) = struct.unpack(">Q", head[88:96])
        (header_len,) = struct.unpack(">I", head[100:104])
        f.seek(header_len)
        while True:
            ext = f.read(8)
            if len(ext) < 8:
                break
            etype, elen = struct.unpack(">II", ext)
            if etype == 0:
                break
            data = f.read((elen + 7) & ~7)
            if etype == _BITMAPS_EXT and autoclear & 1 and elen >= 24:
                nb, _reserved, dir_size, dir_off = struct.unpack(">IIQQ", data[:24])
                f.seek(dir_off)
                bitmaps, tables = _bitmap_directory(f.read(dir_size), nb, path)
                break
        return Qcow2Header(size, backing, bitmaps, version, 1 << cluster_bits, tables)


def _bitmap_directory(
    raw: bytes, count: int, path: Path
) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]]]:
    out: dict[str, list[str]] = {}
    tables: dict[str, tuple[int, int]] = {}
    pos = 0
    for _ in range(count):
        if pos + 24 > len(raw):
            raise SendenseError(f"{path}: truncated qcow2 bitmap directory")
        t_off, t_size = struct.unpack(">QI", raw[pos : pos + 12])
        flags, _type, _gran, name_len, extra = struct.unpack(">IBBHI", raw[pos + 12 : pos + 24])
        name_at = pos + 24 + extra
        name = raw[name_at : name_at + name_len].decode("utf-8", "replace")
        out[name] = [label for bit, label in _BITMAP_FLAGS if flags & bit]
        tables[name] = (t_off, t_size)
        pos = (name_at + name_len + 7) & ~7
    return out, tables


def qcow2_backing_name(path: Path) -> str | None:
    """The backing file's name from the qcow2 header, without spawning qemu-img (hot in recovery)."""
    backing = read_qcow2_header(path).backing
    return Path(backing).name if backing else None


def remove_bitmaps(image: Path, names: Sequence[str], in_use: str) -> None:
    """Remove persistent bitmaps from an image that no process holds; `in_use` is the one-line error
    (a ResourceUnavailable) when one does."""
    for n in names:
        try:
            qemu_img("bitmap", "--remove", str(image), n)
        except ResourceUnavailable:
            raise ResourceUnavailable(in_use) from None
        log.info("removed bitmap %s from %s", n, image)


class NbdServer:
    """A qemu-nbd process serving one image on a private unix socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: Path, tmpdir: str) -> None:
        self.proc, self.socket, self._tmpdir = proc, sock, tmpdir

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if not wait_exit(self.proc, 30):
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def wait_exit(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """Wait for a child to exit; False on timeout. Through a pidfd: `Popen.wait(timeout)` polls with
    sleeps that grow to 50 ms, which made every qemu-nbd stop take 30-60 ms instead of ~5."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (OSError, AttributeError):  # already reaped, or a kernel without pidfds
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        if not select.select([fd], [], [], timeout)[0]:
            return False
    finally:
        os.close(fd)
    proc.wait()
    return True


_NBD_PREFIX = "sendense-nbd-"


@functools.lru_cache(maxsize=1)
def supports_io_uring() -> bool:
    """Whether this process may create an io_uring (kernels before 5.1, kernel.io_uring_disabled=2
    and container seccomp profiles say no)."""
    nr_io_uring_setup = {"x86_64": 425, "aarch64": 425}.get(os.uname().machine)
    if nr_io_uring_setup is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(nr_io_uring_setup, 1, params)
    if fd < 0:
        return False
    os.close(fd)
    return True


@functools.lru_cache(maxsize=64)
def supports_direct_io(directory: Path) -> bool:
    """Whether files in `directory` can be opened with O_DIRECT (tmpfs cannot)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".sendense-odirect-")
    except OSError:
        return False
    os.close(fd)
    try:
        fd = os.open(name, os.O_RDWR | os.O_DIRECT)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        os.unlink(name)


def die_with_parent(cmd: list[str]) -> list[str]:
    """Prefix a command so the child gets SIGKILL when this process dies (a killed worker leaks no
    qemu-nbd). setpriv avoids preexec_fn, which forces a slow full fork of a large worker."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


def _sweep_stale_servers() -> None:
    """Remove socket dirs left by qemu-nbd processes that died with a killed worker."""
    for d in Path(tempfile.gettempdir()).glob(_NBD_PREFIX + "*"):
        try:
            pid = int((d / "pid").read_text().strip())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue  # starting up (no pid yet) or not ours to judge


def start_qemu_nbd(
    image: Path,
    *,
    fmt: str = "qcow2",
    readonly: bool = True,
    bitmaps: Sequence[str] = (),
    connections: int = 40,  # the copy engine opens up to 2 x tuning.connections + 1
    extra: Sequence[str] = (),
) -> NbdServer:
    """Start qemu-nbd on `image`; it dies with this process (PDEATHSIG) so a killed worker leaks nothing."""
    _sweep_stale_servers()
    tmpdir = tempfile.mkdtemp(prefix=_NBD_PREFIX)
    sock = Path(tmpdir) / "nbd.sock"
    pidfile = Path(tmpdir) / "pid"  # written once the export is ready (the socket exists earlier)
    cmd = [
        tool("qemu-nbd"),
        "--persistent",
        "--shared",
        str(connections),
        "--format",
        fmt,
        "--socket",
        str(sock),
    ]
    cmd += ["--pid-file", str(pidfile)]
    if readonly:
        cmd += ["--cache=writeback", "--aio=threads", "--read-only"]
    elif supports_direct_io(image.parent):
        # replicas are written once and read rarely: O_DIRECT skips the page cache copy and, with
        # kernel AIO, lets qemu-nbd keep many writes in flight (measured ~1.5x on a full sync).
        # io_uring rather than linux-aio: as fast or faster, and an exiting linux-aio qemu-nbd waits
        # ~35 ms in io_destroy (an RCU grace period), which every sync paid twice.
        cmd += ["--cache=none", f"--aio={'io_uring' if supports_io_uring() else 'native'}", "--discard=unmap"]
    else:
        cmd += ["--cache=writeback", "--aio=threads", "--discard=unmap"]
    for b in bitmaps:
        cmd += ["--bitmap", b]
    cmd += [*extra, str(image)]
    proc = subprocess.Popen(die_with_parent(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    pause = 0.001  # qemu-nbd is ready after ~5-10 ms: poll finely at first
    while not (pidfile.exists() and _accepts(sock)):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            shutil.rmtree(tmpdir, ignore_errors=True)
            last = (err.splitlines() or ["exited"])[-1]
            if "lock" in err.lower():
                raise ResourceUnavailable(f"disk image {image} is in use by another process ({last})")
            raise SendenseError(f"qemu-nbd could not serve {image}: {last}")
        if time.monotonic() > deadline:
            proc.kill()
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise ResourceUnavailable(f"qemu-nbd did not start for {image}")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return NbdServer(proc, sock, tmpdir)


def _accepts(sock: Path) -> bool:
    """True once the server listens (the socket file appears at bind, before listen)."""
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
            return True
        except OSError:
            return False


@contextmanager
def qemu_nbd(image: Path, **kw: Any) -> Iterator[NbdServer]:
    srv = start_qemu_nbd(image, **kw)
    try:
        yield srv
    finally:
        srv.stop()


UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the trailing NUL


def fits_unix_socket(path: Path) -> bool:
    """Whether `path` can be bound as a unix socket (its length in bytes, not characters)."""
    return len(os.fsencode(path)) <= UNIX_PATH_MAX


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
