"""A VMware source's full sync through the vSphere lab's data path, against nbdcopy from the same export.

The vSphere lab (`labs.vsphere`, started here as `sendense lab up` does) gets a VM whose `--size` disk
holds the shared mixed source image (40/20/40 random/zero/text, `full_sync.source_image`). The vSphere
source connector takes one VM snapshot (CBT on), then each run copies that snapshot's disk two ways,
in alternating order, into a fresh qcow2 served by a writable qemu-nbd (the KVM target's settings):

- engine: the connector's disk (`open_disk`: nbdkit with the lab's VDDK stand-in, `snapshot=`; the
  allocated areas from `QueryChangedDiskAreas("*")`, up to 2000 areas per reply as vSphere answers,
  split by the export's block status) through `sendense.datapath.sync.copy_disk`, default tuning;
- nbdcopy: `nbdcopy --flush --destination-is-zero` from the same kind of export (the connector's
  own nbdkit, started the same way) to the same kind of target.

The first engine copy is compared with the source image (`qemu-img compare`). The lab's VDDK stand-in
is an nbdkit Python plugin over qemu-nbd (labs/vsphere/NOTES.md: ~0.55-0.7x of qemu-nbd alone): the
figure is the engine against the best reader of the same export, not against VDDK.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from bench.full_sync import source_image
from bench.harness import Bench, GiB, median
from bench.images import qcow2, run, same_content
from connectors.kvm.target import REPLICA_OPTIONS, PendingDisk
from sendense.datapath.sync import copy_disk
from sendense.models import Tuning
from tools.qemu import qemu_img, qemu_nbd


async def measure(bench: Bench) -> dict[str, Any]:
    from connectors.vsphere.source import VsphereSourceConnector
    from connectors.vsphere.spec import VsphereSource
    from labs.vsphere import hook

    size = bench.opts.size
    src = source_image(bench)
    t0 = time.monotonic()
    # as vSphere answers (~2000 areas per QueryChangedDiskAreas reply; the lab's default of 2 is for
    # the tests, which must see paging bugs)
    os.environ.setdefault("SENDENSE_VCSIM_CBT_MAX_EXTENTS", "2000")
    described = hook.up()
    lab = hook.attach()
    assert lab is not None, "the vSphere lab did not start"
    start_seconds = time.monotonic() - t0
    name = f"bench-{uuid.uuid4().hex[:6]}"
    moref = lab.make_vm(name, [size])
    try:
        from pyVmomi import vim

        disk = next(
            d for d in lab.vm(moref).config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
        )
        info = lab.disk_info(moref, str(getattr(disk.backing, "fileName", "")))
        qemu_img("convert", "-n", "--target-is-zero", "-O", info["format"], str(src), info["path"])
        spec = VsphereSource.model_validate({**described["source"], "vm": name})
        conn = VsphereSourceConnector(name, spec, bench.dir("vs-work"))
        snap = conn.create_snapshot("s1", {})
        key = snap.disks[0].key
        runs: list[dict[str, Any]] = []
        try:
            for i in range(bench.opts.runs):
                order = ["engine", "nbdcopy"] if i % 2 == 0 else ["nbdcopy", "engine"]
                r: dict[str, Any] = {"order": order}
                for tool in order:
                    dst = qcow2(bench.dir("vs-ref") / f"{tool}.qcow2", size, REPLICA_OPTIONS)
                    try:
                        with conn.open_disk(snap, key) as sd, qemu_nbd(dst, readonly=False) as d:
                            t = time.monotonic()
                            if tool == "engine":
                                stats = copy_disk(
                                    sd, PendingDisk(d.uri, size, has_base=False), snap.disk(key), Tuning(),
                                    on_checkpoint=lambda *_: None,
                                )  # fmt: skip
                                r["engine_bytes_read"] = stats.stats.bytes_read
                            else:
                                run("nbdcopy", "--flush", "--destination-is-zero", sd.uri, d.uri)
                            r[f"{tool}_seconds"] = time.monotonic() - t
                        if tool == "engine" and i == 0:
                            r["bit_exact"] = same_content(dst, src)
                    finally:
                        dst.unlink(missing_ok=True)
                r["ratio_vs_nbdcopy"] = r["nbdcopy_seconds"] / r["engine_seconds"]
                runs.append(r)
        finally:
            conn.release_snapshot(snap, committed=False)
            conn.forget()
    finally:
        try:
            lab.wait(lab.vm(moref).Destroy_Task())
        finally:
            hook.down()
    return {
        "size_gib": round(size / GiB, 3),
        "lab_start_seconds": round(start_seconds, 2),
        "runs_count": len(runs),
        "engine_gibps": round(median([size / GiB / r["engine_seconds"] for r in runs]), 3),
        "nbdcopy_gibps": round(median([size / GiB / r["nbdcopy_seconds"] for r in runs]), 3),
        "ratio_vs_nbdcopy": round(median([r["ratio_vs_nbdcopy"] for r in runs]), 3),
        "bytes_read": runs[0].get("engine_bytes_read", 0),
        "bit_exact": bool(runs[0].get("bit_exact")),
        "notes": "GiB/s = virtual size / seconds; both read the same snapshot through the lab's VDDK "
        "stand-in (nbdkit python plugin over qemu-nbd); engine = the vSphere connector's disk (CBT '*' "
        "areas + block status) through copy_disk; ratio = median of per-run nbdcopy/engine time",
        "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
    }
