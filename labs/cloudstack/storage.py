"""Volumes on the lab's primary storage: qcow2 files named by the volume's uuid in the pool's directory.

A ROOT volume made from a template is a qcow2 over the template's copy on the same pool (copied once,
named by the template's uuid), as CloudStack's KVM agent makes them; a data volume is a blank qcow2.
The pool gives out virtual sizes up to its capacity: beyond it, CloudStack's insufficient-capacity
error (533, InsufficientStorageCapacityException 4340).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labs.cloudstack import wire
from labs.cloudstack.state import Pool, Volume
from labs.cloudstack.views import gib
from labs.cloudstack.wire import ApiError
from tools.qemu import qemu_img

if TYPE_CHECKING:
    from labs.cloudstack.state import LabState


def no_room(pool: Pool, allocated: int, needed: int, what: str) -> ApiError:
    return ApiError(
        wire.INSUFFICIENT_CAPACITY_ERROR,
        f"Insufficient capacity on storage pool {pool.name} for {what}: {gib(needed)} asked, "
        f"{gib(allocated)} of {gib(pool.capacity)} allocated",
        wire.CS_INSUFFICIENT_STORAGE_CAPACITY,
    )


def materialize(state: LabState, vol: Volume, pool: Pool) -> None:
    """Create the volume's file on `pool` (an Allocated volume becomes Ready). Caller holds the lock."""
    if vol.state != "Allocated":
        return
    needed = vol.size
    copy = None
    if vol.template is not None and vol.template not in state.template_copies:
        needed += state.templates[vol.template].size
        copy = pool.path / vol.template
    allocated = state.allocated(pool)
    if allocated + needed > pool.capacity:
        raise no_room(pool, allocated, needed, f"volume {vol.name}")
    target = pool.path / vol.id
    if vol.template is not None:
        if copy is not None:
            qemu_img("convert", "-q", "-O", "qcow2", str(state.templates[vol.template].path), str(copy))
            state.template_copies[vol.template] = copy
        base = state.template_copies[vol.template]
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(target), str(vol.size))
    else:
        qemu_img("create", "-q", "-f", "qcow2", str(target), str(vol.size))
    vol.pool, vol.state = pool, "Ready"


def grow_check(state: LabState, vol: Volume, new_size: int) -> None:
    if vol.pool is None or new_size <= vol.size:
        return
    allocated = state.allocated(vol.pool)
    if allocated + new_size - vol.size > vol.pool.capacity:
        raise no_room(vol.pool, allocated, new_size - vol.size, f"resizing volume {vol.name}")


def remove(state: LabState, vol: Volume) -> None:
    """Delete the volume's file and forget it. Caller holds the lock."""
    if vol.file is not None:
        vol.file.unlink(missing_ok=True)
    vol.state = "Expunged"
    state.volumes.pop(vol.id, None)
