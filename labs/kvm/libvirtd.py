"""A private, real libvirtd (with its virtlogd) for tests and demos, and lab domains with guest-like writes.

The daemons run as root in system mode but inside their own mount namespace, where the directories
a privileged libvirtd insists on (they are compiled in, no option moves them) are bind mounts of
directories under `base`:

    base/etc   -> /etc/libvirt        libvirtd.conf, qemu.conf, virtlogd.conf, persistent domain XML
    base/run   -> /run/libvirt        libvirt-sock (the client socket), virtlogd-sock, QEMU pid files
    base/lib   -> /var/lib/libvirt    domain private dirs, checkpoint metadata
    base/cache -> /var/cache/libvirt  QEMU capabilities cache (or `cache_dir`, to keep it between runs)
    base/log   -> /var/log/libvirt    qemu/<domain>.log written by virtlogd

A system libvirtd, if one runs, never sees any of it, and ours never sees the system one. Clients
connect from outside the namespace through `qemu:///system?socket=<base>/run/libvirt-sock`.

Processes: a namespace holder (`unshare --mount ... sh`), then `nsenter -t <holder> -m virtlogd` and
`... libvirtd`. All three get PR_SET_PDEATHSIG(SIGTERM), and the holder kills the QEMU processes
listed in `base/run/qemu/*.pid` when it gets SIGTERM, so even a test runner killed with SIGKILL leaves
no daemon and no QEMU behind. `stop()` destroys the domains, then stops libvirtd, virtlogd and the holder.

QEMU runs as root with no security driver and no cgroups (`qemu.conf` below): test images live
under directories like /tmp/pytest-of-root (mode 0700) that the libvirt-qemu user cannot reach.

The first API call blocks while libvirtd probes the QEMU binaries (about 8 s on a 2-core machine with
an empty cache, well under 1 s with a warm `cache_dir`); `start_libvirtd` makes it and records the
time in `first_call_seconds`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from tools.qemu import UNIX_PATH_MAX, fits_unix_socket

log = logging.getLogger(__name__)


_BINDS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)

LIBVIRTD_CONF = """\
# private lab libvirtd: root-only sockets, no authentication (the socket dir is private)
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
listen_tls = 0
listen_tcp = 0
log_outputs = "3:stderr"
"""

QEMU_CONF = """\
# private lab QEMU driver: QEMU runs as root, no relabelling, no cgroups (none are delegated here)
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
"""

VIRTLOGD_CONF = """\
log_outputs = "3:stderr"
"""

_PR_SET_PDEATHSIG = 1


def _term_with_parent() -> None:  # runs in the child between fork and exec
    with suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _quiet_libvirt() -> None:
    """libvirt prints every error to stderr by default; errors reach us as exceptions anyway."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install libvirt-daemon-system libvirt-clients)")
    return path


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _wait_for(cond: Any, timeout: float, what: str, proc: subprocess.Popen[bytes], logf: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(logf)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: timed out after {timeout:.0f} s")
        time.sleep(0.05)


class LabLibvirtd:
    """A running private libvirtd. Use `start_libvirtd` or the `libvirtd` context manager."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.holder: subprocess.Popen[bytes] | None = None
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None
        self.first_call_seconds: float | None = None
        self._logs: list[Any] = []

    # ------------------------------------------------------------------ public

    def connect(self) -> libvirt.virConnect:
        _quiet_libvirt()
        return libvirt.open(self.uri)

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    def domain_log(self, name: str) -> Path:
        return self.base / "log" / "qemu" / f"{name}.log"

    def qemu_pids(self) -> list[int]:
        pids = []
        for f in (self.base / "run" / "qemu").glob("*.pid"):
            with suppress(OSError, ValueError):
                pids.append(int(f.read_text().strip()))
        return pids

    def stop(self, timeout: float = 30) -> None:
        """Destroy every domain, stop libvirtd, virtlogd and the namespace. Idempotent."""
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            try:
                self._destroy_domains(timeout)
            except Exception as e:  # noqa: BLE001 - best effort: the pid files below are the backstop
                log.warning("lab libvirtd %s: could not destroy domains cleanly: %s", self.base, e)
        self._terminate(self.libvirtd, timeout)
        for pid in self.qemu_pids():  # anything libvirtd did not take down
            _kill_if_qemu(pid)
        self._terminate(self.virtlogd, timeout)
        self._terminate(self.holder, timeout)
        for f in self._logs:
            with suppress(OSError):
                f.close()
        self._logs.clear()

    def __enter__(self) -> LabLibvirtd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _destroy_domains(self, timeout: float) -> None:
        done = threading.Event()
        err: list[BaseException] = []

        def work() -> None:
            try:
                conn = self.connect()
                try:  # in parallel: libvirt takes over a second to tear each QEMU down
                    doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                    threads = [
                        threading.Thread(target=_destroy_quietly, args=(d,), daemon=True) for d in doms
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                finally:
                    conn.close()
            except BaseException as e:  # noqa: BLE001
                err.append(e)
            finally:
                done.set()

        threading.Thread(target=work, daemon=True, name="lab-libvirtd-stop").start()
        if not done.wait(timeout):
            raise RuntimeError("destroying domains timed out")
        if err:
            raise err[0]

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
        if proc is None or proc.poll() is not None:
            if proc is not None:
                proc.wait()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _destroy_quietly(dom: libvirt.virDomain) -> None:
    with suppress(libvirt.libvirtError):
        dom.destroy()


def _kill_if_qemu(pid: int) -> None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"qemu" not in cmd.split(b"\0", 1)[0]:
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def start_libvirtd(
    base: Path, *, cache_dir: Path | None = None, timeout: float = 180, host_uuid: str | None = None
) -> LabLibvirtd:
    """Start a private libvirtd + virtlogd under `base` (created if needed) and make the first call.

    `cache_dir`, if given, holds the QEMU capabilities cache across runs (libvirt re-probes when the
    QEMU or libvirtd binaries change), which cuts the first call from seconds to well under one.
    `host_uuid`, if given, is the host UUID this libvirtd reports (libvirtd.conf `host_uuid`): two lab
    libvirtds on one machine then count as two hosts, and a domain can migrate between them.
    """
    if os.geteuid() != 0:
        raise RuntimeError("the lab libvirtd runs as root (it needs a private mount namespace)")
    base = Path(base).absolute()
    lab = LabLibvirtd(base)
    if not fits_unix_socket(lab.socket):
        raise ValueError(f"lab libvirtd base {base} is too long: {lab.socket} exceeds {UNIX_PATH_MAX} bytes")
    unshare, nsenter, virtlogd, libvirtd = (_tool(t) for t in ("unshare", "nsenter", "virtlogd", "libvirtd"))

    for sub, _ in _BINDS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "etc" / "qemu").mkdir(exist_ok=True)
    (base / "etc" / "libvirtd.conf").write_text(
        LIBVIRTD_CONF + (f'host_uuid = "{host_uuid}"\n' if host_uuid else "")
    )
    (base / "etc" / "qemu.conf").write_text(QEMU_CONF)
    (base / "etc" / "virtlogd.conf").write_text(VIRTLOGD_CONF)
    for stale in ("ns.ready", "libvirtd.pid", "virtlogd.pid"):
        (base / stale).unlink(missing_ok=True)
    for sock in (base / "run").glob("*sock*"):
        sock.unlink(missing_ok=True)
    binds: list[tuple[Path, str]] = [(base / sub, mnt) for sub, mnt in _BINDS]
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        binds = [
            (Path(cache_dir).absolute() if mnt == "/var/cache/libvirt" else src, mnt) for src, mnt in binds
        ]
    for _, mnt in binds:
        os.makedirs(mnt, exist_ok=True)  # mount points; only /run/libvirt may be missing on a Debian host

    q = shlex.quote
    mounts = "\n".join(f"mount --bind {q(str(src))} {q(mnt)}" for src, mnt in binds)
    pidglob = q(str(base / "run" / "qemu")) + "/*.pid"
    script = f"""set -e
{mounts}
: > {q(str(base / "ns.ready"))}
set +e
reap() {{
  for f in {pidglob}; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done
  kill "$!" 2>/dev/null
  exit 0
}}
trap reap TERM INT HUP
while :; do sleep 1 & wait $!; done
"""

    def spawn(cmd: list[str], logname: str) -> subprocess.Popen[bytes]:
        f = open(base / logname, "ab")  # noqa: SIM115 - closed in stop()
        lab._logs.append(f)
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_term_with_parent
        )

    t0 = time.monotonic()
    try:
        lab.holder = spawn(
            [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script], "holder.log"
        )
        _wait_for((base / "ns.ready").exists, 10, "lab namespace holder", lab.holder, base / "holder.log")
        enter = [nsenter, "-t", str(lab.holder.pid), "-m", "--"]
        lab.virtlogd = spawn(
            [*enter, virtlogd, "-f", str(base / "etc" / "virtlogd.conf"), "-p", str(base / "virtlogd.pid")],
            "virtlogd.log",
        )
        _wait_for(
            (base / "run" / "virtlogd-sock").exists, 20, "virtlogd", lab.virtlogd, base / "virtlogd.log"
        )
        lab.libvirtd = spawn(
            [*enter, libvirtd, "-f", str(base / "etc" / "libvirtd.conf"), "-p", str(base / "libvirtd.pid")],
            "libvirtd.log",
        )
        _wait_for(lab.socket.exists, 30, "libvirtd", lab.libvirtd, base / "libvirtd.log")
        t1 = time.monotonic()
        _first_call(lab, max(10.0, timeout - (t1 - t0)))
        lab.first_call_seconds = time.monotonic() - t1
        log.info(
            "lab libvirtd %s: up in %.1f s (first call %.1f s)",
            base,
            time.monotonic() - t0,
            lab.first_call_seconds,
        )
    except BaseException:
        lab.stop(timeout=10)
        raise
    return lab


def _first_call(lab: LabLibvirtd, timeout: float) -> None:
    """Open a connection and ask for the capabilities; libvirtd answers once it has probed QEMU."""
    result: list[BaseException | None] = []

    def work() -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = lab.connect()
                try:
                    conn.getVersion()
                    conn.getCapabilities()
                finally:
                    conn.close()
                result.append(None)
                return
            except libvirt.libvirtError as e:
                if time.monotonic() > deadline:
                    result.append(e)
                    return
                time.sleep(0.2)

    th = threading.Thread(target=work, daemon=True, name="lab-libvirtd-first-call")
    th.start()
    deadline = time.monotonic() + timeout
    while th.is_alive() and time.monotonic() < deadline:
        if lab.libvirtd is not None and lab.libvirtd.poll() is not None:
            raise RuntimeError(
                f"libvirtd exited with {lab.libvirtd.returncode}: {_tail(lab.base / 'libvirtd.log')}"
            )
        th.join(0.1)
    if th.is_alive():
        raise RuntimeError(
            f"libvirtd did not answer within {timeout:.0f} s: {_tail(lab.base / 'libvirtd.log')}"
        )
    if result and result[0] is not None:
        raise RuntimeError(f"libvirtd at {lab.uri} refused connections: {result[0]}")


@contextmanager
def libvirtd(base: Path, **kw: Any) -> Iterator[LabLibvirtd]:
    lab = start_libvirtd(base, **kw)
    try:
        yield lab
    finally:
        lab.stop()


# ------------------------------------------------------------------------------------------ domains


def disk_target(index: int) -> str:
    """vda, vdb, ... vdz, vdaa, ..."""
    letters = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "vd" + letters


def lab_domain_xml(name: str, disk_paths: Sequence[Path], *, memory_mib: int = 64, fmt: str = "qcow2") -> str:
    """A `<domain type='qemu'>` (TCG) with the images as virtio disks vda, vdb, ...; no OS, no NIC."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devs = ET.SubElement(dom, "devices")
    ET.SubElement(devs, "emulator").text = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    for i, p in enumerate(disk_paths):
        d = ET.SubElement(devs, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type=fmt)
        ET.SubElement(d, "source", file=str(Path(p).absolute()))
        ET.SubElement(d, "target", dev=disk_target(i), bus="virtio")
    ET.SubElement(devs, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def define_lab_domain(
    conn: libvirt.virConnect,
    name: str,
    disk_paths: Sequence[Path],
    *,
    memory_mib: int = 64,
    fmt: str = "qcow2",
    start: bool = True,
) -> libvirt.virDomain:
    """Define (persistently) and start a TCG domain over the images. It sits in the firmware."""
    dom = conn.defineXML(lab_domain_xml(name, disk_paths, memory_mib=memory_mib, fmt=fmt))
    if start:
        try:
            dom.create()
        except libvirt.libvirtError:
            with suppress(libvirt.libvirtError):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            raise
    return dom


def remove_lab_domain(dom: libvirt.virDomain) -> None:
    """Destroy (if running) and undefine, with its checkpoint and snapshot metadata. Idempotent."""
    with suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with suppress(libvirt.libvirtError):
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )


def device_alias(dom: libvirt.virDomain, target: str) -> str:
    """The QEMU device id libvirt gave the disk `target` (e.g. vda -> virtio-disk0)."""
    root = ET.fromstring(dom.XMLDesc(0))
    for d in root.findall("./devices/disk"):
        t = d.find("target")
        a = d.find("alias")
        if t is not None and t.get("dev") == target and a is not None:
            return str(a.get("name"))
    raise KeyError(f"domain {dom.name()} has no running disk {target}")


def hmp(dom: libvirt.virDomain, command: str) -> str:
    return str(
        libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    )


def _qemu_io(dom: libvirt.virDomain, target: str, io_cmd: str, offset: int, length: int) -> None:
    # qemu-io prints its own results (and I/O errors) on QEMU's stdout, not on the monitor: only a bad
    # device or command comes back here, so check the range first.
    size = int(dom.blockInfo(target)[0])
    if offset < 0 or length <= 0 or offset + length > size or offset % 512 or length % 512:
        raise ValueError(
            f"{dom.name()}:{target}: bad range {length}@{offset} (disk size {size}, 512-byte units)"
        )
    qdev = f"/machine/peripheral/{device_alias(dom, target)}/virtio-backend"
    out = hmp(dom, f'qemu-io -d {qdev} "{io_cmd}"').strip()
    if out:
        raise RuntimeError(f"qemu-io {io_cmd!r} on {dom.name()}:{target}: {out}")


def guest_write(dom: libvirt.virDomain, disk_target: str, offset: int, length: int, pattern: int) -> None:
    """Write `length` bytes of `pattern` at `offset` through the guest's own virtio-blk backend, as
    the guest would: dirty bitmaps, backup copy-before-write filters and all see it."""
    _qemu_io(dom, disk_target, f"write -P 0x{pattern & 0xFF:02x} {offset} {length}", offset, length)


def guest_write_zeroes(dom: libvirt.virDomain, disk_target: str, offset: int, length: int) -> None:
    """A guest write-zeroes (WRITE ZEROES / discard-like): dirty in bitmaps, zero in allocation."""
    _qemu_io(dom, disk_target, f"write -z {offset} {length}", offset, length)


__all__ = [
    "LabLibvirtd",
    "start_libvirtd",
    "libvirtd",
    "define_lab_domain",
    "remove_lab_domain",
    "lab_domain_xml",
    "device_alias",
    "disk_target",
    "guest_write",
    "guest_write_zeroes",
    "hmp",
]
