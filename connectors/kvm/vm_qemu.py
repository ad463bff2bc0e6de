"""A VM from a recovery point as a bare QEMU process: its command line, finding it, stopping it, taps.

The process is daemonized (`-daemonize -pidfile`): it is not the worker's child and has no parent
death signal, so a failover VM outlives the agent that started it. It is found again by its pid file,
and a pid is taken for this VM's only if `/proc/<pid>/cmdline` is QEMU's with this VM's pid file or
uuid: a pid recycled by another process is never signalled (and a signal goes through a pidfd, which
pins the process that was checked).

Hardware from the plan: CPUs, memory, BIOS (SeaBIOS, which prints its boot failures on the serial
console with `graphics=off`) or UEFI (OVMF, when the host has it), disks in boot order on their bus,
serial console to a file, QMP, and a guest agent channel (virtio-serial port org.qemu.guest_agent.0).
Networks: test mode never gets a way out (no NIC, or QEMU's user network with restrict=on per NIC);
production mode puts each NIC on a tap on a host bridge, with the plan's MAC.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
from pathlib import Path

from connectors.kvm import guest_agent
from connectors.kvm.vm_state import Disk, Nic, VmPaths, VmRecord
from sendense.errors import InvalidSpec, SendenseError, TargetError
from sendense.models import NicInfo
from tools.boot import accelerator
from tools.qemu import fits_unix_socket, tool
from tools.qmp import QmpClient

ISOLATED = "sendense-isolated"  # the test network: QEMU's user network with restrict=on (no way out)
BUSES = ("virtio", "scsi", "sata", "ide", "nvme")
NIC_MODELS = {"": "virtio-net-pci", "virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
              "rtl8139": "rtl8139", "vmxnet3": "vmxnet3"}  # fmt: skip
# (code, vars template) pairs, most specific first; the vars template is copied per VM
OVMF = [
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
    (Path("/usr/share/edk2/ovmf/OVMF_CODE.fd"), Path("/usr/share/edk2/ovmf/OVMF_VARS.fd")),
]
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def ovmf(name: str) -> tuple[Path, Path]:
    for code, tmpl in OVMF:
        if code.is_file() and tmpl.is_file():
            return code, tmpl
    raise InvalidSpec(f"VM {name}: firmware uefi needs OVMF, which this host lacks: apt-get install ovmf")


def check_mac(name: str, mac: str) -> str:
    m = mac.lower()
    if not MAC.match(m) or int(m[:2], 16) & 1:
        raise InvalidSpec(f"VM {name}: NIC MAC {mac!r} is not a unicast MAC address (aa:bb:cc:dd:ee:ff)")
    return m


def bridges() -> list[str]:
    """The host's bridges, in this process's network namespace (netlink, not /sys, which may be another's)."""
    p = subprocess.run([tool("ip"), "-j", "link", "show", "type", "bridge"], capture_output=True, text=True)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["ip failed"])[-1]
        raise TargetError(f"cannot list the host's bridges: {err}")
    return sorted(link["ifname"] for link in json.loads(p.stdout or "[]"))


def nics(name: str, mode: str, plan_nics: list[NicInfo], network_map: dict[str, str]) -> list[Nic]:
    """The plan's NICs on their networks; one-line errors naming a network that is not mapped or not here."""
    out: list[Nic] = []
    have: list[str] | None = None
    for n in plan_nics:
        mac = check_mac(name, n.mac)
        model = NIC_MODELS.get(n.model, "virtio-net-pci")
        if mode == "test":
            out.append(Nic(mac, model, None))
            continue
        net = network_map.get(n.network)
        if net is None:
            raise InvalidSpec(
                f"VM {name}: NIC {mac} is on source network {n.network!r}, which network_map does not map"
            )
        if net == ISOLATED:
            out.append(Nic(mac, model, None))
            continue
        have = bridges() if have is None else have
        if net not in have:
            raise InvalidSpec(
                f"VM {name}: network {net!r} does not exist on this host "
                f"(its networks: {', '.join([ISOLATED, *have])})"
            )
        out.append(Nic(mac, model, net))
    return out


