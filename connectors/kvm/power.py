"""The KVM source VM's power (sendense.protocols.SourcePower), for each form of the source spec.

- Stopped VM (`disks`): the product knows the VM only by its images, so there is nothing to pause,
  stop or start. `power_state` is "stopped" while no process holds an image for writing (QEMU's
  image locks, probed read-only with `qemu-img info` without `-U`, which fails on a writer's lock),
  "running" while one does (a VM started outside the product), "gone" when an image is missing.
  pause and power-off are no-ops on stopped images and refuse, in one line, images a process writes
  (pretending to have paused them would let writes land after a final sync). power-on raises
  VmNotStartable: the disks are current, and the VM is the operator's to start.
- Running VM over QMP (`qmp`): QMP `stop` pauses (it returns once every disk's in-flight I/O is
  drained and flushed: nothing the guest does lands after it), `cont` resumes. Power-off is QMP
  `quit`, then a wait until the QEMU process (found by the socket's SO_PEERCRED) has exited. Why not
  `system_powerdown`: at power-off the failover has paused the VM and taken the final sync; a guest
  shutdown would need the vCPUs to run again, and its writes (journal commits, logs, unmounts) would
  land after the final point, so the source disks would no longer be the point the failed-over VM
  started from (a failback diffs against exactly that); a guest without an ACPI handler (the lab's)
  never answers it either. `quit` is hard for the guest (a power cut at the paused instant, which the
  final point already is) and clean for QEMU: its I/O is drained and flushed and its persistent dirty
  bitmaps are stored in the images (a kill would leave them inconsistent, and the job's change
  tracking with them). A bare QEMU cannot be started by the product (its command line is the
  operator's): power-on raises VmNotStartable.
- libvirt domain (`libvirt`): `connectors.kvm.power_libvirt`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from connectors.kvm.live_disks import recorded
from connectors.kvm.offline import OfflineQcow2Source
from connectors.kvm.spec import KvmSource
from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError, VmNotStartable
from sendense.protocols import PowerState, SourcePower
from tools.qemu import tool
from tools.qmp import QmpClient, VmNotRunning

log = logging.getLogger(__name__)

STATE_SECONDS = 5.0  # power_state answers within about this (per image, per QMP exchange)
WAIT_SECONDS = 60.0  # for the monitor (another job's step may hold it) and for QEMU to exit

# QEMU run states (query-status) that are a VM off: it must be reset, which is the operator's
QEMU_OFF = ("shutdown", "guest-panicked", "internal-error")


def qemu_state(status: str) -> PowerState:
    """A QEMU run state as a power state: running, off (see QEMU_OFF), or paused (every other state
    has no vCPU running: paused, prelaunch, suspended, io-error, migration states...)."""
    if status == "running":
        return "running"
    return "stopped" if status in QEMU_OFF else "paused"


def make_kvm_power(job: str, spec: KvmSource, work_dir: Path) -> SourcePower:
    if spec.disks is not None:
        return DisksPower(job, spec.disks)
    if spec.qmp is not None:
        return QmpPower(spec.qmp, work_dir)
    assert spec.libvirt is not None
    from connectors.kvm.power_libvirt import LibvirtPower

    return LibvirtPower(spec.libvirt.uri, spec.libvirt.domain, uuid=spec.libvirt.uuid)


class DisksPower:
    """A stopped VM given by its qcow2 images."""

    platform = "kvm"
    can_power_on = False
    pause_stops = False
    state_seconds = STATE_SECONDS

    def __init__(self, job: str, disks: list[Path]) -> None:
        self.source = OfflineQcow2Source(job, disks)  # its checks: allowed roots, exact files opened
        self.paths = self.source.paths

    def _writer(self) -> Path | None:
        """The first image a process holds for writing (QEMU's image locks), None if none does.
        Raises subprocess.TimeoutExpired when an image does not answer in time (a hung file system)."""
        for i, path in enumerate(self.paths):
            spec = self.source._spec(i, path, backing=False)
            p = subprocess.run(
                [tool("qemu-img"), "info", "--output=json", spec],
                capture_output=True,
                text=True,
                timeout=self.state_seconds,
            )
            if p.returncode != 0 and "lock" in p.stderr.lower():
                return path
        return None

    def _missing(self) -> Path | None:
        return next((p for p in self.paths if not p.is_file()), None)

    def power_state(self) -> PowerState:
        try:
            if self._missing() is not None:
                return "gone"
            return "running" if self._writer() is not None else "stopped"
        except (subprocess.TimeoutExpired, OSError) as e:
            log.warning("source disks %s: no answer: %s", ", ".join(map(str, self.paths)), e)
            return "unreachable"

    def _refuse_writer(self, verb: str) -> None:
        if self._missing() is not None:
            return  # gone: nothing writes it
        writer = self._writer()
        if writer is not None:
            raise ResourceUnavailable(
                f"source disk {writer} is in use by a running process: sendense cannot {verb} a VM it "
                "knows only by its disks (stop that VM, or give the job its qmp or libvirt form)",
                retryable=False,
            )

    def pause_vm(self) -> None:
        """No process writes the images: nothing to pause. One does: refused (see the module)."""
        self._refuse_writer("pause")

    def resume_vm(self) -> None:
        """Nothing was paused: nothing to do."""

    def power_off_vm(self) -> None:
        """The images are not in use: off already. In use: refused (see the module)."""
        self._refuse_writer("power off")

    def power_on_vm(self) -> None:
        raise VmNotStartable(
            f"source.disks: the disks are current ({self.paths[0]}"
            + (f" and {len(self.paths) - 1} more" if len(self.paths) > 1 else "")
            + "); sendense knows this VM only by its disks: starting it is the operator's"
        )


class QmpPower:
    """A running QEMU given by its QMP socket."""

    platform = "kvm"
    can_power_on = False
    pause_stops = False
    state_seconds = STATE_SECONDS
    wait_seconds = WAIT_SECONDS

    def __init__(self, qmp: Path, work_dir: Path) -> None:
        self.qmp = Path(qmp)
        self.work_dir = Path(work_dir)

    def _client(self, timeout: float) -> QmpClient:
        return QmpClient(self.qmp, timeout=timeout, command_timeout=timeout).connect()

    def _no_process(self) -> PowerState:
        """No QEMU behind the socket: stopped, or gone when an image of the last snapshot is missing."""
        disks = recorded(self.work_dir)
        if disks and any(not Path(d.image).exists() for d in disks):
            return "gone"
        return "stopped"

    def power_state(self) -> PowerState:
        try:
            with self._client(self.state_seconds) as c:
                status = str(c.execute("query-status").get("status", ""))
        except (ResourceNotFound, VmNotRunning):
            return self._no_process()
        except SendenseError as e:  # busy, no greeting, no reply in time, not a monitor
            log.warning("QMP socket %s: no answer: %s", self.qmp, e)
            return "unreachable"
        return qemu_state(status)

    def pause_vm(self) -> None:
        """QMP `stop` (a VM running or suspended); paused or off already, or no QEMU: nothing to do."""
        try:
            c = self._client(self.wait_seconds)
        except (ResourceNotFound, VmNotRunning):
            log.info("QMP socket %s: no QEMU runs: nothing to pause", self.qmp)
            return
        with c:
            if c.execute("query-status")["status"] not in ("running", "suspended"):
                return
            c.execute("stop")  # returns once in-flight I/O is drained and flushed
            status = c.execute("query-status")["status"]
        if status == "running":
            raise ResourceUnavailable(f"QMP socket {self.qmp}: the VM still runs after stop")
        log.info("QMP socket %s: VM paused (%s)", self.qmp, status)

    def resume_vm(self) -> None:
        """QMP `cont` on a paused VM; running, off or no QEMU: nothing to do."""
        try:
            c = self._client(self.wait_seconds)
        except (ResourceNotFound, VmNotRunning):
            return
        with c:
            if qemu_state(c.execute("query-status")["status"]) != "paused":
                return
            c.execute("cont")
        log.info("QMP socket %s: VM resumed", self.qmp)

    def power_off_vm(self) -> None:
        """QMP `quit` (see the module), then wait until the QEMU process has exited."""
        try:
            c = self._client(self.wait_seconds)
        except (ResourceNotFound, VmNotRunning):
            return
        with c:
            pid = c.peer_pid()
            try:
                c.execute("quit")
            except ResourceUnavailable:
                pass  # QEMU closed the monitor as it quit, before its reply was read
        deadline = time.monotonic() + self.wait_seconds
        while not self._exited(pid):
            if time.monotonic() > deadline:
                raise ResourceUnavailable(
                    f"QMP socket {self.qmp}: QEMU (pid {pid}) did not exit in {self.wait_seconds:.0f}s "
                    "after quit"
                )
            time.sleep(0.02)
        log.info("QMP socket %s: QEMU quit (pid %s)", self.qmp, pid)

    def _exited(self, pid: int | None) -> bool:
        if pid is None:  # (not known: the monitor no longer answering is the sign)
            try:
                with self._client(self.state_seconds):
                    return False
            except (ResourceNotFound, VmNotRunning):
                return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            threads = len(os.listdir(f"/proc/{pid}/task"))
        except FileNotFoundError:
            return True
        # a zombie whose threads are all gone has exited (its parent reaps it); QEMU's main thread
        # ends first, while its other threads (and the images' file descriptors) still live
        return stat.rsplit(") ", 1)[1][:1] in ("Z", "X") and threads <= 1

    def power_on_vm(self) -> None:
        raise VmNotStartable(
            f"source.qmp: the disks are current; sendense knows this VM only by its QMP socket {self.qmp}: "
            "starting it (its QEMU command line) is the operator's"
        )
