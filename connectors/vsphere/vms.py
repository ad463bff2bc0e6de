"""VMs from recovery points on the vSphere target (`VmProvisioner`).

- **Test VMs (drills)** are linked clones of the point's snapshot of the placeholder (`CloneVM_Task`
  with `snapshot` and `diskMoveType createNewChildDiskBacking`): the clone writes only its own child
  disks, the point's files are shared and never written, and a clone is made in seconds whatever the
  disks' size. Its name is `<placeholder>-<VM name>`, in the placeholder's folder, on the placeholder's
  host and datastore. It gets one vmxnet3 NIC on a network of its own: a standard vSwitch with no
  uplink (nothing leaves it) and one portgroup `<clone>-isolated` on it, both made for this VM and
  removed with it. The clone's extraConfig says whose it is (`sendense.vm.*`: the job's identity, the
  VM's name, point and mode); the placeholder's job mark is not copied, so a clone is never taken for
  a placeholder.
- **The production VM (failover)** is the placeholder itself: reverted to the point (RevertToSnapshot:
  a new child disk over the point's files, so the point stays as it is) and reconfigured with the
  plan's CPUs, memory, firmware and one NIC per source NIC (its MAC) on the portgroup `network_map`
  names. `destroy_vm` reverts it to the newest point, which restores the placeholder's configuration
  as of that point (no NICs, no marks), so replication can go on from there.
- **Console and boot check**: every VM made gets a serial port written to a datastore file next to
  its configuration (`sendense-console.log`), read back through the datastore's `/folder` URL with
  the session's cookie. The boot check wants the pattern on that console; with `guest_agent` or
  `status_checks` also VMware Tools running with a green heartbeat (`guest.toolsRunningStatus`,
  `guestHeartbeatStatus`).
- Every verb is idempotent by the VM's name; `destroy_vm(name)` removes the clone, its console file,
  portgroup and vSwitch, whichever of them exist (a create killed half-way leaves only those).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from connectors.vsphere.session import calling, extra_config, is_fault, snapshot_nodes
from connectors.vsphere.spec import VsphereTarget
from connectors.vsphere.target import KEY_JOB, KEY_SYNC, VsphereTargetConnector, disk_keys
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import BootCheck, NetworkInfo, PointInfo, VmPlan, VmRef, boot_disks
from tools.boot import BOOT_FAILURE, console_lines

log = logging.getLogger(__name__)

MARK = "sendense.vm."  # extraConfig of a VM made from a point: owner, name, point, mode
CONSOLE_FILE = "sendense-console.log"
FAILBACK_PREFIX = "sendense-failback-"  # a failback's snapshots of the production VM (vm_changes.py)
NAME_MAX = 71  # vSphere names are at most 80 characters; the clone's portgroup adds "-isolated"
_STATES = {"poweredOn": "running", "poweredOff": "stopped", "suspended": "paused"}


class VsphereVmProvisioner:
    """VmProvisioner: linked clones of the placeholder's point snapshots (test), the placeholder
    reverted to a point (production)."""

    platform = "vsphere"
    poll_seconds = 1.0

    def __init__(self, job: str, spec: VsphereTarget, job_id: str = "") -> None:
        self.job, self.spec, self.job_id = job, spec, job_id
        self.target = VsphereTargetConnector(job, spec, job_id)
        self.session = self.target.session

    # ------------------------------------------------------------------ names and marks

    def clone_name(self, name: str) -> str:
        """The inventory name of test VM `name`: `<placeholder>-<name>`, the placeholder's part cut
        short when the whole would be longer than NAME_MAX."""
        ph = self.target.name
        if len(ph) + 1 + len(name) > NAME_MAX:
            ph = ph[: max(1, NAME_MAX - len(name) - 1)]
        return f"{ph}-{name}"

    def _prefix(self) -> str:
        """What every name clone_name gives starts with (VM names are at most 63 characters)."""
        return self.target.name[: NAME_MAX - 63 - 1]

    def _switch(self, name: str) -> str:
        """The test VM's vSwitch (ESXi allows 32 characters)."""
        return "sdr-" + hashlib.sha1(f"{self.target._owner()}\0{name}".encode()).hexdigest()[:16]

    def _portgroup(self, name: str) -> str:
        return f"{self.clone_name(name)}-isolated"

    def _marks(self, vm: Any) -> dict[str, str] | None:
        """The VM's marks if this job made it from a point, else None."""
        ec = extra_config(vm)
        if ec.get(MARK + "owner") != self.target._owner() or not ec.get(MARK + "name"):
            return None
        return {k[len(MARK) :]: v for k, v in ec.items() if k.startswith(MARK)}

    def _mark_options(self, plan: VmPlan) -> list[Any]:
        from pyVmomi import vim

        marks = {"owner": self.target._owner(), "name": plan.name, "point": plan.point_id, "mode": plan.mode}
        return [vim.option.OptionValue(key=MARK + k, value=v) for k, v in marks.items()]

    def _ref(self, vm: Any, marks: dict[str, str]) -> VmRef:
        return VmRef(
            name=marks["name"],
            platform=self.platform,
            point_id=marks.get("point", ""),
            mode="production" if marks.get("mode") == "production" else "test",
            vm_id=vm._moId,
            state=_STATES.get(str(vm.runtime.powerState), str(vm.runtime.powerState)),
        )

    # ------------------------------------------------------------------ finding

    def _clone(self, name: str) -> Any | None:
        """Test VM `name` (this job's linked clone), None if there is none. A VM of its inventory name
        that this job did not make is never touched."""
        dc = self.target._datacenter()
        from pyVmomi import vim

        vm = self.session.content.searchIndex.FindChild(self.target._folder(dc), self.clone_name(name))
        if not isinstance(vm, vim.VirtualMachine):
            return None
        marks = self._marks(vm)
        return vm if marks is not None and marks["name"] == name else None

    def _production(self, name: str) -> Any | None:
        """The placeholder, when it is production VM `name` (failed over to a point)."""
        ph = self.target._placeholder()
        if ph is None:
            return None
        marks = self._marks(ph)
        return ph if marks is not None and marks["name"] == name else None

    def _vm(self, name: str) -> Any:
        vm = self._clone(name) or self._production(name)
        if vm is None:
            raise ResourceNotFound(f"vm {name}: job {self.job} has no such VM on {self.spec.server}")
        return vm

    # ------------------------------------------------------------------ create

    def create_vm(self, plan: VmPlan) -> VmRef:
        vm = self._clone(plan.name) or self._production(plan.name)
        if vm is not None:
            marks = self._marks(vm)
            assert marks is not None
            ref = self._ref(vm, marks)
            if (ref.point_id, ref.mode) != (plan.point_id, plan.mode):
                raise TargetError(
                    f"vm {plan.name}: exists already from point {ref.point_id} ({ref.mode}, {ref.vm_id}); "
                    "destroy it first"
                )
            self._add_console(vm, plan.name)  # (a create killed before it)
            return ref
        ph = self.target._placeholder()
        if ph is None:
            raise ResourceNotFound(f"job {self.job}: no recovery point yet")
        point, snap, _ = self.target._point(ph, plan.point_id)
        vm = (
            self._create_test(plan, ph, point, snap)
            if plan.mode == "test"
            else self._failover(plan, ph, snap)
        )
        self._add_console(vm, plan.name)
        marks = self._marks(vm)
        assert marks is not None
        return self._ref(vm, marks)

    def _hardware(self, plan: VmPlan, point: PointInfo, config: Any) -> dict[str, Any]:
        """CPUs, memory, firmware and the boot disk of the plan, as ConfigSpec fields."""
        from pyVmomi import vim

        out: dict[str, Any] = {
            "numCPUs": plan.cpus,
            "memoryMB": plan.memory_mib,
            "firmware": "efi" if plan.firmware == "uefi" else "bios",
        }
        keys = disk_keys(config)
        boot = next((d.key for d in boot_disks(point, plan.disks) if d.key in keys), None)
        if boot is not None:
            out["bootOptions"] = vim.vm.BootOptions(
                bootOrder=[vim.vm.BootOptions.BootableDiskDevice(deviceKey=keys[boot])]
            )
        return out

    def _create_test(self, plan: VmPlan, ph: Any, point: PointInfo, snap: Any) -> Any:
        from pyVmomi import vim

        dc = self.target._datacenter()
        folder, ds = self.target._folder(dc), self.target._datastore(dc)
        name = self.clone_name(plan.name)
        other = self.session.content.searchIndex.FindChild(folder, name)
        if other is not None:
            raise InvalidSpec(
                f"vm {plan.name}: the inventory name {name} is taken by a VM job {self.job} did not make"
            )
        host = ph.runtime.host
        net = self._isolated_network(host, plan.name)
        nic = vim.vm.device.VirtualDeviceSpec(
            operation="add",
            device=vim.vm.device.VirtualVmxnet3(
                key=-301,
                addressType="generated",
                backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=net.name, network=net
                ),
                connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                    startConnected=True, allowGuestControl=True, connected=False
                ),
            ),
        )
        drop = [vim.option.OptionValue(key=k, value="") for k in (KEY_JOB, KEY_SYNC)]
        config = vim.vm.ConfigSpec(
            annotation=f"Sendense drill VM {plan.name} of job {self.job}, a linked clone of point "
            f"{point.point_id}: destroyed when the drill ends.",
            deviceChange=[*(self._nic_removals(snap.config)), nic],
            extraConfig=[*self._mark_options(plan), *drop],
            **self._hardware(plan, point, snap.config),
        )
        spec = vim.vm.CloneSpec(
            snapshot=snap,
            powerOn=False,
            template=False,
            location=vim.vm.RelocateSpec(
                diskMoveType="createNewChildDiskBacking", pool=ph.resourcePool, host=host, datastore=ds
            ),
            config=config,
        )
        what = f"vm {plan.name}: linked clone {name} of point {point.point_id}"
        with calling(what):
            task = ph.CloneVM_Task(folder=folder, name=name, spec=spec)
        vm = self.session.wait(task, what)
        log.info("vm %s of job %s: %s made", plan.name, self.job, name)
        return vm

    def _nic_removals(self, config: Any) -> list[Any]:
        """Remove the NICs a configuration has (a clone of a placeholder someone gave NICs by hand)."""
        from pyVmomi import vim

        return [
            vim.vm.device.VirtualDeviceSpec(operation="remove", device=d)
            for d in config.hardware.device
            if isinstance(d, vim.vm.device.VirtualEthernetCard)
        ]

    def _failover(self, plan: VmPlan, ph: Any, snap: Any) -> Any:
        from pyVmomi import vim

        label = self.target.label
        if ph.runtime.powerState != "poweredOff":
            raise TargetError(
                f"vm {plan.name}: {label} is {ph.runtime.powerState}: it is another VM already "
                "(a failover in place); destroy that first"
            )
        point = next(p for p, s, _ in self.target._points(ph) if s._moId == snap._moId)
        nics = self._production_nics(plan)
        what = f"vm {plan.name}: {label}: reverting to point {plan.point_id}"
        with calling(what):
            task = snap.RevertToSnapshot_Task()
        self.session.wait(task, what)
        config = vim.vm.ConfigSpec(
            annotation=f"Sendense: job {self.job} failed over to point {plan.point_id} on this VM "
            f"(VM {plan.name}). Its points stay as snapshots.",
            deviceChange=[*self._nic_removals(ph.config), *nics],
            extraConfig=[*self._mark_options(plan), vim.option.OptionValue(key=KEY_SYNC, value="")],
            **self._hardware(plan, point, ph.config),
        )
        what = f"vm {plan.name}: {label}: configuring it as the production VM"
        with calling(what):
            task = ph.ReconfigVM_Task(spec=config)
        self.session.wait(task, what)
        log.info("vm %s of job %s: %s reverted to point %s", plan.name, self.job, label, plan.point_id)
        return ph

    def _production_nics(self, plan: VmPlan) -> list[Any]:
        """One vmxnet3 NIC per source NIC, with its MAC, on the network `network_map` maps it to."""
        from pyVmomi import vim

        nets = {n.name: n for n in self.target._datacenter().network}
        out = []
        for i, n in enumerate(plan.nics):
            name = plan.network_map.get(n.network)
            if name is None:
                raise InvalidSpec(
                    f"vm {plan.name}: NIC {n.mac or i} is on source network {n.network!r}, which "
                    "recovery.network_map does not map"
                )
            net = nets.get(name)
            if net is None:
                raise InvalidSpec(
                    f"vm {plan.name}: recovery.network_map names network {name!r}, which "
                    f"{self.spec.server} does not have (its networks: {', '.join(sorted(nets))})"
                )
            if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
                dvs: Any = net.config.distributedVirtualSwitch
                backing: Any = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                    port=vim.dvs.PortConnection(portgroupKey=net.key, switchUuid=dvs.uuid)
                )
            else:
                backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=name, network=net)
            mac = {"addressType": "manual", "macAddress": n.mac} if n.mac else {"addressType": "generated"}
            out.append(
                vim.vm.device.VirtualDeviceSpec(
                    operation="add",
                    device=vim.vm.device.VirtualVmxnet3(
                        key=-400 - i,
                        backing=backing,
                        connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                            startConnected=True, allowGuestControl=True, connected=False
                        ),
                        **mac,
                    ),
                )
            )
        return out

    def _console_path(self, vm: Any) -> str:
        """`[ds] dir/sendense-console.log`, beside the VM's configuration file."""
        vmx = str(vm.config.files.vmPathName)
        return f"{vmx.rsplit('/', 1)[0]}/{CONSOLE_FILE}" if "/" in vmx else f"{vmx} {CONSOLE_FILE}"

    def _console_port(self, vm: Any) -> Any | None:
        from pyVmomi import vim

        for d in vm.config.hardware.device:
            if isinstance(d, vim.vm.device.VirtualSerialPort) and str(
                getattr(d.backing, "fileName", "")
            ).endswith(CONSOLE_FILE):
                return d
        return None

    def _add_console(self, vm: Any, name: str) -> None:
        """The VM's serial port, written to a file on the datastore (idempotent)."""
        from pyVmomi import vim

        if self._console_port(vm) is not None:
            return
        port = vim.vm.device.VirtualSerialPort(
            key=-501,
            yieldOnPoll=True,
            backing=vim.vm.device.VirtualSerialPort.FileBackingInfo(fileName=self._console_path(vm)),
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, connected=False),
        )
        what = f"vm {name}: adding its console (serial port to {CONSOLE_FILE})"
        with calling(what):
            task = vm.ReconfigVM_Task(
                spec=vim.vm.ConfigSpec(
                    deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=port)]
                )
            )
        self.session.wait(task, what)

    # ------------------------------------------------------------------ networks

    def _hosts(self) -> list[Any]:
        from pyVmomi import vim

        dc = self.target._datacenter()
        return [h for c in dc.hostFolder.childEntity if isinstance(c, vim.ComputeResource) for h in c.host]

    def _isolated_network(self, host: Any, name: str) -> Any:
        """The test VM's own network on `host`: a vSwitch without uplinks and one portgroup on it."""
        from pyVmomi import vim

        ns = host.configManager.networkSystem
        sw, pg = self._switch(name), self._portgroup(name)
        what = f"vm {name}: isolated network {pg} on {host.name}"
        try:
            with calling(what):
                ns.AddVirtualSwitch(vswitchName=sw, spec=vim.host.VirtualSwitch.Specification(numPorts=16))
        except TargetError:
            if sw not in {s.name for s in ns.networkInfo.vswitch or []}:
                raise
        try:
            with calling(what):
                ns.AddPortGroup(
                    portgrp=vim.host.PortGroup.Specification(
                        name=pg, vlanId=0, vswitchName=sw, policy=vim.host.NetworkPolicy()
                    )
                )
        except TargetError:
            if pg not in {p.spec.name for p in ns.networkInfo.portgroup or []}:
                raise
        deadline = time.monotonic() + 30
        while True:  # (vCenter shows the host's new network a moment later)
            net = next((n for n in host.network if n.name == pg), None)
            if net is not None:
                return net
            if time.monotonic() > deadline:
                raise TargetError(f"{what}: made, but vSphere does not show its network")
            time.sleep(0.5)

    def _drop_network(self, name: str) -> list[str]:
        """Remove the test VM's portgroup and vSwitch from every host that has them; what stays."""
        stays = []
        sw, pg = self._switch(name), self._portgroup(name)
        for host in self._hosts():
            ns = host.configManager.networkSystem
            info = ns.networkInfo
            if pg in {p.spec.name for p in info.portgroup or []}:
                try:
                    ns.RemovePortGroup(pgName=pg)
                except Exception as e:  # noqa: BLE001 (said below)
                    if not is_fault(e, "NotFound"):
                        stays.append(f"portgroup {pg} on {host.name} ({_fault(e)})")
            if sw in {s.name for s in info.vswitch or []}:
                try:
                    ns.RemoveVirtualSwitch(vswitchName=sw)
                except Exception as e:  # noqa: BLE001
                    if not is_fault(e, "NotFound"):
                        stays.append(f"vSwitch {sw} on {host.name} ({_fault(e)})")
        return stays

    def list_networks(self) -> list[NetworkInfo]:
        """The datacenter's networks (standard and distributed portgroups): what `network_map` maps
        source networks to. A test VM's own network is listed as isolated."""
        from pyVmomi import vim

        out = []
        for n in self.target._datacenter().network:
            kind = (
                "distributed portgroup" if isinstance(n, vim.dvs.DistributedVirtualPortgroup) else "portgroup"
            )
            if isinstance(n, vim.dvs.VmwareDistributedVirtualSwitch):
                continue
            out.append(NetworkInfo(name=n.name, kind=kind, isolated=n.name.endswith("-isolated")))
        return sorted(out, key=lambda n: n.name)

    # ------------------------------------------------------------------ power

    def _task(self, name: str, what: str, start: Callable[[], Any]) -> None:
        """Start a task (`start`) and wait for it; a fault is one line naming the VM and `what`."""
        with calling(f"vm {name}: {what}"):
            task = start()
        self.session.wait(task, f"vm {name}: {what}")

    def power_on(self, name: str) -> VmRef:
        vm = self._vm(name)
        if vm.runtime.powerState != "poweredOn":
            self._task(name, "powering on", vm.PowerOnVM_Task)
        marks = self._marks(vm)
        assert marks is not None
        return self._ref(vm, marks)

    def power_off(self, name: str) -> VmRef:
        vm = self._clone(name) or self._production(name)
        if vm is None:
            return VmRef(name=name, platform=self.platform, point_id="", mode="test", state="gone")
        if vm.runtime.powerState != "poweredOff":
            self._task(name, "powering off", vm.PowerOffVM_Task)
        marks = self._marks(vm)
        assert marks is not None
        return self._ref(vm, marks)

    # ------------------------------------------------------------------ console and boot check

    def _console_text(self, vm: Any) -> str:
        port = self._console_port(vm)
        if port is None:
            return ""
        dc = self.target._datacenter()
        data = self.session.datastore_file(dc.name, str(port.backing.fileName))
        return data.decode("utf-8", "replace")

    def console(self, name: str) -> str:
        return "\n".join(console_lines(self._console_text(self._vm(name))))

    def boot_check(
        self, name: str, pattern: str, timeout: float, guest_agent: bool = False, status_checks: bool = False
    ) -> BootCheck:
        """Until `pattern` shows on the VM's serial console (its datastore file), the VM fails (powered
        off, a boot failure on the console) or `timeout`. With `guest_agent` or `status_checks`,
        VMware Tools must also run with a green heartbeat."""
        try:
            wanted = re.compile(pattern)
        except re.error as e:
            raise InvalidSpec(f"boot check pattern {pattern!r}: {e}") from None
        tools = guest_agent or status_checks
        vm = self._vm(name)
        start = time.monotonic()
        deadline = start + timeout
        while True:
            state = str(vm.runtime.powerState)
            running = str(vm.guest.toolsRunningStatus) if vm.guest is not None else ""
            beat = str(vm.guestHeartbeatStatus)
            text = self._console_text(vm)  # read after the status: it holds what the status judged
            lines = console_lines(text[: text.rfind("\n") + 1])  # whole lines decide
            last = (console_lines(text) or ["no console output"])[-1]
            seconds = round(time.monotonic() - start, 1)
            failure = next((m.group(0).strip() for ln in lines if (m := BOOT_FAILURE.search(ln))), None)
            hit = next((ln for ln in lines if wanted.search(ln)), None)
            tools_ok = running == "guestToolsRunning" and beat == "green"
            if state != "poweredOn":
                return BootCheck(
                    ok=False, seconds=seconds, evidence=f"the VM is {state}; console: {failure or last}",
                    via="status",
                )  # fmt: skip
            if failure is not None:
                return BootCheck(ok=False, seconds=seconds, evidence=failure, via="console")
            if hit is not None and (tools_ok or not tools):
                evidence = hit + ("; VMware Tools running, heartbeat green" if tools else "")
                return BootCheck(
                    ok=True, seconds=seconds, evidence=evidence, via="agent" if tools else "console"
                )
            if time.monotonic() >= deadline:
                if hit is not None:
                    why = (
                        f"VMware Tools not answering after {timeout:.0f} s ({running or 'no status'}, "
                        f"heartbeat {beat}); console: {hit}"
                    )
                    return BootCheck(ok=False, seconds=seconds, evidence=why, via="agent")
                return BootCheck(
                    ok=False,
                    seconds=seconds,
                    evidence=f"no /{pattern}/ on the console of VM {name} after {timeout:.0f} s; "
                    f"last line: {last}",
                    via="console",
                )
            time.sleep(self.poll_seconds)

    # ------------------------------------------------------------------ listings

    def _names_of_networks(self) -> dict[str, str]:
        """Portgroup -> the test VM name it was made for, for this job's leftover networks."""
        out: dict[str, str] = {}
        prefix = self._prefix()
        for host in self._hosts():
            for p in host.configManager.networkSystem.networkInfo.portgroup or []:
                pg = str(p.spec.name)
                if not pg.endswith("-isolated") or not pg.startswith(prefix):
                    continue
                base = pg[: -len("-isolated")]
                for cut in range(len(base) - 1, 0, -1):  # the name after the placeholder's part
                    if base[cut] == "-":
                        cand = base[cut + 1 :]
                        if (
                            cand
                            and self.clone_name(cand) == base
                            and p.spec.vswitchName == self._switch(cand)
                        ):
                            out[pg] = cand
                            break
        return out

    def list_vms(self) -> list[VmRef]:
        """This job's VMs: linked clones, the placeholder while it is a production VM, and a test VM's
        network that a create killed half-way left (state `incomplete`)."""
        refs: dict[str, VmRef] = {}
        dc = self.target._datacenter()
        prefix = self._prefix()
        for vm, vm_name in self.session._names(self.target._folder(dc)):
            if not vm_name.startswith(prefix):
                continue
            try:
                marks = self._marks(vm)
            except Exception:  # noqa: BLE001 (a VM removed meanwhile)
                continue
            if marks is not None:
                refs[marks["name"]] = self._ref(vm, marks)
        for name in self._names_of_networks().values():
            refs.setdefault(
                name, VmRef(name=name, platform=self.platform, point_id="", mode="test", state="incomplete")
            )
        return sorted(refs.values(), key=lambda r: r.name)

    # ------------------------------------------------------------------ destroy

    def destroy_vm(self, name: str) -> None:
        stays: list[str] = []
        vm = self._clone(name)
        if vm is not None:
            path = self._console_path(vm)
            if vm.runtime.powerState != "poweredOff":
                self._task(name, "powering off", vm.PowerOffVM_Task)
            self._task(name, f"removing {vm.name}", vm.Destroy_Task)
            stays += self._delete_file(path)
        ph = self._production(name)
        if ph is not None:
            path = self._console_path(ph)
            if ph.runtime.powerState != "poweredOff":
                self._task(name, "powering off", ph.PowerOffVM_Task)
            points = self.target._points(ph)
            if not points:
                raise TargetError(f"vm {name}: {self.target.label} has no point left to revert to")
            what = f"vm {name}: {self.target.label}: reverting to the newest point {points[0][0].point_id}"
            with calling(what):
                task = points[0][1].RevertToSnapshot_Task()  # (the point's configuration: no marks, no NICs)
            self.session.wait(task, what)
            stays += self._drop_failback_snapshots(ph, name)
            stays += self._delete_file(path)
        stays += self._drop_network(name)
        if stays:
            raise TargetError(f"vm {name}: what was made for it stays: {'; '.join(stays)}")
        if vm is not None or ph is not None:
            log.info("vm %s of job %s: destroyed", name, self.job)

    def _drop_failback_snapshots(self, vm: Any, name: str) -> list[str]:
        """A failback's snapshots of the VM (none left by a finished one): they go with it."""
        stays = []
        for n in snapshot_nodes(vm):
            if n.name.startswith(FAILBACK_PREFIX):
                try:
                    self._task(
                        name,
                        f"removing snapshot {n.name}",
                        functools.partial(
                            n.snapshot.RemoveSnapshot_Task, removeChildren=False, consolidate=True
                        ),
                    )
                except SendenseError as e:
                    stays.append(f"snapshot {n.name} ({e.message})")
        return stays

    def _delete_file(self, path: str) -> list[str]:
        dc = self.target._datacenter()
        fm = self.session.content.fileManager
        try:
            task = fm.DeleteDatastoreFile_Task(name=path, datacenter=dc)
            self.session.wait(task, f"deleting {path}")
        except Exception as e:  # noqa: BLE001 (said below)
            if is_fault(e, "FileNotFound") or "FileNotFound" in str(e) or "not found" in str(e).lower():
                return []
            log.debug("deleting %s", path, exc_info=True)
            return [f"file {path} ({_fault(e)})"]
        return []


def _fault(e: BaseException) -> str:
    from connectors.vsphere.session import fault_text

    return getattr(e, "message", None) or fault_text(e)