def command(paths: VmPaths, uuid: str, cpus: int, memory_mib: int, uefi: bool,
            disks: list[Disk], nic_list: list[Nic]) -> list[str]:  # fmt: skip
    accel = accelerator()
    cmd = [
        tool("qemu-system-x86_64"), "-name", f"sendense-{paths.name}", "-uuid", uuid,
        "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-machine", "pc,graphics=off", "-smp", str(cpus), "-m", str(memory_mib),
        "-nodefaults", "-display", "none", "-vga", "none", "-boot", "strict=on",
        "-chardev", f"file,id=console0,path={paths.console}", "-serial", "chardev:console0",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={paths.qga},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        "-daemonize", "-pidfile", str(paths.pidfile),
    ]  # fmt: skip
    if uefi:
        code, _ = ovmf(paths.name)
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={paths.efivars}"]  # fmt: skip
    buses = {d.bus for d in disks}
    if "scsi" in buses:
        cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
    if "sata" in buses:
        cmd += ["-device", "ahci,id=ahci0"]
    ports = {"sata": 0, "ide": 0}
    for i, d in enumerate(disks):
        cmd += ["-blockdev", f"driver=qcow2,node-name=disk{i},file.driver=file,file.filename={d.overlay}"]
        dev = f"drive=disk{i},id=dev{i},bootindex={d.boot}"
        n = ports.get(d.bus, 0)
        if d.bus == "scsi":
            cmd += ["-device", f"scsi-hd,bus=scsi0.0,{dev}"]
        elif d.bus == "sata":
            cmd += ["-device", f"ide-hd,bus=ahci0.{n},{dev}"]
        elif d.bus == "ide":
            cmd += ["-device", f"ide-hd,bus=ide.{n // 2},unit={n % 2},{dev}"]
        elif d.bus == "nvme":
            cmd += ["-device", f"nvme,serial=sendense{i},{dev}"]
        else:
            cmd += ["-device", f"virtio-blk-pci,{dev}"]
        if d.bus in ports:
            ports[d.bus] += 1
    if not nic_list:
        cmd += ["-nic", "none"]
    for i, nic in enumerate(nic_list):
        if nic.bridge is None:
            cmd += ["-netdev", f"user,id=net{i},restrict=on"]
        else:
            cmd += ["-netdev", f"tap,id=net{i},ifname={paths.tap(i)},script=no,downscript=no"]
        cmd += ["-device", f"{nic.model},netdev=net{i},mac={nic.mac},id=nic{i}"]
    return cmd


def check_buses(name: str, disks: list[Disk]) -> None:
    for d in disks:
        if d.bus not in BUSES:
            raise InvalidSpec(f"VM {name}: disk {d.key}: bus {d.bus!r} is not one of {', '.join(BUSES)}")
    limits = {"ide": 4, "sata": 6}
    for bus, most in limits.items():
        if sum(d.bus == bus for d in disks) > most:
            raise InvalidSpec(f"VM {name}: at most {most} disks on bus {bus}")


# ------------------------------------------------------------------------------------------ backend


class QemuBackend:
    """vm_state.Backend: the VM is a daemonized QEMU of its own (the functions below)."""

    def __init__(self, runtime_base: Path, stop_timeout: float) -> None:
        self.runtime_base, self.stop_timeout = runtime_base, stop_timeout  # QMP quit, then SIGKILL

    def check(self, paths: VmPaths, name: str, mode: str, nics: list[NicInfo], disks: list[Disk]) -> None:
        check_buses(name, disks)
        if not (fits_unix_socket(paths.qmp) and fits_unix_socket(paths.qga)):
            raise TargetError(
                f"VM {name}: runtime directory {self.runtime_base} is too deep for unix sockets "
                "(107 bytes); give the provisioner a shorter one"
            )

    def define(self, paths: VmPaths, record: VmRecord, disks: list[Disk], nics: list[Nic]) -> None:
        pass  # nothing exists outside the state directory until the VM runs

    def running(self, paths: VmPaths, uuid: str | None) -> bool:
        return find(paths, uuid) is not None

    def started_at(self, paths: VmPaths) -> float | None:
        try:
            return paths.pidfile.stat().st_mtime  # QEMU wrote it when it started
        except FileNotFoundError:
            return None

    def start(self, paths: VmPaths, record: VmRecord, disks: list[Disk], nics: list[Nic]) -> None:
        plan = record.plan
        uefi = plan.firmware == "uefi"
        cmd = command(paths, record.uuid, plan.cpus, plan.memory_mib, uefi, disks, nics)
        if uefi:
            copy_efivars(paths)
        try:
            add_taps(paths, nics)
            start(paths, cmd)
        except BaseException:
            if find(paths, record.uuid) is None:  # nothing runs: nothing may stay on a bridge
                remove_taps(paths)
            raise

    def stop(self, paths: VmPaths, uuid: str | None) -> None:
        pid = find(paths, uuid)
        if pid is not None:
            stop(paths, pid, uuid, self.stop_timeout)
        remove_taps(paths)
        for f in (paths.qmp, paths.qga, paths.pidfile):
            f.unlink(missing_ok=True)

    def remove(self, paths: VmPaths, uuid: str | None) -> None:
        self.stop(paths, uuid)

    def status(self, paths: VmPaths, uuid: str | None) -> str:
        """QMP `query-status` (QEMU's run state: running, paused, shutdown, ...)."""
        if find(paths, uuid) is None:
            return "not running (no QEMU process)"
        try:
            with QmpClient(paths.qmp, timeout=5.0, command_timeout=5.0) as q:
                return str(q.execute("query-status").get("status", "unknown"))
        except (SendenseError, OSError) as e:
            return f"unknown (QMP: {e})"

    def agent_sync(self, paths: VmPaths, timeout: float) -> bool:
        return guest_agent.sync_unix(paths.qga, timeout)


