"""The QEMU processes that run the lab's instances: one VM per running instance, on its volumes' data.

An instance's VM boots through its root volume's own boot sectors (SeaBIOS, then whatever the volume
holds), with every attached volume as a virtio disk served by the lab's NBD server (`labs.aws.nbd`):
the root first (boot index 0), then the others in device order, each with the volume id as its serial
(`vol0123...`, as Nitro's NVMe disks show it). Guest writes land in the volumes as they happen.

- Acceleration: `tools.boot.accelerator()` (KVM only where a probe VM really runs with it, else TCG).
  Every VM gets 1 vCPU and 256 MiB whatever its instance type (the lab shares a small machine).
- Console: the serial port goes to `DIR/instances/<id>/console.log`, started afresh at each start;
  SeaBIOS writes its own messages there too (`etc/sercon-port`), so a volume that does not boot says
  why ("No bootable device."). QEMU's own messages go to `qemu.log` beside it.
- Processes: spawned from one long-lived thread with PDEATHSIG (`tools.qemu.die_with_parent`), so every
  VM dies with the lab, however the lab ends (the signal follows the spawning *thread*: a request
  thread would kill its VM when it ends). `stop` kills (a power cut: the volumes hold what was written).
- `-no-reboot`: a VM that resets or powers off exits; the lab then reports its instance stopped by the
  guest (`on_exit`), as EC2 does for a guest shutdown. A guest that reboots in a loop (a kernel panic)
  thus stops instead of spinning; a firmware that finds nothing to boot waits, as on EC2.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

from tools.boot import accelerator
from tools.qemu import die_with_parent, tool

log = logging.getLogger(__name__)

MEMORY_MIB = 256
CONSOLE_LIMIT = 64 << 10  # GetConsoleOutput returns the most recent 64 KiB, as EC2
# what a console shows when an instance cannot boot (firmware, bootloader, kernel): instance status
# checks fail then, as EC2's reachability check fails for a guest that never comes up
BOOT_FAILURE = re.compile(rb"(No bootable device\.?|Kernel panic[^\r\n]*)\r?\n")  # whole lines only


@dataclass
class Machine:
    instance_id: str
    disks: list[str]  # volume ids, root first
    proc: subprocess.Popen[bytes]
    console: Path
    started: float = field(default_factory=time.time)
    stopping: bool = False  # stopped by the lab (Stop/Terminate), not by the guest

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class Machines:
    def __init__(self, root: Path, nbd_socket: Path, on_exit: Callable[[Machine], None]) -> None:
        self.dir = root / "instances"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nbd_socket = nbd_socket
        self.on_exit = on_exit
        self.lock = threading.Lock()
        self.machines: dict[str, Machine] = {}
        self._sercon = root / "sercon-port"  # fw_cfg etc/sercon-port: COM1 (0x3f8), little-endian
        self._sercon.write_bytes(b"\xf8\x03")
        self._jobs: Queue[tuple[Callable[[], Any], Future[Any]]] = Queue()
        threading.Thread(target=self._spawner, name="lab-vm-spawner", daemon=True).start()
        threading.Thread(target=accelerator, name="lab-accel-probe", daemon=True).start()  # ~1 s, once

    def _spawner(self) -> None:
        """Runs every spawn: the VMs' parent thread for PDEATHSIG, alive as long as the lab process."""
        while True:
            job, done = self._jobs.get()
            try:
                done.set_result(job())
            except BaseException as e:  # handed to the caller
                done.set_exception(e)

    def _in_spawner(self, job: Callable[[], Any]) -> Any:
        done: Future[Any] = Future()
        self._jobs.put((job, done))
        return done.result()

    # ------------------------------------------------------------------ lifecycle

    def start(self, instance_id: str, disks: list[str]) -> Machine:
        """Start the instance's VM on `disks` (volume ids, root first); a running one stays as it is."""
        with self.lock:
            current = self.machines.get(instance_id)
            if current is not None and current.alive:
                return current
            work = self.dir / instance_id
            work.mkdir(parents=True, exist_ok=True)
            console = work / "console.log"
            console.write_bytes(b"")
            cmd = self._command(instance_id, disks, console)
            with open(work / "qemu.log", "ab") as err:
                proc: subprocess.Popen[bytes] = self._in_spawner(
                    lambda: subprocess.Popen(
                        die_with_parent(cmd), stdin=subprocess.DEVNULL, stdout=err, stderr=err
                    )
                )
            machine = Machine(instance_id, list(disks), proc, console)
            self.machines[instance_id] = machine
        threading.Thread(target=self._watch, args=(machine,), name=f"vm-{instance_id}", daemon=True).start()
        log.info("instance %s: VM started (pid %d) on %s", instance_id, proc.pid, ", ".join(disks) or "-")
        return machine

    def _command(self, instance_id: str, disks: list[str], console: Path) -> list[str]:
        cmd = [
            tool("qemu-system-x86_64"), "-name", instance_id, "-accel", accelerator(),
            "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{console}", "-fw_cfg", f"name=etc/sercon-port,file={self._sercon}",
        ]  # fmt: skip
        for i, volume_id in enumerate(disks):
            cmd += [
                "-drive",
                f"file.driver=nbd,file.server.type=unix,file.server.path={self.nbd_socket},"
                f"file.export={volume_id},format=raw,if=none,id=disk{i}",
                "-device",
                f"virtio-blk-pci,drive=disk{i},serial={volume_id.replace('-', '')[:20]},bootindex={i}",
            ]
        return cmd

    def _watch(self, machine: Machine) -> None:
        machine.proc.wait()
        if not machine.stopping:
            log.info("instance %s: the VM exited (%s): the guest stopped", machine.instance_id,
                     machine.proc.returncode)  # fmt: skip
            self.on_exit(machine)

    def stop(self, instance_id: str) -> None:
        """Kill the instance's VM (gone already: nothing to do)."""
        with self.lock:
            machine = self.machines.get(instance_id)
            if machine is None:
                return
            machine.stopping = True
        if machine.alive:
            machine.proc.kill()
            log.info("instance %s: VM killed", instance_id)
        machine.proc.wait()

    def close(self) -> None:
        for instance_id in list(self.machines):
            self.stop(instance_id)

    # ------------------------------------------------------------------ what the VM shows

    def current(self, instance_id: str) -> Machine | None:
        with self.lock:
            return self.machines.get(instance_id)

    def console(self, instance_id: str) -> tuple[bytes, float | None]:
        """The most recent 64 KiB of the instance's console and when it last changed (None: never ran)."""
        path = self.dir / instance_id / "console.log"
        try:
            with open(path, "rb") as f:
                size = path.stat().st_size
                f.seek(max(0, size - CONSOLE_LIMIT))
                return f.read(), path.stat().st_mtime
        except FileNotFoundError:
            return b"", None

    def boot_failure(self, instance_id: str) -> str | None:
        """The console line that says the instance cannot boot, if one does."""
        text, _ = self.console(instance_id)
        found = BOOT_FAILURE.search(text)
        return found.group(1).decode(errors="replace").strip() if found else None

    def describe(self, instance_id: str) -> dict[str, Any]:
        machine = self.current(instance_id)
        if machine is None:
            return {"instance_id": instance_id, "running": False, "pid": None, "disks": []}
        return {
            "instance_id": instance_id,
            "running": machine.alive,
            "pid": machine.proc.pid,
            "disks": machine.disks,
            "console": str(machine.console),
            "returncode": machine.proc.returncode,
        }
