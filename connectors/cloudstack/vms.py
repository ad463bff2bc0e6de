"""VMs from recovery points on a CloudStack target (sendense.protocols.VmProvisioner): a drill's test VM
on `target.drill_network`, a failover's VM on the mapped networks.

CloudStack refuses to import a volume with a backing file ("Volume with backing file cannot be
imported or unmanaged.", VolumeImportUnmanageManagerImpl), and a point is an overlay in a chain. So
for each of the point's disks the agent makes a flat qcow2 copy at the top of the pool's directory,
named by a fresh uuid as CloudStack names its files (`qemu-img convert`), with a persistent dirty
bitmap named for the point (`point_bitmap`: the VM's writes since the point, for a failback), and
`importVolume` (4.19.1+) makes it a Ready volume. Then `deployVirtualMachine` (startvm=false; the
spec's template, the spec's offering or the smallest that fits the plan, the networks), its allocated
ROOT detached and deleted, the imported boot disk attached at deviceid 0 (the VM's ROOT) and the
others after it in order. The point is never written: the VM runs on its copies.

Every step registers its undo before it runs: the VM's record (`vms/<name>/vm.json` in the job's
directory) names the flat files, then the volumes and the VM as they are made; what a step killed
before its answer was recorded made is found by what only this VM's can have (a volume whose path is
a recorded file, a VM of the VM's CloudStack name whose display name is the VM's marker). destroy_vm
stops (forced) and expunges the VM, deletes the imported volumes and removes the flat files: it is
the undo of a create cut short at any step, and no error for a VM that is gone.

The boot check: CloudStack says Running, then the console pattern. CloudStack's API has no console
text; the lab serves its VMs' serial consoles (`/_lab/vms/<id>/console`); against a real management
server the console cannot be read this way yet: the check fails saying so (a Running VM whose guest
was not seen is not a pass). The guest agent channel is not reachable through the API: refused in
one line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.cloudstack import api as csapi
from connectors.cloudstack import catalog
from connectors.cloudstack.spec import CloudStackTarget
from connectors.cloudstack.target import CloudStackTargetConnector
from connectors.kvm.identity import bitmap_prefix
from connectors.kvm.vm_state import vms_dir
from sendense import config
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import BootCheck, NetworkInfo, VmPlan, VmRef, boot_disks
from tools.boot import BOOT_FAILURE, console_lines
from tools.qemu import qemu_img

log = logging.getLogger(__name__)

NAME = re.compile(VmPlan.model_fields["name"].metadata[0].pattern)
POLL = 1.0


def cloud_name(spec: CloudStackTarget, name: str) -> str:
    """The VM's CloudStack name (a host name: letters, digits, hyphens, a letter first, at most 63)."""
    base = f"{spec.vm_name}-{name}" if spec.vm_name else name
    text = re.sub(r"[^A-Za-z0-9-]", "-", base).strip("-")
    if not text[:1].isalpha():
        text = "vm-" + text
    return text[:63].rstrip("-")


def tracker(job: str) -> str:
    """The name failback's change tracking goes by on a failed-over VM of `job` (bitmap and libvirt
    checkpoint prefix `sendense.Failback-<job>.`): libvirt's checkpoint names allow letters, digits,
    '_', '-' and '.', and a job name has no capital, so no job's own checkpoints, nor its `forget`,
    ever touch it (KVM's `failback~<job>` would be refused by libvirt)."""
    return f"Failback-{job}"


def point_bitmap(job: str, point_id: str) -> str:
    """The persistent dirty bitmap each flat copy gets when it is made: QEMU records in it, in the
    volume's own file, every write of the VM since its point (what a failback's first reverse sync
    copies). Migrations carry it with the file; a forced stop that kills QEMU leaves it inconsistent
    (a reverse sync then compares the whole disk). Named in failback's change tracking of the job
    (`tracker`), so the libvirt of the host the VM runs on adopts it as a checkpoint
    (LibvirtSource._adopt_carried): the first reverse snapshot's base (connectors.cloudstack.vm_changes)."""
    return f"{bitmap_prefix(tracker(job))}point-{point_id}"


