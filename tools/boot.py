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
    with its parent (setpriv --pdeathsig) and with `stop()`."""

    def __init__(
        self, disk: Path, work: Path, *, mode: str = "boot", memory_mib: int = 256, qmp: Path | None = None
    ) -> None:
        self.disk, self.work, self.mode, self.memory_mib = disk, work, mode, memory_mib
        self.qmp = qmp  # a QMP socket for a source to replicate the running VM through
        self.console = work / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> GuestVm:
        self.work.mkdir(parents=True, exist_ok=True)
        self.console.write_bytes(b"")
        cmd = [
            "setpriv", "--pdeathsig", "KILL", "--",
            _qemu(), "-accel", accelerator(), "-m", str(self.memory_mib), "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot", "-boot", "reboot-timeout=0",  # no boot: exit
            "-serial", f"file:{self.console}",
            "-drive", f"file={self.disk},if=virtio,format=qcow2,cache=unsafe",
            "-fw_cfg", f"name=opt/sendense/mode,string={self.mode}",
        ]  # fmt: skip
        if self.qmp is not None:
            cmd += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.started = time.monotonic()
        return self

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str = READY, timeout: float = 120.0) -> BootCheck:
        """Until `pattern` shows on the console (ok), an error line shows, the VM exits, or `timeout`."""
        assert self.proc is not None, "start() first"
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
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                last = (err.splitlines() or text.strip().splitlines() or ["no console output"])[-1]
                return BootCheck(False, seconds, f"VM exited ({self.proc.returncode}): {last}", seq)
            if time.monotonic() > deadline:
                last = (text.strip().splitlines() or ["no console output"])[-1]
                return BootCheck(
                    False, seconds, f"no {pattern!r} after {timeout:.0f}s; last line: {last}", seq
                )
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> GuestVm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def overlay(backing: Path, path: Path) -> Path:
    """A qcow2 overlay on `backing`, so that booting (journal replay, the workload) never changes it."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()), "-F", "qcow2", str(path)],
        check=True,
        capture_output=True,
    )
    return path
