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
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError, TargetError
from tools.qcow2 import QCOW2_MAGIC as QCOW2_MAGIC  # the header reader's names, where they used to live
from tools.qcow2 import Qcow2Header as Qcow2Header
from tools.qcow2 import is_qcow2 as is_qcow2
from tools.qcow2 import qcow2_backing_name as qcow2_backing_name
from tools.qcow2 import read_qcow2_header as read_qcow2_header

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


def remove_bitmaps(image: Path, names: Sequence[str], in_use: str, *, spec: str | None = None) -> None:
    """Remove persistent bitmaps from an image that no process holds; `in_use` is the one-line error
    (a ResourceUnavailable) when one does. `spec`: what QEMU opens instead of the bare path (a
    `json:` filename from tools.image_chain, which pins the files a user's image may name)."""
    for n in names:
        try:
            qemu_img("bitmap", "--remove", spec or str(image), n)
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
    spec: str | None = None,
) -> NbdServer:
    """Start qemu-nbd on `image`; it dies with this process (PDEATHSIG) so a killed worker leaks nothing.
    `spec`: a `json:` filename opened instead of `image` with `fmt` (tools.image_chain: the exact
    files and formats of a user's image chain); errors still name `image`."""
    _sweep_stale_servers()
    tmpdir = tempfile.mkdtemp(prefix=_NBD_PREFIX)
    sock = Path(tmpdir) / "nbd.sock"
    pidfile = Path(tmpdir) / "pid"  # written once the export is ready (the socket exists earlier)
    cmd = [
        tool("qemu-nbd"),
        "--persistent",
        "--shared",
        str(connections),
        *(() if spec else ("--format", fmt)),
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
    cmd += [*extra, spec or str(image)]
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
