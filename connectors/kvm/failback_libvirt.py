"""Failback into a libvirt domain's disks (the libvirt source form): which images, and what the job's
libvirt change ids say about them while the domain is shut off. `failback_sink.KvmFailbackSink` writes
the images in place as it does for the stopped-VM form (writable qemu-nbd, image lock); this module
gives it the images and `diverged`.

- Images and keys are the libvirt source's own (`LibvirtSource._disks`: qcow2 file disks, keyed by
  target, vda...), read from the domain's definition. The images are written through files on this
  host, so a libvirt on another host (`qemu+ssh://host/...`) is refused: a file of the same path here
  would be another disk.
- Change id = `<checkpoint>@<identity>` (`libvirt_source`). Writing in place keeps the identity (domain
  UUID, disk target and image path, image inode: qemu-nbd writes the file, never replaces it), so the
  job's next sync from the failover point's change id is still an incremental.
- `diverged(key, since)`: the checkpoint's persistent bitmap in the image (libvirt names it after the
  checkpoint), read offline through read-only qemu-nbd. It must be enabled (recording): with the job's
  newest checkpoint it is, on any libvirt; an older checkpoint's may have been disabled by a libvirt
  that stops a bitmap when a newer checkpoint starts, and then it misses writes: ChangeTrackingLost.
  The checkpoint's metadata must still be in libvirt and cover the disk, or the job's next backup could
  not use it either. Read it before opening the disk for writing: a writable qemu-nbd marks the bitmaps
  in use, and they read as inconsistent until it exits.
- The same enabled bitmap records every reverse write made through qemu-nbd, and QEMU stores it when
  qemu-nbd exits; when the domain runs again, libvirt's next pull backup from that checkpoint exports
  it: the job's next forward sync copies the failback delta from the failover point, incrementally.
- rebase is refused: libvirt creates a checkpoint only with a running domain's backup job (the job's
  own `create_snapshot`), and the workflow keeps the failover point's base anyway.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

from connectors.kvm.identity import (
    libvirt_identity,
    libvirt_identity_problem,
    split_change_id,
    tracking_problem,
)
from connectors.kvm.libvirt_source import LibvirtSource
from connectors.kvm.spec import LibvirtDomain
from sendense.errors import ChangeTrackingLost, InvalidSpec
from tools.qemu import read_qcow2_header


class LibvirtDomainImages:
    """A shut-off libvirt domain's qcow2 images as the job's libvirt source keys them."""

    def __init__(self, job: str, spec: LibvirtDomain, work_dir: Path) -> None:
        self.job = job
        self.source = LibvirtSource(job, spec.uri, spec.domain, work_dir, uuid=spec.uuid)
        host = urlsplit(spec.uri).hostname
        if host:
            raise InvalidSpec(
                f"{self.source._where()}: a failback writes the domain's images as files on this host, "
                f"and this libvirt is on host {host}: run the failback on an agent on that host"
            )

    def images(self) -> list[tuple[str, Path]]:
        """(key, image) of every disk the libvirt source replicates."""
        with self.source._dom() as dom:
            disks, _ = self.source._disks(dom)
        return [(d.target, Path(d.source)) for d in disks]

    def bitmap(self, key: str, image: Path, since: str) -> str:
        """The bitmap in `image` that change id `since` of disk `key` stands for (its checkpoint's name),
        checked: of this job, this domain and image; the checkpoint known to libvirt for this disk; the
        bitmap present, consistent and recording. ChangeTrackingLost says why not."""
        src = self.source
        cp, _ = split_change_id(since)
        if not cp.startswith(src.prefix):
            raise ChangeTrackingLost(f"change id {since} of disk {key} is not a checkpoint of job {self.job}")
        with src._dom() as dom:
            now = libvirt_identity(dom.UUIDString(), key, str(image))
            why = libvirt_identity_problem(since, now, src.domain, key, str(image))
            if why is None:
                cache: dict[str, ET.Element | str] = {}
                why = src._tracking_problem(dom, cp, key, cache)
        if why is None:
            bitmaps = read_qcow2_header(image).bitmaps
            why = tracking_problem(bitmaps, cp, str(image))
            if why is None and "auto" not in bitmaps[cp]:
                why = (
                    f"dirty bitmap {cp} in {image} is disabled (a newer checkpoint stopped it): it misses "
                    "later writes"
                )
        if why:
            raise ChangeTrackingLost(why)
        return cp
