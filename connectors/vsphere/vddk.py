"""Reading (and writing) vSphere disks through nbdkit's `vddk` plugin, as backup products do.

The command line is VDDK's: `nbdkit [-r] vddk libdir=... server=... port=... user=...
password=+FILE thumbprint=... vm=moref=vm-N [snapshot=snapshot-N] file="[ds] dir/name.vmdk"
transports=nbdssl:nbd`. Which plugin runs is the agent's own setting, never a spec's (a spec naming a
program would make the agent run it): `SENDENSE_VDDK_PLUGIN`, default `vddk`; a path ending in `.py`
runs as an nbdkit Python plugin (the vSphere lab's stand-in, labs/vsphere/vddk_standin.py, which takes
the same parameters). `SENDENSE_VDDK_LIBDIR` is the agent's VDDK when the spec gives none.

The password goes to nbdkit through a pipe (`password=+/dev/fd/N`): never on a command line, in a
file, or in an error. nbdkit serves on a unix socket in a private directory and dies with this process
(`--exit-with-parent`), so a killed worker leaks no nbdkit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nbd  # (python3-libnbd)

from sendense.errors import ResourceUnavailable, SendenseError
from tools.qemu import die_with_parent, tool, wait_exit

PLUGIN_ENV = "SENDENSE_VDDK_PLUGIN"
LIBDIR_ENV = "SENDENSE_VDDK_LIBDIR"
START_TIMEOUT = 120.0  # VDDK's connect and open over NFC take seconds on a busy vCenter


@dataclass(frozen=True)
class VddkTarget:
    """What VDDK opens: on which server, which VM, which snapshot (None: the VM's current disk), which
    file."""

    host: str
    port: int
    user: str
    password: str
    thumbprint: str  # SHA-1, AA:BB:... (VDDK's form)
    vm: str  # moref value, e.g. vm-42
    file: str  # "[datastore] dir/name.vmdk"
    snapshot: str | None = None
    transports: tuple[str, ...] = ("nbdssl", "nbd")
    libdir: Path | None = None
    plugin: tuple[str, ...] = ("vddk",)


def plugin_words(env: Mapping[str, str]) -> tuple[str, ...]:
    """The plugin the agent runs (its environment `env`): nbdkit's vddk, or a Python plugin."""
    plugin = env.get(PLUGIN_ENV) or "vddk"
    return ("python", plugin) if plugin.endswith(".py") else (plugin,)


def agent_libdir(spec_libdir: Path | None, env: Mapping[str, str]) -> Path | None:
    return spec_libdir or (Path(env[LIBDIR_ENV]) if env.get(LIBDIR_ENV) else None)


def arguments(t: VddkTarget, password_fd: int) -> list[str]:
    """The plugin's key=value parameters (the password by file descriptor)."""
    args = [f"libdir={t.libdir}"] if t.libdir is not None else []
    args += [
        f"server={t.host}",
        f"port={t.port}",
        f"user={t.user}",
        f"password=+/dev/fd/{password_fd}",
        f"thumbprint={t.thumbprint}",
        f"vm=moref={t.vm}",
        f"file={t.file}",
        f"transports={':'.join(t.transports)}",
    ]
    if t.snapshot is not None:
        args.append(f"snapshot={t.snapshot}")
    return args


class VddkServer:
    """An nbdkit process serving one disk on a private unix socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: Path, tmpdir: str) -> None:
        self.proc, self.socket, self._tmpdir = proc, sock, tmpdir

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def stop_process(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # (nbdkit exits once its clients have gone)
            if not wait_exit(self.proc, 30):
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.stop_process()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def start(t: VddkTarget, label: str, *, readonly: bool = True, connections: int = 16) -> VddkServer:
    """Start nbdkit on `t` and open the disk once (VDDK connects, checks the thumbprint and the login
    and opens the file when a client connects); `label` names the disk in errors (the VM and the disk,
    never a socket)."""
    tmpdir = tempfile.mkdtemp(prefix="sendense-vddk-")
    sock = Path(tmpdir) / "nbd.sock"
    pidfile = Path(tmpdir) / "pid"  # written once nbdkit serves
    log = open(Path(tmpdir) / "stderr", "w+b")  # noqa: SIM115 (nbdkit's messages, read on failure)
    r, w = os.pipe()
    try:
        cmd = [tool("nbdkit"), "--foreground", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile)]
        cmd += ["--threads", str(connections), *(["-r"] if readonly else []), *t.plugin]
        cmd += arguments(t, r)
        proc = subprocess.Popen(die_with_parent(cmd), stdout=subprocess.DEVNULL, stderr=log, pass_fds=(r,))
    except BaseException:
        os.close(w)
        log.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    finally:
        os.close(r)
    try:
        os.write(w, t.password.encode() + b"\n")
    finally:
        os.close(w)
    srv = VddkServer(proc, sock, tmpdir)

    def failed(why: str) -> SendenseError:
        srv.stop_process()
        log.seek(0)
        err = log.read().decode(errors="replace")
        log.close()
        srv.stop()
        return SendenseError(f"{label}: VDDK could not open the disk: {_last_error(err, t.password) or why}")

    deadline = time.monotonic() + START_TIMEOUT
    pause = 0.002
    while not (pidfile.exists() and sock.exists()):
        if proc.poll() is not None:
            raise failed("nbdkit exited")
        if time.monotonic() > deadline:
            proc.kill()
            log.close()
            srv.stop()
            raise ResourceUnavailable(f"{label}: VDDK did not open the disk in {START_TIMEOUT:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    for attempt in range(20):  # (the socket may exist a moment before nbdkit accepts on it)
        try:
            probe = nbd.NBD()
            probe.connect_uri(srv.uri)
            probe.shutdown()
            break
        except nbd.Error as e:
            if proc.poll() is not None or attempt == 19 or "refused" not in (e.string or "").lower():
                raise failed(e.string or "the connection failed") from None
            time.sleep(0.01 * (attempt + 1))
    log.close()
    return srv


def _last_error(stderr: str, password: str) -> str:
    """nbdkit's last error line, without its prefixes, never the password."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()] or lines or [""]
    line = re.sub(r"^(nbdkit: )?([\w.-]+\[\d+\]: )?(error: )?", "", errs[-1])
    if len(password) >= 4:  # (a shorter one would mask ordinary words)
        line = line.replace(password, "***")
    return line[:400]


@contextmanager
def serving(t: VddkTarget, label: str, *, readonly: bool = True) -> Iterator[VddkServer]:
    srv = start(t, label, readonly=readonly)
    try:
        yield srv
    finally:
        srv.stop()
