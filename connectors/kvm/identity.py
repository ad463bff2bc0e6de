"""Which disk a change id belongs to: a base is used only on the disk and image it was made on.

With one bitmap name on every disk of a job, disks swapped behind their keys (image files renamed, a
VM restarted with its disks in another order, a domain's XML edited) still "had" the base, and the
sync ran incremental against the other disk's changes: both replicas wrong, silently. So every change
id carries the disk's identity, checked before the base is used; a changed identity is a resync with
the reason.

- Bitmap sources (stopped disks, QMP): the bitmap name ends in `disk_tag(key, image)`; the bitmap
  travels with the image's content, so a swapped image lacks the base and carries another disk's tag.
- libvirt, whose checkpoint names are shared by every disk: the change id is `<checkpoint>@<identity>`,
  identity = domain UUID, disk tag and the image file's inode (`libvirt_identity`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence


def _h(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def bitmap_prefix(job: str) -> str:
    return f"sendense.{job}."


def disk_tag(key: str, image: str) -> str:
    """A disk's identity in its change ids: its key and image path. Both must match for a base to be
    used; the bitmap carrying the tag must be in the image, so a swapped image is found too."""
    return hashlib.sha1(f"{key}\0{image}".encode()).hexdigest()[:8]


def bitmap_name(job: str, snapshot_id: str, tag: str) -> str:
    return f"{bitmap_prefix(job)}{snapshot_id}.{tag}"


def marker_prefix(job: str) -> str:
    return f"sendense-shrink.{job}."


def shrink_markers(change_id: str, job: str) -> tuple[str, str]:
    """The (span, tail) shrink markers that go with bitmap `change_id` (see `offline`)."""
    rest = marker_prefix(job) + change_id[len(bitmap_prefix(job)) :]
    return f"{rest}.span", f"{rest}.tail"


def tracking_problem(bitmaps: Mapping[str, Sequence[str]], base: str, where: str) -> str | None:
    """Why `base` cannot serve as a change id, or None if it can."""
    if base not in bitmaps:
        return f"dirty bitmap {base} is missing from {where}"
    flags = bitmaps[base]
    if "in-use" in flags or "inconsistent" in flags:
        return f"dirty bitmap {base} in {where} is inconsistent (the image was not closed cleanly)"
    return None


def base_problem(
    job: str, since: str, key: str, image: str, bitmaps: Mapping[str, Sequence[str]], where: str
) -> str | None:
    """Why bitmap `since` cannot be disk `key`'s base now that `image` is behind it, or None."""
    prefix, tag = bitmap_prefix(job), disk_tag(key, image)
    rest = since[len(prefix) :] if since.startswith(prefix) else ""
    if "." not in rest:
        return f"change id {since} of disk {key} is from before disk identities were recorded"
    if rest.rsplit(".", 1)[1] != tag:
        return (
            f"disk {key} is now image {image}, not the image its change tracking belongs to "
            "(image replaced, moved or disks reordered)"
        )
    if since not in bitmaps and any(n.startswith(prefix) and not n.endswith("." + tag) for n in bitmaps):
        return (
            f"image {image} of disk {key} carries the change tracking of another disk of job {job} "
            "(disks swapped)"
        )
    return tracking_problem(bitmaps, since, where)


def libvirt_identity(uuid: str, key: str, image: str) -> str:
    """`<uuid hash>.<disk tag>.<inode>` ('-' for an inode this host cannot see, e.g. a remote libvirt)."""
    try:
        ino = f"{os.stat(image).st_ino:x}"
    except OSError:
        ino = "-"
    return f"{_h(uuid)}.{disk_tag(key, image)}.{ino}"


def split_change_id(change_id: str) -> tuple[str, str]:
    """A libvirt change id -> (checkpoint name, identity); identity '' for one made before identities."""
    checkpoint, _, identity = change_id.partition("@")
    return checkpoint, identity


def libvirt_identity_problem(since: str, now: str, domain: str, key: str, image: str) -> str | None:
    """Why base `since` does not belong to disk `key` (identity `now`), or None if it does."""
    checkpoint, was = split_change_id(since)
    if not was:
        return f"change id {since} of disk {key} is from before disk identities were recorded"
    (wu, wt, wi), (nu, nt, ni) = (was.split(".") + ["", "", ""])[:3], now.split(".")
    if wu != nu:
        return f"domain {domain} was redefined (its UUID changed) since checkpoint {checkpoint}"
    if wt != nt:
        return (
            f"disk {key} is now image {image}, not the image its change tracking belongs to "
            "(image replaced, moved or disks reordered)"
        )
    if wi != ni and "-" not in (wi, ni):
        return f"image {image} of disk {key} is not the file it was at checkpoint {checkpoint} (replaced)"
    return None
