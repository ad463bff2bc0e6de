"""Files on primary storage made CloudStack volumes and back: listVolumesForImport (sync), importVolume and
unmanageVolume (async), as CloudStack 4.19.1+'s VolumeImportUnmanageManagerImpl does them for KVM.

- A file is named by its `path` in the pool's directory (the KVM agent looks it up in the pool as
  libvirt does: a file at the top of the pool, no directory part). listVolumesForImport lists the
  pool's files that are neither a volume's nor a template's copy, with `qemu-img info`'s format,
  sizes and backing file (`details`).
- importVolume checks, in its job, as the manager does (each a CloudRuntimeException: 530/4250): the
  pool Up ("Storage pool ... is not Up: ..."); the path not blank, not a volume's already ("Volume is
  already managed by CloudStack: <path>"), not a template's copy ("Volume is a base image of a
  template: <path>"); the file there ("Cannot find volume on storage pool: <path>", also for a path
  outside the pool); no backing file ("Volume with backing file cannot be imported or unmanaged.",
  `allow.import.volume.with.backing.file` false, the default). The volume is a DATADISK of the
  file's virtual size, `Ready` on the pool, its `path` the file's name, with the given disk offering
  or CloudStack's "Default Custom Offering for Volume Import". The lab also counts it against the
  pool's capacity (the insufficient-capacity error of createVolume; CloudStack checks the account's
  primary storage limit there instead).
- unmanageVolume forgets a Ready, detached volume and leaves its file ("Volume ... is not ready",
  "Volume ... is attached to VM (ID: ...)").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labs.cloudstack import storage, views, wire
from labs.cloudstack.cloud import AsyncWork
from labs.cloudstack.state import DiskOffering, Pool, Volume, new_id
from labs.cloudstack.wire import ApiError, list_payload
from tools.qemu import image_info

if TYPE_CHECKING:
    from labs.cloudstack.cloud import Cloud, Params

PKG = "org.apache.cloudstack.api.command.admin.volume"
DEFAULT_OFFERING = "Default Custom Offering for Volume Import"


def failure(text: str) -> ApiError:
    """CloudRuntimeException, as logFailureAndThrowException throws it."""
    return ApiError(wire.INTERNAL_ERROR, text, wire.CS_CLOUD_RUNTIME)


def _pool(c: Cloud, p: Params, name: str = "storageid") -> Pool:
    pool: Pool = p.entity(name, c.state.pools)
    return pool


def _available(pool: Pool) -> None:
    if pool.state != "Up":
        raise failure(f"Storage pool {pool.name} is not Up: {pool.state}")


def _managed(c: Cloud, pool: Pool, path: str) -> bool:
    return any(v.pool is pool and (v.path or v.id) == path for v in c.state.volumes.values())


def _template_copy(c: Cloud, pool: Pool, path: str) -> bool:
    return any(f.parent == pool.path and f.name == path for f in c.state.template_copies.values())


def _on_storage(pool: Pool, path: str) -> dict[str, Any] | None:
    """The file `path` of the pool as the KVM agent's GetVolumesOnStorageCommand describes it (None: no
    such file at the top of the pool)."""
    if not path or "/" in path or path in (".", ".."):
        return None
    f = pool.path / path
    if not f.is_file() or f.is_symlink():
        return None
    info = image_info(f)
    details = {"FILE_FORMAT": info.get("format", "raw"), "IS_LOCKED": "false", "IS_ENCRYPTED": "false"}
    if info.get("backing-filename"):
        details["BACKING_FILE"] = str(info["backing-filename"])
        details["BACKING_FILE_FORMAT"] = str(info.get("backing-filename-format", ""))
    return {
        "path": path,
        "name": path,
        "fullpath": str(f),
        "format": str(info.get("format", "raw")).upper(),
        "size": f.stat().st_blocks * 512,
        "virtualsize": int(info["virtual-size"]),
        "details": details,
    }


def list_volumes_for_import(c: Cloud, p: Params) -> dict[str, Any]:
    pool = _pool(c, p)
    _available(pool)
    path, keyword = p.get("path"), (p.get("keyword") or "").strip()
    names = [path] if path else sorted(f.name for f in pool.path.iterdir() if f.is_file())
    out = []
    for name in names:
        if _managed(c, pool, name) or _template_copy(c, pool, name):
            continue
        if keyword and keyword not in name:
            continue
        found = _on_storage(pool, name)
        if found is not None:
            found |= {"storageid": pool.id, "storage": pool.name, "storagetype": pool.type}
            out.append(found)
    return list_payload("volumeforimport", out)


def _offering(c: Cloud, p: Params) -> DiskOffering:
    given: DiskOffering | None = p.entity("diskofferingid", c.state.disk_offerings, required=False)
    if given is not None:
        return given
    for o in c.state.disk_offerings.values():
        if o.name == DEFAULT_OFFERING:
            return o
    o = DiskOffering(new_id(), DEFAULT_OFFERING, 0)  # made on first use, as CloudStack persists it
    c.state.disk_offerings[o.id] = o
    return o


def import_volume(c: Cloud, p: Params) -> AsyncWork:
    pool = _pool(c, p)
    path = p.need("path")
    name = (p.get("name") or "").strip() or path
    offering = p.entity("diskofferingid", c.state.disk_offerings, required=False)
    vol_id = new_id()

    def run() -> dict[str, Any]:
        with c.state.lock:
            _available(pool)
            if not path.strip():
                raise failure(f"Volume path is null or blank: {path}")
            if _managed(c, pool, path):
                raise failure(f"Volume is already managed by CloudStack: {path}")
            if _template_copy(c, pool, path):
                raise failure(f"Volume is a base image of a template: {path}")
            found = _on_storage(pool, path)
            if found is None:
                raise failure(f"Cannot find volume on storage pool: {path}")
            if found["details"].get("BACKING_FILE"):
                raise failure("Volume with backing file cannot be imported or unmanaged.")
            if found["format"] != "QCOW2":
                raise failure(f"Volume cannot be imported due to unsupported format {found['format']}")
            size = int(found["virtualsize"])
            allocated = c.state.allocated(pool)
            if allocated + size > pool.capacity:
                raise storage.no_room(pool, allocated, size, f"importing volume {name}")
            chosen = offering if offering is not None else _offering(c, p)
            vol = Volume(vol_id, name, "DATADISK", size, state="Ready", pool=pool, diskoffering=chosen.id)
            vol.path = path
            c.state.volumes[vol.id] = vol
            return {"volume": views.volume(c, vol)}

    return AsyncWork(f"{PKG}.ImportVolumeCmd", run, "Volume", vol_id)


def unmanage_volume(c: Cloud, p: Params) -> AsyncWork:
    vol: Volume = p.entity("id", c.state.volumes)

    def run() -> dict[str, Any]:
        with c.state.lock:
            if vol.state != "Ready" or vol.pool is None:
                raise failure(f"Volume {vol.name} is not ready")
            if vol.vm is not None:
                raise failure(f"Volume {vol.name} is attached to VM (ID: {vol.vm})")
            _available(vol.pool)
            if _on_storage(vol.pool, vol.path or vol.id) is None:
                raise failure(f"Cannot find volume on storage pool: {vol.path or vol.id}")
            vol.state = "Destroy"
            c.state.volumes.pop(vol.id, None)  # the record goes, the file stays
        return {"success": True}

    return AsyncWork(f"{PKG}.UnmanageVolumeCmd", run, "Volume", vol.id)
