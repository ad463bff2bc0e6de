"""Disk images made into lab AMIs: an instance whose root volume holds a real OS (the bootable guest).

`import_image(bridge, path)` reads a disk image file (any format qemu-img reads), stores its non-zero
512 KiB blocks as a completed snapshot (as if written through the EBS direct APIs) and registers an
EBS-backed AMI of it (root device /dev/xvda, named `aws-lab-<file stem>-<digest>`). The same file
(same path, size and mtime) gives the same AMI for the life of the lab.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from labs.aws.blockstore import BLOCK_SIZE, ZERO_BLOCK
from labs.aws.state import BLOCKS_PER_GIB, BlockRef, LabStateError

log = logging.getLogger(__name__)

ROOT_DEVICE = "/dev/xvda"


def import_image(bridge: Any, path: Path) -> str:
    """The AMI id of a lab image whose root snapshot holds the disk image at `path`."""
    try:
        st = path.stat()
    except OSError as e:
        raise LabStateError(400, f"disk image {path}: {e.strerror}") from None
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    name = f"aws-lab-{path.stem}-{key}"[:128]
    with bridge.lock:
        for image in bridge.backend.amis.values():
            if image.name == name:
                return str(image.id)
        snapshot_id = _snapshot_of(bridge, path)
        image = bridge.register_image(
            name=name,
            description=f"The AWS lab's image of {path.name}",
            root_device_name=ROOT_DEVICE,
            mappings=[{"DeviceName": ROOT_DEVICE, "Ebs": {"SnapshotId": snapshot_id}}],
            architecture="x86_64",
            virtualization_type="hvm",
            boot_mode="legacy-bios",
        )
    log.info("image %s (%s) of %s", image.id, name, path)
    return str(image.id)


def _snapshot_of(bridge: Any, path: Path) -> str:
    state = bridge.state
    with tempfile.TemporaryDirectory(prefix="import-", dir=state.blocks.root.parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        p = subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw)], capture_output=True, text=True
        )
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["failed"])[-1]
            raise LabStateError(400, f"disk image {path}: qemu-img cannot read it: {last}")
        size = raw.stat().st_size
        gib = max(1, -(-size // (1 << 30)))
        snap = bridge.create_direct_snapshot(gib, f"import of {path.name}", [], None, 60)
        with open(raw, "rb") as f:
            for index in range(min(gib * BLOCKS_PER_GIB, -(-size // BLOCK_SIZE))):
                data = f.read(BLOCK_SIZE).ljust(BLOCK_SIZE, b"\0")
                if data == ZERO_BLOCK:
                    continue
                digest = hashlib.sha256(data).digest()
                state.pin_and_store(digest, data)
                with state.lock:
                    snap.blocks[index] = BlockRef(digest, state.next_version())
                    snap.written.add(index)
                    state.unpin(digest)
    with state.lock:  # sealed and completed at once
        snap.sealed_at = state.now() - state.delay
        snap.outcome = "completed"
    return str(snap.snapshot_id)
