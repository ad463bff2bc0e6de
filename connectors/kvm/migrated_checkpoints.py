"""A libvirt source that follows its domain across live migrations: the base checkpoint, which libvirt
does not migrate (a transient domain's checkpoint records stay with the libvirt that made them), is
redefined on the new host's libvirt from the persistent dirty bitmap QEMU brought along, so the next
sync is incremental instead of a resync.

Why the bitmap can be trusted: QEMU stores a persistent bitmap into the qcow2 as the source QEMU lets
the image go at the end of the migration (after its last write), and the destination QEMU loads it,
recording, as it takes the image over (before the guest's first write there). Every write since the
checkpoint, on either host, is in it, unless it was not stored (the source QEMU crashed: the image's
bitmap is then `inconsistent`), was disabled (not `recording`) or is missing.

So a checkpoint unknown to this libvirt is redefined (virDomainCheckpointCreateXML with REDEFINE and
REDEFINE_VALIDATE) only when every disk whose base it is (and whose identity holds: the same domain,
target and image file) has the checkpoint's bitmap, persistent, recording, not inconsistent and not
busy, as QEMU itself says (QMP query-block through libvirt). Otherwise nothing is redefined and those
disks are resynced as before, their `tracking_lost` saying why the bitmap was not taken. libvirt's
REDEFINE_VALIDATE checks the bitmaps again on its side: libvirt 9.0 refuses a disabled bitmap too
("checkpoint inconsistent: missing or broken bitmap", tests/connectors/cloudstack), and so does its
backupBegin; the checks here come first so that the reason is said per bitmap, and so that no disk
of a checkpoint is adopted while another of its disks is resynced.

A subclass, used where domains move under the job (connectors.cloudstack): the KVM source of a
libvirt domain the operator names keeps its plain behaviour.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any

import libvirt

from connectors.kvm.identity import libvirt_identity, libvirt_identity_problem, split_change_id
from connectors.kvm.libvirt_job import error_text
from connectors.kvm.libvirt_source import LibvirtSource
from sendense.models import SnapshotRef

log = logging.getLogger(__name__)

REDEFINE = (
    libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
)


def bitmap_problem(bitmap: dict[str, Any] | None, name: str, key: str) -> str | None:
    """Why QEMU's dirty bitmap `name` of disk `key` cannot stand for a checkpoint, None if it can."""
    if bitmap is None:
        return f"disk {key} has no dirty bitmap {name}"
    for bad, why in (
        (not bitmap.get("persistent"), "not persistent"),
        (not bitmap.get("recording"), "not recording (disabled)"),
        (bitmap.get("inconsistent"), "inconsistent (not stored cleanly)"),
        (bitmap.get("busy"), "busy (in use by a block job)"),
    ):
        if bad:
            return f"dirty bitmap {name} of disk {key} is {why}"
    return None


class FollowsMigrations(LibvirtSource):
    """LibvirtSource that redefines, from the bitmaps QEMU loaded, the base checkpoint a live migration
    left behind on the domain's old host (see the module)."""

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        refused: dict[str, str] = {}
        if any(base.values()):
            with self._dom() as dom:
                self._running(dom)
                refused = self._adopt(dom, base)
        snap = super().create_snapshot(snapshot_id, base)
        if not refused:
            return snap
        disks = []
        for d in snap.disks:
            cp = split_change_id(d.base_change_id or "")[0]
            if d.tracking_lost and cp in refused:
                d = d.model_copy(update={"tracking_lost": f"{d.tracking_lost}: {refused[cp]}"})
            disks.append(d)
        return snap.model_copy(update={"disks": disks})

    def _adopt(self, dom: libvirt.virDomain, base: dict[str, str | None]) -> dict[str, str]:
        """Redefine the bases this libvirt does not know; {checkpoint: why not} for those refused."""
        disks, others = self._disks(dom)
        uuid = dom.UUIDString()
        wanted: dict[str, list[str]] = {}  # checkpoint -> disks whose base it is
        for d in disks:
            since = base.get(d.target)
            if not since or libvirt_identity_problem(
                since, libvirt_identity(uuid, d.target, d.source), self.domain, d.target, d.source
            ):
                continue
            cp = split_change_id(since)[0]
            if cp.startswith(self.prefix):
                wanted.setdefault(cp, []).append(d.target)
        known = set(self._checkpoint_names(dom))
        todo = {cp: keys for cp, keys in wanted.items() if cp not in known}
        if not todo:
            return {}
        bitmaps = self._bitmaps(dom)
        refused: dict[str, str] = {}
        for cp, keys in sorted(todo.items()):
            problems = [p for k in keys if (p := bitmap_problem(bitmaps.get(k, {}).get(cp), cp, k))]
            if problems:
                refused[cp] = "not redefined from the image's bitmap: " + "; ".join(problems)
                continue
            xml = self._redefine_xml(cp, [d.target for d in disks], set(keys), others)
            try:
                dom.checkpointCreateXML(xml, REDEFINE)
            except libvirt.libvirtError as e:
                refused[cp] = f"libvirt refused to redefine it from the image's bitmap: {error_text(e)}"
                continue
            log.info(
                "%s: checkpoint %s redefined from the dirty bitmaps QEMU brought along (disks %s)",
                self._where(), cp, ", ".join(keys),
            )  # fmt: skip
        for cp, why in refused.items():
            log.warning("%s: checkpoint %s %s", self._where(), cp, why)
        return refused

    def _bitmaps(self, dom: libvirt.virDomain) -> dict[str, dict[str, dict[str, Any]]]:
        """QEMU's dirty bitmaps of each disk's top image: {target: {name: bitmap}} (QMP query-block)."""
        import libvirt_qemu

        root = ET.fromstring(dom.XMLDesc(0))
        qdevs: dict[str, str] = {}
        for d in root.findall("./devices/disk"):
            t, a = d.find("target"), d.find("alias")
            if t is not None and a is not None and t.get("dev"):
                qdevs[f"/machine/peripheral/{a.get('name')}/virtio-backend"] = str(t.get("dev"))
                qdevs[str(a.get("name"))] = str(t.get("dev"))
        try:
            out = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "query-block"}), 0)
        except libvirt.libvirtError as e:
            log.warning("%s: query-block failed: %s", self._where(), error_text(e))
            return {}
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for b in json.loads(out).get("return", []):
            key = qdevs.get(str(b.get("qdev", ""))) or qdevs.get(str(b.get("device", "")))
            inserted = b.get("inserted") or {}
            if key:
                found[key] = {str(m.get("name")): m for m in inserted.get("dirty-bitmaps", []) or []}
        return found

    @staticmethod
    def _redefine_xml(name: str, targets: list[str], tracked: set[str], others: list[str]) -> str:
        root = ET.Element("domaincheckpoint")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "creationTime").text = str(int(datetime.now(UTC).timestamp()))
        el = ET.SubElement(root, "disks")
        for t in targets:
            if t in tracked:
                ET.SubElement(el, "disk", name=t, checkpoint="bitmap", bitmap=name)
            else:
                ET.SubElement(el, "disk", name=t, checkpoint="no")
        for t in others:
            ET.SubElement(el, "disk", name=t, checkpoint="no")
        return ET.tostring(root, encoding="unicode")
