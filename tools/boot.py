"""Boot a disk under QEMU and watch its serial console: the boot check of drills and labs.

The VM boots through the disk's own MBR and bootloader (never `-kernel`: that would not prove the
boot sectors were replicated). Its mode comes from fw_cfg, outside the disk. Acceleration: KVM only
when a probe VM really starts with it (here /dev/kvm exists but fails), else TCG.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

READY = "SENDENSE-GUEST-READY"
BOOTED = re.compile(r"SENDENSE-GUEST-BOOTED mode=(\w+) seq=(\d+)")
ERROR = re.compile(
    r"SENDENSE-GUEST-ERROR[^\n]*|Kernel panic[^\n]*|No bootable device[^\n]*|Boot failed[^\n]*"
)

# what a platform's console output shows when a guest cannot boot (AWS GetConsoleOutput, a vSphere
# serial port file): the boot check decides a failure on it
BOOT_FAILURE = re.compile(r"No bootable device\.?|Kernel panic[^\n]*")
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[@-Z\\-_])")


def console_lines(text: str) -> list[str]:
    """A console's text as lines, without terminal escapes and carriage returns, blank lines dropped."""
    return [ln.strip() for ln in _ESCAPES.sub("", text).replace("\r", "").splitlines() if ln.strip()]


@dataclass
class BootCheck:
    ok: bool
    seconds: float
    evidence: str  # the console line that decided it (or why nothing did)
    seq: int | None = None  # the workload's sequence counter at boot


@functools.lru_cache(maxsize=1)
def accelerator() -> str:
    """`kvm` if a throwaway VM really runs with it, else `tcg`. /dev/kvm's presence proves nothing
    (here it exists and fails: "failed to set MSR", "KVM internal error"). SENDENSE_ACCEL overrides."""
    forced = os.environ.get("SENDENSE_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not Path("/dev/kvm").exists():
        return "tcg"
    cmds = b'{"execute":"qmp_capabilities"}\n{"execute":"cont"}\n'
    try:
        p = subprocess.Popen(
            [
                _qemu(),
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-nodefaults",
                "-display",
                "none",
                "-m",
                "32",
                "-S",
                "-qmp",
                "stdio",
            ],  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert p.stdin is not None
        p.stdin.write(cmds)
        p.stdin.flush()
        time.sleep(0.5)
        p.stdin.write(b'{"execute":"query-status"}\n{"execute":"quit"}\n')
        p.stdin.flush()
        out, _ = p.communicate(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        p.kill()
        return "tcg"
    return "kvm" if b'"status": "running"' in out else "tcg"


def _qemu() -> str:
    q = shutil.which("qemu-system-x86_64")
    if q is None:
        raise RuntimeError("qemu-system-x86_64 is not installed (run scripts/install.sh)")
    return q


class GuestVm:
    """One QEMU VM on a disk image (qcow2), serial console to `work/console.log`. The process dies
    with its parent (setpriv --pdeathsig) and with `stop()`; a `detached` one outlives its parent
    (the demo's VM, which its job keeps replicating) and is stopped by `stop_detached(work)`."""

    def __init__(
        self,
        disk: Path,
        work: Path,
        *,
        mode: str = "boot",
        memory_mib: int = 256,
        qmp: Path | None = None,
        detached: bool = False,
    ) -> None:
        self.disk, self.work, self.mode, self.memory_mib = disk, work, mode, memory_mib
        self.qmp = qmp  # a QMP socket for a source to replicate the running VM through
        self.console = work / "console.log"
        self.detached = detached
        self.pidfile = work / "qemu.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.started = 0.0

    def start(self) -> GuestVm:
        self.work.mkdir(parents=True, exist_ok=True)
        self.console.write_bytes(b"")
        cmd = [
            *([] if self.detached else ["setpriv", "--pdeathsig", "KILL", "--"]),
            _qemu(), "-accel", accelerator(), "-m", str(self.memory_mib), "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot", "-boot", "reboot-timeout=0",  # no boot: exit
            "-serial", f"file:{self.console}",
            "-drive", f"file={self.disk},if=virtio,format=qcow2,cache=unsafe",
            "-fw_cfg", f"name=opt/sendense/mode,string={self.mode}",
        ]  # fmt: skip
        if self.qmp is not None:
            cmd += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        self.started = time.monotonic()
        if self.detached:  # QEMU forks itself off once it is set up; its pid file finds it again
            self.pidfile.unlink(missing_ok=True)
            cmd += [
                "-daemonize",
                "-pidfile",
                str(self.pidfile),
                "-name",
                f"sendense-guest,process={self.work}",
            ]
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"guest VM on {self.disk} did not start: {last}")
            self.pid = _detached_pid(self.work)
            return self
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        return self

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _detached_pid(self.work) == self.pid

    @staticmethod
    def stop_detached(work: Path, timeout: float = 10) -> bool:
        """Stop the detached guest VM started in `work` (by its pid file, checking the process is that
        VM: a recycled pid is never killed). False if none was running."""
        pid = _detached_pid(work)
        if pid is None:
            return False
        os.kill(pid, 9)
        deadline = time.monotonic() + timeout
        while _detached_pid(work) == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        (work / "qemu.pid").unlink(missing_ok=True)
        return True

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str = READY, timeout: float = 120.0) -> BootCheck:
        """Until `pattern` shows on the console (ok), an error line shows, the VM exits, or `timeout`."""
        assert self.proc is not None or self.pid is not None, "start() first"
        deadline = self.started + timeout
        while True:
            text = self.text()
            seconds = round(time.monotonic() - self.started, 2)
            booted = BOOTED.search(text)
            seq = int(booted.group(2)) if booted else None
            if pattern in text:
                line = next(ln for ln in text.splitlines() if pattern in ln)
                return BootCheck(True, seconds, line.strip(), seq)
            bad = ERROR.search(text)
            if bad:
                return BootCheck(False, seconds, bad.group(0).strip(), seq)
            if not self.running():
                proc = self.proc
                err = proc.stderr.read().decode(errors="replace").strip() if proc and proc.stderr else ""
                last = (err.splitlines() or text.strip().splitlines() or ["no console output"])[-1]
                code = proc.returncode if proc is not None else "?"
                return BootCheck(False, seconds, f"VM exited ({code}): {last}", seq)
            if time.monotonic() > deadline:
                last = (text.strip().splitlines() or ["no console output"])[-1]
                return BootCheck(
                    False, seconds, f"no {pattern!r} after {timeout:.0f}s; last line: {last}", seq
                )
            time.sleep(0.2)

    def stop(self) -> None:
        if self.detached:
            GuestVm.stop_detached(self.work)
            return
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> GuestVm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _detached_pid(work: Path) -> int | None:
    """The pid in `work`'s pid file if that process is the guest VM started there (its command line
    names `work`), else None."""
    try:
        pid = int((work / "qemu.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if f"sendense-guest,process={work}".encode() in cmdline.split(b"\0") else None  # (whole arg)


def overlay(backing: Path, path: Path) -> Path:
    """A qcow2 overlay on `backing`, so that booting (journal replay, the workload) never changes it."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()), "-F", "qcow2", str(path)],
        check=True,
        capture_output=True,
    )
    return path
