"""The vSphere lab: `VsphereLab` starts vcsim-lab (govmomi's vCenter simulator with the lab's extensions,
built by `labs/vsphere/build.sh`) and hands tests what a vSphere client needs.

    with VsphereLab() as lab:
        vm = lab.make_vm("web", [8 << 20, 4 << 20])     # moref value; real thin VMDKs, CBT on
        si = lab.si()                                   # pyvmomi ServiceInstance (TLS, cert not checked)
        info = lab.disk_info(vm, "[LocalDS_0] web/web.vmdk")   # GET /sendense-lab/disk: the local file

The lab's disks are real files on the datastore directories vcsim-lab prints (`VCSIM_DATASTORE=`);
`stop()` ends the process and removes them. `thumbprint` is the server certificate's SHA-1 in VDDK's form
(`AA:BB:...`), for a VDDK-style data path. pyvmomi is imported lazily (the `vsphere` extra).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tools.qemu import die_with_parent

__all__ = ["VsphereLab", "VsphereLabError", "build"]

_HERE = Path(__file__).resolve().parent
BUILD = _HERE / "build.sh"


def _json_or_text(body: bytes) -> dict[str, Any]:
    """A lab endpoint's JSON body; {"text": ...} for anything else (e.g. an endpoint the binary lacks)."""
    try:
        out = json.loads(body or b"{}")
    except ValueError:
        return {"text": body.decode(errors="replace")}
    return out if isinstance(out, dict) else {"value": out}


class VsphereLabError(RuntimeError):
    """vcsim-lab could not be built, started or used."""