# ------------------------------------------------------------------------------------------ process


def _is_ours(pid: int, paths: VmPaths, uuid: str | None) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X") or not args or not os.path.basename(args[0]).startswith(b"qemu-system"):
        return False  # a zombie has exited (here, pid 1 does not reap daemons)
    pairs = set(zip(args, args[1:], strict=False))
    return (b"-pidfile", os.fsencode(paths.pidfile)) in pairs or (
        uuid is not None and (b"-uuid", uuid.encode()) in pairs
    )


def find(paths: VmPaths, uuid: str | None) -> int | None:
    """The running QEMU of this VM: by its pid file, else by its command line among all processes (a
    pid file removed by hand hides nothing)."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and _is_ours(pid, paths, uuid):
        return pid
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _is_ours(int(d.name), paths, uuid):
            return int(d.name)
    return None


def start(paths: VmPaths, cmd: list[str]) -> None:
    """Run QEMU daemonized; returns once it runs (QEMU's parent exits after the machine is set up)."""
    try:
        paths.run.mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in (paths.qmp, paths.qga, paths.pidfile):
            f.unlink(missing_ok=True)
    except OSError as e:
        raise TargetError(f"VM {paths.name}: cannot prepare its runtime files: {e.strerror}") from None
    with open(paths.log, "wb") as log:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, timeout=120)
    if p.returncode != 0:
        raise TargetError(f"VM {paths.name}: QEMU did not start: {reason(paths)}")


def reason(paths: VmPaths) -> str:
    """QEMU's last error line, without its option text or the VM's runtime paths (internal)."""
    try:
        lines = paths.log.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    last = (lines or ["no message"])[-1].removeprefix("qemu-system-x86_64: ")
    last = re.sub(r"^-\S+ \S+: ", "", last)  # "-chardev socket,...: Failed to bind ..." -> the reason
    return last.replace(str(paths.run), "<runtime dir>")


def stop(paths: VmPaths, pid: int, uuid: str | None, timeout: float) -> None:
    """QMP quit, SIGKILL after `timeout`; returns once the process has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not _is_ours(pid, paths, uuid):  # checked after the pidfd pinned it: never a recycled pid
            return
        try:
            with QmpClient(paths.qmp, timeout=min(5.0, timeout), command_timeout=min(5.0, timeout)) as q:
                q.execute("quit")
        except (SendenseError, OSError):
            pass  # the monitor is busy or gone: the kill below
        if select.select([fd], [], [], timeout)[0]:
            return
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        if not select.select([fd], [], [], 30)[0]:
            raise TargetError(f"VM {paths.name}: QEMU (pid {pid}) did not exit after SIGKILL")
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- taps


def add_taps(paths: VmPaths, nic_list: list[Nic]) -> None:
    for i, nic in enumerate(nic_list):
        if nic.bridge is None:
            continue
        tap = paths.tap(i)
        if not _ip("link", "show", tap, check=False):
            _ip("tuntap", "add", "dev", tap, "mode", "tap")
        _ip("link", "set", tap, "master", nic.bridge)
        _ip("link", "set", tap, "up")


def remove_taps(paths: VmPaths) -> None:
    """Every tap of this VM (by its name prefix: found without the record)."""
    p = subprocess.run([tool("ip"), "-j", "link", "show", "type", "tun"], capture_output=True, text=True)
    prefix = f"sd{paths.vid}n"
    for link in json.loads(p.stdout or "[]") if p.returncode == 0 else []:
        if str(link.get("ifname", "")).startswith(prefix):
            _ip("link", "del", link["ifname"])


def _ip(*args: str, check: bool = True) -> bool:
    """Run `ip`; False when it failed and `check` is off (TargetError when on)."""
    p = subprocess.run([tool("ip"), *args], capture_output=True, text=True)
    if p.returncode != 0 and check:
        err = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise TargetError(f"ip {' '.join(args)}: {err}")
    return p.returncode == 0


def copy_efivars(paths: VmPaths) -> None:
    if not paths.efivars.exists():
        _, tmpl = ovmf(paths.name)
        shutil.copyfile(tmpl, paths.efivars)