class CloudStackVms:
    platform = "cloudstack"
    poll = POLL

    def __init__(self, job: str, spec: CloudStackTarget, job_id: str = "") -> None:
        self.job, self.spec, self.job_id = job, spec, job_id
        self.target = CloudStackTargetConnector(job, spec, job_id)
        self.api = self.target.api

    # ------------------------------------------------------------------ records

    def marker(self, name: str) -> str:
        """The display name that says a CloudStack VM is this job's VM `name`."""
        return f"sendense {self.job_id or self.job} {name}"

    def _dir(self, name: str) -> Path:
        if not NAME.match(name):
            raise InvalidSpec(f"VM name {name!r}: lower-case letters, digits, '_', '.', '-' (at most 63)")
        return vms_dir(self.target.kvm().dir) / name

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            rec: dict[str, Any] = json.loads((self._dir(name) / "vm.json").read_text())
        except FileNotFoundError:
            return None
        return rec

    def _write(self, name: str, rec: dict[str, Any]) -> None:
        d = self._dir(name)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "vm.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, d / "vm.json")

    def _vm(self, name: str, rec: dict[str, Any] | None) -> dict[str, Any] | None:
        """The VM in CloudStack: by the recorded id, else by its name and marker."""
        if rec and rec.get("vm_id"):
            try:
                found = self.api.list("listVirtualMachines", "virtualmachine", f"VM {name}", id=rec["vm_id"])
            except ResourceNotFound:
                found = []
            return found[0] if found else None
        z = csapi.zone(self.api, self.spec, "target")
        csname = cloud_name(self.spec, name)
        found = [
            v
            for v in self.api.list(
                "listVirtualMachines", "virtualmachine", f"VM {name}", zoneid=z["id"], name=csname
            )
            if v.get("name") == csname and v.get("displayname") == self.marker(name)
        ]
        return found[0] if found else None

    def _volume(self, rec: dict[str, Any], key: str) -> dict[str, Any] | None:
        """Disk `key`'s imported volume: by its recorded id, else the pool's volume on its flat file."""
        vid = rec.get("volumes", {}).get(key)
        try:
            if vid:
                found = self.api.list("listVolumes", "volume", f"volume of VM {rec['name']}", id=vid)
            else:
                pool = self.target.pool()
                found = self.api.list(
                    "listVolumes", "volume", f"volumes of VM {rec['name']}",
                    storageid=pool["id"], name=self._volume_name(rec, key),
                )  # fmt: skip
                found = [v for v in found if v.get("path") == rec["files"][key]]
        except ResourceNotFound:
            found = []
        return found[0] if found else None

    def _volume_name(self, rec: dict[str, Any], key: str) -> str:
        return f"{rec['cloud_name']}-{key}"

    def _ref(self, name: str, rec: dict[str, Any] | None, vm: dict[str, Any] | None = None) -> VmRef:
        if rec is None:
            return VmRef(name=name, platform=self.platform, point_id="", mode="test", state="incomplete")
        plan = VmPlan.model_validate(rec["plan"])
        vm = vm if vm is not None else self._vm(name, rec)
        state = str(vm["state"]).lower() if vm and rec.get("complete") else "incomplete"
        return VmRef(name=name, platform=self.platform, point_id=plan.point_id, mode=plan.mode,
                     vm_id=str(vm["id"]) if vm else "", state=state)  # fmt: skip

    def _load(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        rec = self._read(name)
        vm = self._vm(name, rec) if rec else None
        if rec is None or vm is None:
            raise ResourceNotFound(f"VM {name}: not found on job {self.job} (CloudStack {self.spec.zone})")
        return rec, vm

    # ------------------------------------------------------------------ create

    def create_vm(self, plan: VmPlan) -> VmRef:
        rec = self._read(plan.name)
        if rec is not None:
            if VmPlan.model_validate(rec["plan"]) != plan:
                raise InvalidSpec(
                    f"VM {plan.name}: exists on job {self.job} from another plan; destroy it or choose "
                    "another name"
                )
            if rec.get("complete"):
                return self._ref(plan.name, rec)
            log.info("job %s: VM %s was cut short; made again", self.job, plan.name)
            self.destroy_vm(plan.name)
        point = self.target.get_point(plan.point_id)
        disks = boot_disks(point, plan.disks)
        z = csapi.zone(self.api, self.spec, "target")
        # everything the plan can be refused for, before anything is made
        offering = catalog.service_offering(self.api, self.spec, plan)
        tmpl = catalog.template(self.api, self.spec, str(z["id"]))
        disk_offering = catalog.disk_offering(self.api, self.spec)
        nets = catalog.networks(self.api, self.spec, plan, str(z["id"]))
        pool = self.target.check_pool(sum(d.size for d in disks))
        pool_dir = self.target.directory()
        rec = {
            "name": plan.name,
            "plan": plan.model_dump(mode="json"),
            "cloud_name": cloud_name(self.spec, plan.name),
            "keys": [d.key for d in disks],
            "files": {d.key: str(uuid.uuid4()) for d in disks},  # flat copies, named as CloudStack names
            "volumes": {},
            "vm_id": "",
            "complete": False,
        }
        self._write(plan.name, rec)  # first: destroy_vm finds all that follows through it
        for d in disks:
            self._flat_copy(plan, d.key, pool_dir / rec["files"][d.key])
            vol = self.api.job(
                "importVolume", f"VM {plan.name}: importVolume of disk {d.key}",
                storageid=pool["id"], path=rec["files"][d.key], name=self._volume_name(rec, d.key),
                diskofferingid=disk_offering["id"] if disk_offering else None,
            )["volume"]  # fmt: skip
            rec["volumes"][d.key] = vol["id"]
            self._write(plan.name, rec)
        vm = self.api.job(
            "deployVirtualMachine", f"VM {plan.name}: deployVirtualMachine {rec['cloud_name']}",
            zoneid=z["id"], templateid=tmpl["id"], serviceofferingid=offering["id"],
            networkids=[n["id"] for n in nets], name=rec["cloud_name"], displayname=self.marker(plan.name),
            startvm=False,
        )["virtualmachine"]  # fmt: skip
        rec["vm_id"] = vm["id"]
        self._write(plan.name, rec)
        for v in csapi.vm_volumes(self.api, vm):  # the template's ROOT: the point's boot disk replaces it
            if v.get("type") == "ROOT" and v["id"] not in rec["volumes"].values():
                self.api.job("detachVolume", f"VM {plan.name}: detachVolume {v['name']}", id=v["id"])
                self.api.call("deleteVolume", f"VM {plan.name}: deleteVolume {v['name']}", id=v["id"])
        for n, key in enumerate(rec["keys"]):
            self.api.job(
                "attachVolume", f"VM {plan.name}: attachVolume of disk {key}",
                id=rec["volumes"][key], virtualmachineid=vm["id"], deviceid=n,
            )  # fmt: skip
        rec["complete"] = True
        self._write(plan.name, rec)
        log.info("job %s: VM %s (%s) made from point %s (%s, %s)", self.job, plan.name, rec["cloud_name"],
                 plan.point_id, offering.get("name"), plan.mode)  # fmt: skip
        return self._ref(plan.name, rec)

    def _flat_copy(self, plan: VmPlan, key: str, dest: Path) -> None:
        """The point's disk as one flat qcow2 (no backing file), made aside and renamed into place."""
        if dest.exists():
            return
        part = dest.with_name(dest.name + ".part")
        part.unlink(missing_ok=True)
        kvm = self.target.kvm()
        with kvm.locked():  # prune never merges a point while it is read
            src = kvm.point_path(plan.point_id, key)
            try:
                qemu_img("convert", "-q", "-f", "qcow2", "-O", "qcow2", str(src), str(part))
                qemu_img("bitmap", "--add", str(part), point_bitmap(self.job, plan.point_id))
            except SendenseError as e:
                part.unlink(missing_ok=True)
                reason = e.message.replace(str(part), dest.name).replace(str(src), f"point {plan.point_id}")
                raise TargetError(
                    f"VM {plan.name}: cannot copy disk {key} to {self.spec.storage}: {reason}"
                ) from None
        os.replace(part, dest)

    # ------------------------------------------------------------------ destroy

    def destroy_vm(self, name: str) -> None:
        rec = self._read(name)
        stays: list[str] = []
        vm = self._vm(name, rec)
        if vm is not None:
            try:
                if vm.get("state") not in ("Stopped", "Destroyed"):
                    self.api.job(
                        "stopVirtualMachine", f"VM {name}: stopVirtualMachine", id=vm["id"], forced=True
                    )
                self.api.job(
                    "destroyVirtualMachine", f"VM {name}: destroyVirtualMachine", id=vm["id"], expunge=True
                )
            except ResourceNotFound:
                pass
            except SendenseError as e:
                stays.append(f"VM {vm['name']} ({e.message})")
        if rec is not None and not stays:
            pool_dir = self.target.directory()
            for key, file in rec["files"].items():
                vol = self._volume(rec, key)
                if vol is not None:
                    try:
                        self.api.call("deleteVolume", f"VM {name}: deleteVolume {vol['name']}", id=vol["id"])
                    except ResourceNotFound:
                        pass
                    except SendenseError as e:
                        stays.append(f"volume {vol['name']} ({e.message})")
                        continue
                for f in (pool_dir / file, pool_dir / f"{file}.part"):
                    f.unlink(missing_ok=True)
        if stays:
            raise TargetError(f"destroy of VM {name}: what was made for it stays: {'; '.join(stays)}")
        if rec is not None:
            shutil.rmtree(self._dir(name), ignore_errors=True)
        try:
            self._dir(name).parent.rmdir()  # the job's last VM: its vms/ directory goes too
        except OSError:
            pass
        log.info("job %s: VM %s destroyed", self.job, name)

    # ------------------------------------------------------------------ power

    def power_on(self, name: str) -> VmRef:
        rec, vm = self._load(name)
        if not rec.get("complete"):
            raise TargetError(f"VM {name}: not fully created: create_vm it again")
        if vm.get("state") != "Running":
            # on this agent's host if it is one of the zone's: its boot check can then ask the guest
            # agent through the host's libvirt (CloudStack's API reaches no guest)
            here = self._this_host()
            vm = self.api.job(
                "startVirtualMachine", f"VM {name}: startVirtualMachine", id=vm["id"],
                hostid=here["id"] if here else None,
            )["virtualmachine"]  # fmt: skip
            rec["started_at"] = datetime.now(UTC).timestamp()
            self._write(name, rec)
        return self._ref(name, rec, vm)

    def power_off(self, name: str) -> VmRef:
        rec = self._read(name)
        vm = self._vm(name, rec) if rec else None
        if vm is None:
            return VmRef(name=name, platform=self.platform, point_id="", mode="test", state="absent")
        if vm.get("state") not in ("Stopped", "Destroyed"):
            vm = self.api.job(
                "stopVirtualMachine", f"VM {name}: stopVirtualMachine", id=vm["id"], forced=True
            )["virtualmachine"]
        return self._ref(name, rec, vm)

    # ------------------------------------------------------------------ observe

    def _console(self, vm_id: str) -> str | None:
        """The VM's serial console text: a lab serves it; a management server has none (None)."""
        base = self.spec.url.rstrip("/").rsplit("/client/api", 1)[0]
        url = f"{base}/_lab/vms/{vm_id}/console"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                # a front end that answers every path (a login page, a redirect) serves no console
                if r.geturl() != url or not r.headers.get("Content-Type", "").startswith("text/plain"):
                    return None
                return bytes(r.read()).decode(errors="replace")
        except urllib.error.HTTPError:
            return None
        except OSError as e:
            raise TargetError(
                f"console of CloudStack VM {vm_id}: cannot reach {base}: {e}", retryable=True
            ) from None

    def console(self, name: str) -> str:
        _, vm = self._load(name)
        return "\n".join(console_lines(self._console(str(vm["id"])) or ""))

    def boot_check(
        self, name: str, pattern: str, timeout: float, guest_agent: bool = False, status_checks: bool = False
    ) -> BootCheck:
        """CloudStack says Running, then `pattern` on the console, within `timeout`; a VM Stopped or in
        Error, or a console that shows the guest cannot boot, is a failure with that evidence."""
        try:
            wanted = re.compile(pattern)
        except re.error as e:
            raise InvalidSpec(f"boot check pattern {pattern!r}: {e}") from None
        rec, vm = self._load(name)
        started = float(rec.get("started_at") or time.time())
        deadline = time.monotonic() + timeout
        while True:
            vm = self._vm(name, rec) or {"state": "Expunged", "id": rec.get("vm_id", "")}
            state = str(vm["state"])
            text = self._console(str(vm["id"])) if state == "Running" else None
            seconds = round(max(0.0, time.time() - started), 2)
            if guest_agent and state == "Running":
                answered, where = self._agent_answers(vm)
                if answered:
                    hit = next((ln for ln in console_lines(text or "") if wanted.search(ln)), None)
                    evidence = f"the guest agent answered guest-sync through {where}" + (
                        f"; {hit}" if hit else ""
                    )
                    return BootCheck(ok=True, seconds=seconds, evidence=evidence, via="agent")
                if where.startswith("not here"):
                    return BootCheck(ok=False, seconds=seconds, evidence=f"VM {name} {where}", via="agent")
                if time.monotonic() >= deadline:
                    why = f"the guest agent did not answer within {timeout:g}s ({where})"
                    return BootCheck(ok=False, seconds=seconds, evidence=why, via="agent")
                time.sleep(self.poll)
                continue
            if state == "Running" and text is None:  # unverified: never a pass
                why = (
                    f"VM {name} is Running, but {pattern!r} cannot be looked for: CloudStack's API has no "
                    "console text (recovery.boot_check.guest_agent: true asks the guest agent through the "
                    "host's libvirt)"
                )
                return BootCheck(ok=False, seconds=seconds, evidence=why, via="status")
            lines = console_lines((text or "")[: (text or "").rfind("\n") + 1])
            last = (lines or ["no console output"])[-1]
            if failure := next((m.group(0).strip() for ln in lines if (m := BOOT_FAILURE.search(ln))), None):
                return BootCheck(ok=False, seconds=seconds, evidence=failure, via="console")
            if hit := next((ln for ln in lines if wanted.search(ln)), None):
                evidence = hit + ("; CloudStack says Running" if status_checks else "")
                return BootCheck(ok=True, seconds=seconds, evidence=evidence, via="console")
            if state not in ("Running", "Starting"):
                why = f"VM {name} is {state} in CloudStack; last console line: {last}"
                return BootCheck(ok=False, seconds=seconds, evidence=why, via="status")
            if time.monotonic() >= deadline:
                why = f"no {pattern!r} within {timeout:g}s; last line: {last}"
                return BootCheck(ok=False, seconds=seconds, evidence=why, via="console")
            time.sleep(self.poll)

    def _this_host(self) -> dict[str, Any] | None:
        """The zone's KVM host this agent runs on (its host id is the host's name), if any."""
        z = csapi.zone(self.api, self.spec, "target")
        me = config.host_id()
        hosts = self.api.list("listHosts", "host", f"listHosts {me}", zoneid=z["id"], name=me, type="Routing")
        return next((h for h in hosts if h.get("name") == me), None)

    def _agent_answers(self, vm: dict[str, Any]) -> tuple[bool, str]:
        """(whether the VM's guest agent answers `guest-sync` through this host's libvirt, where or why
        not). The VM must run on this agent's host: CloudStack's API reaches no guest."""
        import libvirt
        import libvirt_qemu

        from connectors.kvm import guest_agent
        from connectors.kvm.inventory import DEFAULT_URI, URIS_ENV

        me = config.host_id()
        if vm.get("hostname") != me:
            return False, f"not here: it runs on host {vm.get('hostname')}, not on this agent's host {me}"
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        uris = [u.strip() for u in (os.environ.get(URIS_ENV) or DEFAULT_URI).split(",") if u.strip()]
        for uri in uris:
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError:
                continue
            try:
                dom = conn.lookupByUUIDString(str(vm["id"]))
            except libvirt.libvirtError:
                conn.close()
                continue
            try:
                ident = guest_agent.new_id()
                cmd = json.dumps({"execute": "guest-sync", "arguments": {"id": ident}})
                out = libvirt_qemu.qemuAgentCommand(dom, cmd, 5, 0)
                return guest_agent.answered(str(out).encode(), {ident}), f"host {me}'s libvirt"
            except libvirt.libvirtError as e:
                return False, f"host {me}'s libvirt: {e.get_error_message()}"
            finally:
                conn.close()
        return False, f"no libvirt of host {me} ({URIS_ENV}) runs it"

    def list_vms(self) -> list[VmRef]:
        d = vms_dir(self.target.kvm().dir)
        names = sorted(p.name for p in d.iterdir() if p.is_dir() and NAME.match(p.name)) if d.is_dir() else []
        return [self._ref(n, self._read(n)) for n in names]

    def list_networks(self) -> list[NetworkInfo]:
        z = csapi.zone(self.api, self.spec, "target")
        drill = self.spec.drill_network
        return [
            NetworkInfo(
                name=str(n["name"]), kind=str(n.get("type", "")), isolated=drill in (n["id"], n["name"])
            )
            for n in self.api.list("listNetworks", "network", "listNetworks", zoneid=z["id"])
        ]
