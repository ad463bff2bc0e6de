"""The disks of a running QEMU as the QMP source replicates them, and the record of their images.

Which block nodes are disks, under which key, in which format, and whether QEMU can track them:

- key: the node name the VM was started with (`-blockdev ...,node-name=disk0`), else the drive's name
  (`-drive file=IMG,if=virtio` gets `virtio0` and an automatic node name like `#block113`, which
  changes across restarts and is no name to put in an export or a file name);
- qcow2 v3: persistent dirty bitmaps, tracking survives a clean VM restart;
- raw (a raw format node, or a bare file node): QEMU tracks it with a non-persistent bitmap while the
  VM runs; after a restart the disk is resynced, with that reason;
- qcow2 v2 (compat=0.10), other formats and 0-byte disks cannot be replicated: refused at validate
  with what to do, never skipped.

The record (`disks.json` in the job's work dir) keeps the image paths seen at the last discover or
snapshot, so that `forget` can remove the job's bitmaps from the images while the VM is stopped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.qmp import QmpClient

log = logging.getLogger(__name__)

FILTERS = {"copy-before-write", "throttle", "preallocate", "compress", "blkdebug", "blkverify"}
RAW = {"raw", "file", "host_device"}
RECORD = "disks.json"


@dataclass(frozen=True)
class QemuDisk:
    key: str  # stable across restarts (see the module docstring)
    node: str  # the format node to put bitmaps on and back up from; may be automatic ('#block113')
    size: int
    image: str  # the image file QEMU has open
    fmt: str  # qcow2 / raw / what QEMU says
    problem: str = ""  # why it cannot be replicated ('' if it can)

    @property
    def persistent(self) -> bool:
        """Whether its bitmaps are stored in the image (survive a VM restart)."""
        return self.fmt == "qcow2"


def named_nodes(c: QmpClient) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in c.execute("query-named-block-nodes", flat=True)}


def list_disks(c: QmpClient, named: dict[str, dict[str, Any]] | None = None) -> list[QemuDisk]:
    """Every disk attached to a device (removable media such as a CD-ROM aside), with its problem."""
    named = named if named is not None else named_nodes(c)
    out = []
    for dev in c.execute("query-block"):
        ins = dev.get("inserted")
        if not ins or dev.get("removable"):
            continue
        node, drv, img = ins.get("node-name", ""), ins.get("drv"), ins.get("image", {})
        while drv in FILTERS and "backing-image" in img:  # e.g. the filter of a running backup
            img, node = img["backing-image"], ""
            drv = img.get("format")
        if not node or node not in named:  # under a filter: the format node that has the image open
            node = next(
                (
                    n
                    for n, info in named.items()
                    if info.get("drv") == drv
                    and info.get("image", {}).get("filename") == img.get("filename")
                    and not n.startswith("sdf-")
                ),
                "",
            )
        image = str(img.get("filename", ""))
        key = node if node and not node.startswith("#") else str(dev.get("device") or "")
        where = f"disk {key or dev.get('qdev')} ({image})"
        if not node or not key:
            out.append(QemuDisk(key or str(dev.get("qdev")), node, 0, image, str(drv), f"{where}: no node"))
            continue
        info = named[node].get("image", {})
        size = int(info.get("virtual-size", img.get("virtual-size", 0)))
        fmt = "raw" if drv in RAW else str(drv)
        problem = ""
        if ins.get("ro"):
            problem = f"{where} is read-only, which the QMP source does not replicate"
        elif fmt == "qcow2" and info.get("format-specific", {}).get("data", {}).get("compat") == "0.10":
            problem = (
                f"{where} is qcow2 v2 (compat=0.10), which cannot hold dirty bitmaps: stop the VM and "
                f"upgrade it: qemu-img amend -o compat=1.1 {image}"
            )
        elif fmt not in ("qcow2", "raw"):
            problem = (
                f"{where} is {fmt}, whose changes QEMU cannot track here: convert it to qcow2 with the VM "
                "stopped (qemu-img convert -O qcow2)"
            )
        elif size == 0:
            problem = f"{where} has a size of 0 bytes: detach it from the VM or give it a size"
        out.append(QemuDisk(key, node, size, image, fmt, problem))
    return out


def refusal(disks: list[QemuDisk], qmp: Path) -> str | None:
    """One line saying which disks cannot be replicated, or None."""
    problems = [d.problem for d in disks if d.problem]
    if problems:
        return f"source.qmp: the VM behind {qmp}: " + "; ".join(problems)
    if not disks:
        return f"source.qmp: the VM behind {qmp} has no writable disk"
    return None


def record(work_dir: Path, qmp: Path, disks: list[QemuDisk]) -> None:
    """Keep the image paths for a forget while the VM is stopped (rewritten only when they change)."""
    data = {"qmp": str(qmp), "disks": [asdict(d) for d in disks if not d.problem]}
    path = work_dir / RECORD
    try:
        if path.is_file() and json.loads(path.read_text()) == data:
            return
    except ValueError:
        pass
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def recorded(work_dir: Path) -> list[QemuDisk] | None:
    """The disks of the last record, or None if there is none."""
    try:
        data = json.loads((work_dir / RECORD).read_text())
        return [QemuDisk(**d) for d in data["disks"]]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("unreadable %s in %s: %s", RECORD, work_dir, e)
        return None