def build(timeout: float = 600) -> str:
    """The vcsim-lab binary: `SENDENSE_VCSIM_BIN` when set (e.g. another build, to check a test bites),
    else what `build.sh` prints last (a cache lookup when nothing changed, ~15 s otherwise)."""
    binary = os.environ.get("SENDENSE_VCSIM_BIN")
    if binary:
        return binary
    out = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise VsphereLabError(f"build.sh failed: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


class VsphereLab:
    """One vcsim-lab process on a free loopback port (context manager: start on enter, stop on exit)."""

    def __init__(
        self,
        *,
        binary: str | None = None,
        disk_mib: int = 1,
        vms: int = 2,
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self._binary = binary
        self._args = ["-l", "127.0.0.1:0", "-disk-mib", str(disk_mib), "-vm", str(vms)]
        self._env = {**os.environ, **(env or {})}
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._si: Any = None
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.url = ""
        self.host = ""
        self.port = 0
        self.user = ""
        self.password = ""
        self.thumbprint = ""
        self.datastores: dict[str, Path] = {}

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> VsphereLab:
        binary = self._binary or build()
        proc = subprocess.Popen(
            die_with_parent([binary, *self._args]),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=self._env,
        )
        self._proc = proc
        timer = threading.Timer(self._start_timeout, proc.kill)  # a hung start ends readline below
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                key, _, value = line.strip().partition("=")
                if key == "VCSIM_DATASTORE":
                    name, _, local = value.partition(" ")
                    self.datastores[name] = Path(local)
                elif key == "VCSIM_URL":
                    self._set_url(value)
                    break
        finally:
            timer.cancel()
        if not self.url:
            self.stop()
            raise VsphereLabError(f"vcsim-lab did not start: {self.stderr()[-2000:]}")
        return self

    def _set_url(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 443
        self.user = urllib.parse.unquote(parts.username or "")
        self.password = urllib.parse.unquote(parts.password or "")
        der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((self.host, self.port)))
        digest = hashlib.sha1(der).hexdigest().upper()
        self.thumbprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    def stderr(self) -> str:
        """What vcsim-lab logged (its own log lines and the lab's qemu-img failures)."""
        self._stderr.seek(0)
        return self._stderr.read()

    def stop(self) -> None:
        """Log out, end the process (SIGTERM: vcsim removes its datastore dirs; SIGKILL after 10 s) and
        remove the datastore dirs in any case."""
        if self._si is not None:
            from pyVim.connect import Disconnect

            try:
                Disconnect(self._si)
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
            self._si = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        for d in self.datastores.values():
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> VsphereLab:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- clients -----------------------------------------------------------------------------------
    def si(self) -> Any:
        """A logged-in pyvmomi ServiceInstance (one per lab, reused; the certificate is not checked)."""
        if self._si is None:
            from pyVim.connect import SmartConnect

            self._si = SmartConnect(
                host=self.host,
                port=self.port,
                user=self.user,
                pwd=self.password,
                disableSslCertValidation=True,
            )
        return self._si

    def vm(self, moref: str) -> Any:
        """The pyvmomi VirtualMachine of a moref value (e.g. "vm-42")."""
        from pyVmomi import vim

        si = self.si()
        return vim.VirtualMachine(moref, si._stub)

    def wait(self, task: Any, timeout: float = 60.0) -> Any:
        """Wait for a vim.Task; its result, or its fault raised."""
        from pyVmomi import vim

        deadline = time.monotonic() + timeout
        while task.info.state not in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
            if time.monotonic() > deadline:
                raise VsphereLabError(f"task {task} still {task.info.state}")
            time.sleep(0.02)
        if task.info.state == vim.TaskInfo.State.error:
            raise task.info.error
        return task.info.result

    def make_vm(
        self,
        name: str,
        disk_sizes: list[int],
        cbt: bool = True,
        datastore: str = "LocalDS_0",
        version: str | None = None,
        extra_config: dict[str, str] | None = None,
    ) -> str:
        """Create a powered-off VM through CreateVM_Task with one paravirtual SCSI controller and one thin
        disk per size (bytes; "[ds] name/name.vmdk", "name_1.vmdk", ...); its moref value. version: the
        virtual hardware ("vmx-04"; default the lab's, vmx-13); extra_config: extraConfig options."""
        from pyVmomi import vim

        content = self.si().RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datacenter], True)
        try:
            dc = view.view[0]
        finally:
            view.Destroy()
        view = content.viewManager.CreateContainerView(dc.hostFolder, [vim.ComputeResource], True)
        try:
            pool = view.view[0].resourcePool
        finally:
            view.Destroy()
        ctrl_key = -100
        changes = [
            vim.vm.device.VirtualDeviceSpec(
                operation="add",
                device=vim.vm.device.ParaVirtualSCSIController(
                    key=ctrl_key, busNumber=0, sharedBus="noSharing"
                ),
            )
        ]
        units = [u for u in range(16) if u != 7]  # unit 7 is the controller's own
        for i, size in enumerate(disk_sizes):
            disk = vim.vm.device.VirtualDisk(
                key=-(i + 1),
                controllerKey=ctrl_key,
                unitNumber=units[i],
                capacityInBytes=size,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    diskMode="persistent", thinProvisioned=True, fileName=f"[{datastore}]"
                ),
            )
            changes.append(
                vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)
            )
        spec = vim.vm.ConfigSpec(
            name=name,
            guestId="otherGuest",
            numCPUs=1,
            memoryMB=64,
            changeTrackingEnabled=cbt,
            files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"),
            deviceChange=changes,
        )
        if version:
            spec.version = version
        if extra_config:
            spec.extraConfig = [vim.option.OptionValue(key=k, value=v) for k, v in extra_config.items()]
        vm = self.wait(dc.vmFolder.CreateVM_Task(config=spec, pool=pool))
        return str(vm._moId)

    def first_disk(self, vm: str) -> Any:
        """The VM's first disk (controller, then unit order): the one it boots from."""
        from pyVmomi import vim

        disks = [d for d in self.vm(vm).config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        return min(disks, key=lambda d: (d.controllerKey, d.unitNumber or 0))

    def write_guest(self, vm: str, mode: str | None = None, memory_mb: int | None = 256) -> None:
        """Write the bootable guest (labs/guest) into a powered-off VM's first disk (the file
        /sendense-lab/disk names: the current top of its chain), so the VM boots it on PowerOnVM_Task.
        mode: the guest's mode passed through fw_cfg (extraConfig `guestinfo.sendense.mode`: "workload"
        writes files in a loop); memory_mb: the VM's memory (the guest's kernel wants more than 64)."""
        from pyVmomi import vim

        from labs.guest.build import build as guest
        from tools.qemu import image_info, qemu_img

        image = guest()
        disk = self.first_disk(vm)
        need = int(image_info(image)["virtual-size"])
        if disk.capacityInBytes < need:
            raise VsphereLabError(f"the first disk of {vm} is smaller than the guest ({need} bytes)")
        info = self.disk_info(vm, str(disk.backing.fileName))
        if not info["writable"]:
            raise VsphereLabError(f"{vm} is not powered off: its disk is not writable")
        qemu_img("convert", "-n", "--target-is-zero", "-O", info["format"], str(image), info["path"])
        spec: Any = vim.vm.ConfigSpec()
        if memory_mb is not None:
            spec.memoryMB = memory_mb
        if mode is not None:
            spec.extraConfig = [vim.option.OptionValue(key="guestinfo.sendense.mode", value=mode)]
        if memory_mb is not None or mode is not None:
            self.wait(self.vm(vm).ReconfigVM_Task(spec=spec))

    def add_serial_file(self, vm: str, path: str) -> None:
        """Give a VM a serial port writing to a datastore file ("[LocalDS_0] web/serial.log"; ReconfigVM_Task
        with a VirtualSerialPort and a FileBackingInfo): the lab's QEMU writes the console there."""
        from pyVmomi import vim

        port = vim.vm.device.VirtualSerialPort(
            key=-1,
            yieldOnPoll=True,
            backing=vim.vm.device.VirtualSerialPort.FileBackingInfo(fileName=path),
        )
        spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=port)])
        self.wait(self.vm(vm).ReconfigVM_Task(spec=spec))

    def linked_clone(
        self,
        vm: str,
        snapshot: Any,
        name: str,
        power_on: bool = False,
        config: Any = None,
        disk_move_type: str = "createNewChildDiskBacking",
    ) -> str:
        """CloneVM_Task of a VM's snapshot (a vim.vm.Snapshot or its moref value) into the VM's folder and
        pool, as a DR drill does: diskMoveType createNewChildDiskBacking = a linked clone (a delta per disk
        in the clone's directory over the snapshot's files); config: a vim.vm.ConfigSpec applied to the
        clone like a reconfigure. The clone's moref value."""
        from pyVmomi import vim

        source = self.vm(vm)
        if isinstance(snapshot, str):
            snapshot = vim.vm.Snapshot(snapshot, self.si()._stub)
        dc = source.parent
        while not isinstance(dc, vim.Datacenter):
            dc = dc.parent
        spec = vim.vm.CloneSpec(
            snapshot=snapshot,
            powerOn=power_on,
            template=False,
            location=vim.vm.RelocateSpec(diskMoveType=disk_move_type, pool=source.resourcePool),
            config=config,
        )
        return str(self.wait(source.CloneVM_Task(folder=dc.vmFolder, name=name, spec=spec))._moId)

    def datastore_listing(self, directory: str) -> list[str]:
        """The file names in a datastore directory ("[LocalDS_0] web"), read from the lab's local
        directory (sorted; [] when it does not exist)."""
        ds, _, rel = directory.partition("] ")
        local = self.datastores[ds.lstrip("[")] / rel
        return sorted(p.name for p in local.iterdir()) if local.is_dir() else []

    def datastore_file(self, path: str, datacenter: str = "DC0") -> bytes:
        """GET a datastore file ("[ds] dir/file") through vcsim's /folder URL with the session's cookie,
        as a vSphere client downloads it."""
        ds, _, rel = path.partition("] ")
        query = urllib.parse.urlencode({"dcPath": datacenter, "dsName": ds.lstrip("[")})
        url = f"https://{self.host}:{self.port}/folder/{urllib.parse.quote(rel)}?{query}"
        req = urllib.request.Request(url)
        req.add_header("Cookie", self.si()._stub.cookie)
        with urllib.request.urlopen(req, context=ssl._create_unverified_context(), timeout=30) as r:
            return bytes(r.read())

    def pid(self) -> int:
        """vcsim-lab's process id (its QEMUs are its children)."""
        if self._proc is None:
            raise VsphereLabError("vcsim-lab is not running")
        return self._proc.pid

    def qemu_pids(self, vm: str | None = None, any_parent: bool = False) -> list[int]:
        """The QEMU processes vcsim-lab runs (for one VM: `-name vcsim-lab:<moref>`); any_parent: also
        those that are no longer its children (outlived it)."""
        name = f"vcsim-lab:{vm}" if vm else "vcsim-lab:"
        out = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if (not any_parent and ppid != self.pid()) or not argv or b"qemu-system" not in argv[0]:
                continue
            if any(a == name.encode() or (vm is None and a.startswith(name.encode())) for a in argv):
                out.append(int(proc.name))
        return out

    # --- the lab's own endpoint --------------------------------------------------------------------
    def disk_info(
        self, vm: str, file: str, snapshot: str | None = None, auth: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """GET /sendense-lab/disk: where a disk's bytes are ({"path", "format", "capacity", "writable",
        "disk_key", "power_state"}); VsphereLabError on any other answer."""
        status, body = self.disk_request(vm=vm, file=file, snapshot=snapshot or "", auth=auth)
        if status != 200:
            raise VsphereLabError(f"/sendense-lab/disk: {status} {body}")
        return body

    def reset_tracking(self, vm: str, device_key: int) -> None:
        """POST /sendense-lab/ctk-reset: that disk alone loses its change tracking (a new ctk; its old
        changeIds answer FileFault), as when vSphere loses one disk's -ctk.vmdk. VsphereLabError unless
        204."""
        status, body = self.lab_request("POST", "/sendense-lab/ctk-reset", vm=vm, key=str(device_key))
        if status != 204:
            raise VsphereLabError(f"/sendense-lab/ctk-reset: {status} {body}")

    def lab_request(
        self, method: str, endpoint: str, auth: tuple[str, str] | None | bool = None, **params: str
    ) -> tuple[int, dict[str, Any]]:
        """A raw call of a lab endpoint: (status, JSON body or {}). auth None: the lab's credentials; False:
        none."""
        query = urllib.parse.urlencode(params)
        req = urllib.request.Request(f"https://{self.host}:{self.port}{endpoint}?{query}", method=method)
        if auth is not False:
            user, pwd = auth if isinstance(auth, tuple) else (self.user, self.password)
            token = base64.b64encode(f"{user}:{pwd}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        ctx = ssl._create_unverified_context()
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                return r.status, _json_or_text(r.read())
        except urllib.error.HTTPError as e:
            return e.code, _json_or_text(e.read())

    def disk_request(
        self, auth: tuple[str, str] | None | bool = None, **params: str
    ) -> tuple[int, dict[str, Any]]:
        """The raw endpoint call: (status, JSON body). auth None: the lab's credentials; False: none."""
        return self.lab_request("GET", "/sendense-lab/disk", auth=auth, **params)
