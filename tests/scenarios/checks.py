"""What the scenario rig checks after every step, against the shadow model:

- the points listed are exactly the model's (none lost unless retention removed it, none extra);
- every listed point exports exactly its shadow (bytes and size of each disk) and its metadata
  never changes once committed;
- nothing leaks: no qemu/qemu-nbd process on the scenario's files, no bitmap of the job beyond the
  newest committed point's (and the open sync's), no pending replica, block record or resume token
  but the open sync's, no snapshot on the AWS lab that is not a point's or the open sync's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from connectors.kvm.offline import bitmap_prefix
from sendense.models import PointInfo

if TYPE_CHECKING:
    from scenarios.rig import Scenario
    from scenarios.shadow import ShadowPoint


def point_meta(p: PointInfo) -> dict[str, Any]:
    """What must never change about a committed point."""
    return {
        "kind": p.kind,
        "created_at": p.created_at.isoformat(),
        "disks": [(d.key, d.size, d.change_id) for d in p.disks],
    }


def check_all(sc: Scenario) -> None:
    if not sc.shadow.disks or (sc.src.form == "qmp" and not sc.src.started):  # type: ignore[union-attr]
        return  # before the first disk: no job yet
    listed = sc.target().list_points()
    ids = [p.point_id for p in listed]
    want = [p.point_id for p in reversed(sc.shadow.points)]
    if ids != want:
        sc.fail(f"points listed {ids}, the model has {want}")
    for p in listed:
        if point_meta(p) != sc.committed[p.point_id]:
            sc.fail(f"point {p.point_id} changed: {point_meta(p)} was {sc.committed[p.point_id]}")
    exports(sc)
    leaks(sc, listed)


def exports(sc: Scenario) -> None:
    tgt = sc.target()
    out = sc.root / "export"
    for sp in sc.shadow.points:
        files = dict(tgt.export(sp.point_id, "raw", out))
        files_match(sc, sp, files, "export")
    shutil.rmtree(out, ignore_errors=True)


def files_match(sc: Scenario, sp: ShadowPoint, files: dict[str, Path], what: str) -> None:
    if sorted(files) != sorted(sp.disks):
        sc.fail(f"{what} of point {sp.point_id}: disks {sorted(files)}, the model {sorted(sp.disks)}")
    for key, path in files.items():
        data, want = path.read_bytes(), sp.disks[key]
        path.unlink()
        if len(data) != len(want):
            sc.fail(f"{what} of point {sp.point_id} disk {key}: {len(data)} bytes, the model {len(want)}")
        if data != want:
            at = next(i for i, (a, b) in enumerate(zip(data, want, strict=True)) if a != b)
            sc.fail(
                f"{what} of point {sp.point_id} disk {key}: content differs at offset {at} "
                f"(0x{data[at]:02x}, the model 0x{want[at]:02x})"
            )


def source_matches_shadow(sc: Scenario) -> None:
    """The model of the guest's writes is right (else a failure would be the model's, not the
    product's): checked at each snapshot instant."""
    for i, d in enumerate(sc.shadow.disks):
        got = sc.src.content(i, sc.root / "source.raw")
        if got != bytes(d.data):
            want = bytes(d.data)
            n = min(len(got), len(want))
            at = next((k for k in range(n) if got[k] != want[k]), n)
            sc.fail(
                f"the shadow of source disk {i} is wrong (the model is broken): first difference at byte "
                f"{at} (source {len(got)} bytes, shadow {len(want)})"
            )


# ---------------------------------------------------------------------- leaks

LEAK_GRACE = 10.0


def _qemu_processes(sc: Scenario) -> list[str]:
    procs = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if (
            (p.info["name"] or "").startswith("qemu")
            and p.info["status"] != psutil.STATUS_ZOMBIE
            and str(sc.root) in cmd
            and p.pid not in sc.src.own_pids()
        ):
            procs.append(f"{p.pid} {cmd[:120]}")
    return procs


