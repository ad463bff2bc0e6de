"""VMs from recovery points on a KVM target (sendense.protocols.VmProvisioner): a drill's test VM or a
failover's VM, as a bare QEMU process on the host that holds the replicas, or as a libvirt domain there
when the target names a libvirt connection (`KvmTarget.libvirt`).

A VM is an overlay per disk on the point's files (which QEMU only reads), its state kept under the job
directory (`vm_state`), its process daemonized so that it outlives the agent that started it
(`vm_qemu`) or owned by libvirt (`vm_libvirt`): the backend (`vm_state.Backend`) is the only
difference. Every verb is idempotent by the VM's name; `destroy_vm(name)` undoes `create_vm` and
whatever a half-done `create_vm` or `power_on` left, and `power_off` undoes `power_on`. The target's
prune keeps a point that a VM's overlay backs, running or not (on top of the caller's hold).

Under libvirt, `create_vm` defines a persistent domain `sendense-<job>-<name>` (its uuid the record's),
`power_on` starts it, `power_off` shuts it down (destroy when that does not finish), `destroy_vm`
destroys and undefines it; its serial console is logged to the same console file, so the boot check
and `console` read it as they do a bare QEMU's.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from connectors.kvm import vm_qemu
from connectors.kvm.jobdir import check_place
from connectors.kvm.target import KvmTarget
from connectors.kvm.vm_qemu import QemuBackend
from connectors.kvm.vm_state import (
    Backend,
    Disk,
    VmPaths,
    VmRecord,
    backing_path,
    default_runtime_base,
    read_record,
    vm_names,
    vms_dir,
    write_record,
)
from sendense.errors import InvalidSpec, ResourceNotFound, ResourceUnavailable, TargetError
from sendense.models import BootCheck, NetworkInfo, PointInfo, VmPlan, VmRef
from tools.exports import safe_key
from tools.qemu import qemu_img
from tools.qmp import QmpClient

log = logging.getLogger(__name__)

NAME = re.compile(VmPlan.model_fields["name"].metadata[0].pattern)
# Lines after which no boot follows. SeaBIOS's "Boot failed: ..." is not one (the next boot device may
# boot): it is the reason given with "No bootable device".
FAILED = re.compile(r"Kernel panic[^\n]*|No bootable (?:device|option)[^\n]*|INACCESSIBLE_BOOT_DEVICE[^\n]*")
BOOT_FAILED = re.compile(r"Boot failed: [^\n]*")
ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-~])|\r")
CONSOLE_TAIL = 256 << 10  # console() returns at most this much (the newest text): it crosses Temporal


def clean(raw: bytes) -> str:
    """Console bytes as text, terminal escapes and carriage returns removed."""
    return ESCAPES.sub("", raw.decode(errors="replace"))


class KvmVms:
    platform = "kvm"

    def __init__(
        self,
        job: str,
        root: Path,
        job_id: str = "",
        *,
        runtime_dir: Path | None = None,
        stop_timeout: float = 10.0,
        libvirt_uri: str | None = None,
    ) -> None:
        self.target = KvmTarget(job, root, job_id)
        self.job, self.job_id = job, job_id
        self.runtime_base = runtime_dir or default_runtime_base()
        self.stop_timeout = stop_timeout  # QMP quit (libvirt: shutdown), then SIGKILL (destroy)
        self.backend: Backend
        if libvirt_uri is None:
            self.backend = QemuBackend(self.runtime_base, stop_timeout)
        else:
            from connectors.kvm.vm_libvirt import LibvirtBackend  # libvirt's bindings only when used

            self.backend = LibvirtBackend(libvirt_uri, job, job_id, stop_timeout)

    # ------------------------------------------------------------------ helpers

    def files(self, name: str) -> VmPaths:
        """The VM's files (state directory, runtime directory, pid file, sockets), as recorded."""
        if not NAME.match(name):
            raise InvalidSpec(f"VM name {name!r}: lower-case letters, digits, '_', '.', '-' (at most 63)")
        paths = VmPaths.of(self.target.dir, name, self.runtime_base)
        rec = read_record(paths)
        return VmPaths.of(self.target.dir, name, self.runtime_base, rec.run_dir) if rec else paths

    def _load(self, name: str) -> tuple[VmPaths, VmRecord]:
        paths = self.files(name)
        rec = read_record(paths)
        if rec is None:
            raise ResourceNotFound(f"VM {name}: not found on job {self.job} ({self.target.dir})")
        return paths, rec

    @contextmanager
    def _locked(self, *, create: bool = False) -> Iterator[bool]:
        """One VM verb at a time per job (boot checks and consoles only read, without it). Yields
        whether the job has VMs at all; only `create` makes their directory (in the job's, which
        must exist: nothing is made for a job that has none)."""
        d = vms_dir(self.target.dir)
        if create:
            d.mkdir(exist_ok=True)
        elif not d.is_dir():
            yield False
            return
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)

    def _ref(self, paths: VmPaths, rec: VmRecord | None) -> VmRef:
        if rec is None:
            return VmRef(name=paths.name, platform="kvm", point_id="", mode="test", state="incomplete")
        running = self.backend.running(paths, rec.uuid)
        complete = all((paths.state / f).exists() for f in rec.overlays.values())
        state = "running" if running else "stopped" if complete else "incomplete"
        plan = rec.plan
        return VmRef(name=plan.name, platform=self.platform, point_id=plan.point_id, mode=plan.mode,
                     vm_id=rec.uuid, state=state)  # fmt: skip

    def _layout(self, plan: VmPlan, point: PointInfo) -> list[tuple[str, str]]:
        """(disk key, bus) in boot order: the plan's boot orders first, then the plan's (or point's) order."""
        keys = [d.key for d in point.disks]
        chosen = plan.disks or []
        if not chosen:
            return [(k, "virtio") for k in keys]
        seen: set[str] = set()
        for d in chosen:
            if d.key not in keys:
                raise InvalidSpec(
                    f"VM {plan.name}: point {point.point_id} has no disk {d.key!r} "
                    f"(its disks: {', '.join(keys)})"
                )
            if d.key in seen:
                raise InvalidSpec(f"VM {plan.name}: disk {d.key} is listed twice")
            seen.add(d.key)
        ordered = sorted(chosen, key=lambda d: d.boot_order if d.boot_order is not None else 1 << 30)
        return [(d.key, d.bus or "virtio") for d in ordered]  # sorted() is stable: ties keep the plan's order

    def _disks(self, paths: VmPaths, rec: VmRecord, point: PointInfo) -> list[Disk]:
        return [
            Disk(key, paths.state / rec.overlays[key], bus, n)
            for n, (key, bus) in enumerate(self._layout(rec.plan, point), 1)
        ]

    # ------------------------------------------------------------------ create / destroy

    def create_vm(self, plan: VmPlan) -> VmRef:
        """Overlays on the point's files and the VM's record; nothing runs. Undo: destroy_vm(plan.name)."""
        check_place(self.target.dir, self.job, self.job_id)
        self.target.get_point(plan.point_id)  # the job and the point exist before anything is made
        with self._locked(create=True):
            paths = self.files(plan.name)
            rec = read_record(paths)
            if rec is not None and rec.plan != plan:
                old, new = rec.plan.model_dump(), plan.model_dump()
                diff = ", ".join(k for k in new if old.get(k) != new[k])
                raise InvalidSpec(
                    f"VM {plan.name}: exists on job {self.job} from another plan (differs in {diff}); "
                    "destroy it or choose another name"
                )
            point = self.target.get_point(plan.point_id)
            if rec is None:
                rec = self._new_record(plan, point, paths)
                paths.state.mkdir(parents=True, exist_ok=True)
                write_record(paths, rec)  # first: destroy_vm finds the VM even if the rest is cut short
            with self.target.locked():  # prune waits: it never merges a point while an overlay is made on it
                point = self.target.get_point(plan.point_id)
                for key, file in rec.overlays.items():
                    self._overlay(plan, point, key, paths.state / file)
            nic_list = vm_qemu.nics(plan.name, plan.mode, plan.nics, plan.network_map)
            self.backend.define(paths, rec, self._disks(paths, rec, point), nic_list)
        log.info("job %s: VM %s made from point %s (%s)", self.job, plan.name, plan.point_id, plan.mode)
        return self._ref(paths, rec)

    def _new_record(self, plan: VmPlan, point: PointInfo, paths: VmPaths) -> VmRecord:
        """Everything a plan can be refused for, checked before anything is written."""
        layout = self._layout(plan, point)
        disks = [Disk(k, Path(), b, n) for n, (k, b) in enumerate(layout, 1)]
        vm_qemu.check_buses(plan.name, disks)
        if plan.firmware == "uefi":
            vm_qemu.ovmf(plan.name)
        vm_qemu.nics(plan.name, plan.mode, plan.nics, plan.network_map)
        self.backend.check(paths, plan.name, plan.mode, plan.nics, disks)
        return VmRecord(
            plan=plan, uuid=str(uuid.uuid4()), run_dir=str(paths.run), disks=[k for k, _ in layout],
            overlays={k: f"{safe_key(k)}.qcow2" for k, _ in layout},
        )  # fmt: skip

    def _overlay(self, plan: VmPlan, point: PointInfo, key: str, overlay: Path) -> None:
        """An overlay on the point's file (relative backing path), made aside and renamed into place."""
        if overlay.exists():
            return
        backing = self.target.point_path(point.point_id, key)
        if not backing.is_file():
            raise TargetError(f"VM {plan.name}: point {point.point_id} disk {key}: {backing} is missing")
        part = overlay.with_name(overlay.name + ".part")
        part.unlink(missing_ok=True)
        size = next(d.size for d in point.disks if d.key == key)
        rel = os.path.relpath(backing.resolve(), overlay.parent.resolve())
        try:
            qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", rel, "-F", "qcow2", str(part), str(size))
            part.chmod(0o600)  # the VM's disk: its data is the point's, private as the point is
        except Exception as e:
            part.unlink(missing_ok=True)
            raise TargetError(f"VM {plan.name}: cannot make disk {key} in {overlay.parent}: {e}") from None
        os.replace(part, overlay)

    def destroy_vm(self, name: str) -> None:
        """Stop the VM and remove everything made for it; gone already: no error."""
        check_place(self.target.dir, self.job, self.job_id)
        paths = self.files(name)
        with self._locked() as any_vms:
            rec = read_record(paths) if any_vms else None
            self.backend.remove(paths, rec.uuid if rec else None)
            left: list[str] = []
            for d in (paths.run, paths.state):
                if d.exists():
                    entries = sorted(d.iterdir(), key=lambda f: f.name == "vm.json")  # the record last
                    for f in [*entries, d]:
                        try:
                            if f == d:
                                f.rmdir()
                            elif f.is_dir() and not f.is_symlink():
                                shutil.rmtree(f)  # a failback tracker's work directory (vm_changes)
                            else:
                                f.unlink()
                        except FileNotFoundError:
                            pass
                        except OSError as e:
                            left.append(f"{f} ({e.strerror})")
            if left:
                more = f" and {len(left) - 1} more" if len(left) > 1 else ""
                raise TargetError(f"destroy of VM {name}: could not remove {left[0]}{more}")
            try:  # the job's last VM: its vms/ directory goes too (nothing of the VMs stays)
                paths.state.parent.rmdir()
            except OSError:
                pass  # other VMs remain (or it was never there)
        log.info("job %s: VM %s destroyed", self.job, name)

    # ------------------------------------------------------------------ power

    def power_on(self, name: str) -> VmRef:
        """Start the VM (running already: no error). Undo: power_off(name)."""
        with self._locked():
            paths, rec = self._load(name)
            if self.backend.running(paths, rec.uuid):
                return self._ref(paths, rec)
            plan = rec.plan
            missing = [k for k, f in rec.overlays.items() if not (paths.state / f).exists()]
            if missing:
                raise TargetError(f"VM {name}: not fully created (disk {missing[0]}): create_vm it again")
            for key, f in rec.overlays.items():
                backing = backing_path(paths.state / f)
                if backing is None or not backing.is_file():
                    raise TargetError(f"VM {name}: disk {key}: its point's file {backing} is gone")
            point = self.target.get_point(plan.point_id)
            nic_list = vm_qemu.nics(name, plan.mode, plan.nics, plan.network_map)
            self.backend.start(paths, rec, self._disks(paths, rec, point), nic_list)
            log.info("job %s: VM %s powered on (%s)", self.job, name, plan.mode)
            return self._ref(paths, rec)

    def power_off(self, name: str) -> VmRef:
        """Stop the VM hard (QMP quit, SIGKILL after `stop_timeout`; libvirt: shutdown, then destroy);
        stopped or gone: no error."""
        paths = self.files(name)
        with self._locked() as any_vms:
            rec = read_record(paths) if any_vms else None
            if rec is None and not paths.state.exists():
                return VmRef(name=name, platform=self.platform, point_id="", mode="test", state="absent")
            self.backend.stop(paths, rec.uuid if rec else None)
            return self._ref(paths, rec)

    # ------------------------------------------------------------------ observe

    def boot_check(
        self, name: str, pattern: str, timeout: float, guest_agent: bool = False, status_checks: bool = False
    ) -> BootCheck:
        """Until `pattern` shows on the console, a line after which nothing boots, the VM stops, or
        `timeout`; seconds count from power-on (as the backend knows it). Once the pattern showed:
        with `status_checks`, QEMU (libvirt) must say the VM runs; with `guest_agent`, the guest's
        agent must answer `guest-sync` with our id within what is left of `timeout`."""
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise InvalidSpec(f"boot check pattern {pattern!r}: {e}") from None
        paths, rec = self._load(name)
        started = self.backend.started_at(paths) or time.time()
        deadline = time.monotonic() + timeout
        raw = bytearray()
        while True:
            running = self.backend.running(paths, rec.uuid)
            raw += self._read_from(paths.console, len(raw))
            text = clean(bytes(raw))
            seconds = round(time.time() - started, 2)
            if m := rx.search(text):
                line = _line_at(text, m.start())
                return self._after_console(paths, rec, line, started, deadline, guest_agent, status_checks)
            if bad := FAILED.search(text):
                failed = BOOT_FAILED.findall(text[: bad.start()])
                evidence = bad.group(0).strip() + (f" ({failed[-1].strip()})" if failed else "")
                return BootCheck(ok=False, seconds=seconds, evidence=evidence)
            last = (text.strip().splitlines() or ["no console output"])[-1].strip()
            if not running:
                why = f"VM {name} is not running; last line: {last}"
                return BootCheck(ok=False, seconds=seconds, evidence=why)
            if time.monotonic() >= deadline:
                why = f"no {pattern!r} within {timeout:g}s; last line: {last}"
                return BootCheck(ok=False, seconds=seconds, evidence=why)
            time.sleep(0.2)

    def _after_console(
        self, paths: VmPaths, rec: VmRecord, line: str, started: float, deadline: float,
        guest_agent: bool, status_checks: bool,
    ) -> BootCheck:  # fmt: skip
        """The checks that follow the console's pattern (status first: a paused VM's agent is silent)."""
        evidence = [line]
        if status_checks:
            state = self.backend.status(paths, rec.uuid)
            if state != "running":
                why = f"{line}; but the VM is not running: {state}"
                return BootCheck(ok=False, seconds=round(time.time() - started, 2), evidence=why)
            evidence.append("VM running")
        if guest_agent:
            shown = time.monotonic()
            wait = max(0.0, deadline - shown)
            if not self.backend.agent_sync(paths, wait):
                last = self._last_line(paths)
                why = f"guest agent did not answer within {wait:.0f}s; last line: {last}"
                return BootCheck(ok=False, seconds=round(time.time() - started, 2), evidence=why)
            evidence.append(f"guest agent answered ({time.monotonic() - shown:.1f}s after the console)")
        return BootCheck(ok=True, seconds=round(time.time() - started, 2), evidence="; ".join(evidence))

    def _last_line(self, paths: VmPaths) -> str:
        size = paths.console.stat().st_size if paths.console.exists() else 0
        text = clean(self._read_from(paths.console, max(0, size - 4096)))
        return (text.strip().splitlines() or ["no console output"])[-1].strip()

    @staticmethod
    def _read_from(path: Path, offset: int) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def console(self, name: str) -> str:
        paths, _ = self._load(name)
        size = paths.console.stat().st_size if paths.console.exists() else 0
        return clean(self._read_from(paths.console, max(0, size - CONSOLE_TAIL)))

    def list_vms(self) -> list[VmRef]:
        refs = []
        for name in vm_names(self.target.dir):
            if NAME.match(name):
                paths = self.files(name)
                refs.append(self._ref(paths, read_record(paths)))
        return refs

    def list_networks(self) -> list[NetworkInfo]:
        isolated = NetworkInfo(name=vm_qemu.ISOLATED, kind="user", isolated=True)
        return [isolated, *(NetworkInfo(name=b, kind="bridge") for b in vm_qemu.bridges())]

    def monitor(self, name: str) -> QmpClient:
        """A QMP client on the running VM's monitor (labs and tests ask QEMU what it runs)."""
        paths, rec = self._load(name)
        if not isinstance(self.backend, QemuBackend):
            raise ResourceUnavailable(f"VM {name}: a libvirt domain; its monitor is libvirt's")
        if not self.backend.running(paths, rec.uuid):
            raise ResourceUnavailable(f"VM {name}: not running")
        return QmpClient(paths.qmp)


def _line_at(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start : end if end >= 0 else len(text)].strip()


__all__ = ["KvmVms"]