def leaks(sc: Scenario, listed: list[PointInfo]) -> None:
    # A SIGKILLed copy worker's qemu-nbd dies with it (pdeathsig), a moment later on a loaded machine:
    # a process still there after LEAK_GRACE seconds is a leak (the slow tier once saw it 0 s after).
    deadline = time.monotonic() + LEAK_GRACE
    while (procs := _qemu_processes(sc)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if procs:
        sc.fail(f"processes left running: {procs}")
    opened = sc.shadow.open
    open_id = opened.sync_id if opened is not None else None
    snapped = opened is not None and opened.snapped
    prefix = bitmap_prefix(sc.job)
    latest = sc.shadow.latest()
    for i, d in enumerate(sc.shadow.disks):
        want = set()
        if latest is not None:  # the change id the newest point recorded for this image
            ids = {k: c for k, _, c in sc.committed[latest.point_id]["disks"]}
            want |= {ids[k] for k, ident in latest.idents.items() if ident == d.ident}
        if snapped and sc.open_snap is not None:  # and the open sync's snapshot of it
            ids = {x.key: x.change_id for x in sc.open_snap.disks}
            want |= {ids[k] for k, ident in opened.idents.items() if ident == d.ident}  # type: ignore[union-attr]
        have = {b for b in sc.src.bitmaps(i) if b.startswith(prefix)}
        if have != want:
            sc.fail(f"source disk{i}: the job's bitmaps are {sorted(have)}, expected {sorted(want)}")
    if not snapped and sc.src.leftovers():
        sc.fail(f"left in QEMU: {sc.src.leftovers()}")
    fleece = sorted(str(f) for f in (sc.home / "work" / sc.job / "fleece").glob("*/*"))
    if not snapped and fleece:
        sc.fail(f"fleece files left: {fleece}")
    work = sc.home / "work" / sc.job
    tokens = [f.name for f in (work / "tokens").glob("*.json") if not f.name.startswith(f"{open_id}-")]
    if tokens:
        sc.fail(f"resume tokens left: {tokens}")
    records = sorted(f.name for f in (work / "finishing").glob("*"))
    if len(records) > 1 or any(not r.endswith(".json") for r in records):
        sc.fail(f"finish records left: {records}")
    if sc.target_kind == "kvm":
        kvm_target_files(sc, listed, open_id)
    elif sc.target_kind == "vsphere":
        vsphere_snapshots(sc, listed)
    else:
        aws_snapshots(sc, listed, open_id)


def kvm_target_files(sc: Scenario, listed: list[PointInfo], open_id: str | None) -> None:
    jd = sc.root / "rep" / sc.job
    allowed = {f"{p.point_id}.qcow2" for p in listed}
    if open_id is not None:
        allowed.add(f"{open_id}.pending.qcow2")
    odd = sorted(str(f.relative_to(jd)) for f in jd.glob("disks/*/*") if f.name not in allowed)
    manifests = {f.name for f in jd.glob("points/*")}
    odd += sorted(m for m in manifests - {f"{p.point_id}.json" for p in listed})
    for p in listed:  # every disk file of a point is there
        for d in p.disks:
            if not Path(d.path or "").is_file():
                odd.append(f"missing {d.path}")
    if odd:
        sc.fail(f"target files not belonging to a point: {odd}")


def aws_snapshots(sc: Scenario, listed: list[PointInfo], open_id: str | None) -> None:
    ec2 = sc.lab_ec2()
    ours = {d.path for p in listed for d in p.disks}
    odd = []
    for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]:
        tags = {t["Key"]: t["Value"] for t in s.get("Tags", [])}
        if sc.job not in tags.values() and sc.job not in s.get("Description", ""):
            continue
        if s["SnapshotId"] in ours or (open_id is not None and tags.get("sendense:sync") == open_id):
            continue
        odd.append(f"{s['SnapshotId']} {s['State']} {json.dumps(tags, sort_keys=True)[:200]}")
    if odd:
        sc.fail(f"AWS snapshots not belonging to a point: {odd}")
    state = sc.home / "aws-target" / sc.job
    records = sorted(f.name for f in state.glob("*.blocks")) if open_id is None else []
    if records:
        sc.fail(f"block records left: {records}")


def vsphere_snapshots(sc: Scenario, listed: list[PointInfo]) -> None:
    """The placeholder VM's snapshots are exactly the points' (an unfinished sync writes the VM's
    current disks, never a snapshot)."""
    from connectors.vsphere.target import POINT_PREFIX

    si = sc.lab.si()
    vm = si.RetrieveContent().searchIndex.FindByInventoryPath(f"DC0/vm/sendense-{sc.job}")
    names: list[str] = []
    todo = list(vm.snapshot.rootSnapshotList) if vm is not None and vm.snapshot is not None else []
    while todo:
        n = todo.pop()
        todo.extend(n.childSnapshotList or [])
        names.append(n.name)
    want = sorted(POINT_PREFIX + p.point_id for p in listed)
    if sorted(names) != want:
        sc.fail(f"placeholder snapshots {sorted(names)}, the points' {want}")
