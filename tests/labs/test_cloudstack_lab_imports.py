"""The CloudStack lab's volume import (CloudStack 4.19.1+: listVolumesForImport, importVolume,
unmanageVolume) through a real CloudStack client (PyPI `cs`), as VolumeImportUnmanageManagerImpl answers:
a flat qcow2 file at the top of the pool becomes a Ready DATADISK of its virtual size; a file with a
backing file, a missing file, a path outside the pool, a file already a volume's or a template's copy
are refused with CloudStack's texts (530/4250); the import counts against the pool."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cs import CloudStack, CloudStackApiException

from labs.cloudstack.server import LabServer
from labs.cloudstack.state import GIB, LabConfig

MIB = 1 << 20


@pytest.fixture(scope="module")
def lab() -> Iterator[LabServer]:
    root = Path(tempfile.mkdtemp(prefix="cslab-import-"))
    server = LabServer(root, LabConfig(libvirt=False, pool_capacity_gib=4)).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cs(lab: LabServer) -> Iterator[CloudStack]:
    yield CloudStack(
        endpoint=lab.url, key=lab.info["api_key"], secret=lab.info["secret_key"], poll_interval=0.02
    )
    lab.cloud.state.pool.state = "Up"


def pool(lab: LabServer) -> Path:
    return lab.cloud.state.pool.path


def pool_id(lab: LabServer) -> str:
    return lab.cloud.state.pool.id


def qcow2(lab: LabServer, size: int, backing: Path | None = None, name: str | None = None) -> str:
    name = name or str(uuid.uuid4())
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(pool(lab) / name), str(size)], check=True)
    return name


def job_error(call: Any) -> dict[str, Any]:
    with pytest.raises(CloudStackApiException) as e:
        call()
    err: dict[str, Any] = e.value.error
    return err


def test_a_flat_qcow2_is_listed_imported_as_a_ready_datadisk_and_no_longer_listed(
    lab: LabServer, cs: CloudStack
) -> None:
    name = qcow2(lab, 3 * GIB // 2)
    [found] = cs.listVolumesForImport(storageid=pool_id(lab), path=name)["volumeforimport"]
    assert (found["path"], found["format"], found["virtualsize"]) == (name, "QCOW2", 3 * GIB // 2)
    assert found["fullpath"] == str(pool(lab) / name) and "BACKING_FILE" not in found["details"]
    assert name in [v["path"] for v in cs.listVolumesForImport(storageid=pool_id(lab))["volumeforimport"]]
    answer = cs.importVolume(storageid=pool_id(lab), path=name, name="imported-1")
    assert set(answer) == {"jobid"}
    vol = cs._jobresult(answer["jobid"])["volume"]
    assert (vol["name"], vol["type"], vol["state"], vol["size"]) == (
        "imported-1",
        "DATADISK",
        "Ready",
        3 * GIB // 2,
    )
    assert (vol["path"], vol["storageid"]) == (name, pool_id(lab))
    assert vol["diskofferingname"] == "Default Custom Offering for Volume Import"
    [listed] = cs.listVolumes(id=vol["id"])["volume"]
    assert listed["path"] == name
    assert cs.listVolumesForImport(storageid=pool_id(lab), path=name) == {}  # managed now
    [pl] = cs.listStoragePools(id=pool_id(lab))["storagepool"]
    assert pl["disksizeallocated"] >= 3 * GIB // 2 and pl["type"] == "SharedMountPoint"
    err = job_error(lambda: cs.importVolume(storageid=pool_id(lab), path=name, fetch_result=True))
    assert (err["errorcode"], err["cserrorcode"], err["errortext"]) == (
        530,
        4250,
        f"Volume is already managed by CloudStack: {name}",
    )
    cs.deleteVolume(id=vol["id"])  # a volume's file goes with it
    assert not (pool(lab) / name).exists()


def test_a_file_with_a_backing_file_is_refused_as_cloudstack_refuses_it(
    lab: LabServer, cs: CloudStack
) -> None:
    base = qcow2(lab, 64 * MIB)
    top = qcow2(lab, 64 * MIB, backing=pool(lab) / base)
    [found] = cs.listVolumesForImport(storageid=pool_id(lab), path=top)["volumeforimport"]
    assert found["details"]["BACKING_FILE"] == str(pool(lab) / base)
    err = job_error(lambda: cs.importVolume(storageid=pool_id(lab), path=top, fetch_result=True))
    assert (err["errorcode"], err["errortext"]) == (
        530,
        "Volume with backing file cannot be imported or unmanaged.",
    )
    assert cs.listVolumes(name=top) == {}
    offering = [o for o in cs.listDiskOfferings()["diskoffering"] if o["name"] == "lab-1gb"][0]
    vol = cs.importVolume(storageid=pool_id(lab), path=base, diskofferingid=offering["id"], fetch_result=True)
    assert vol["volume"]["name"] == base and vol["volume"]["diskofferingid"] == offering["id"]


def test_a_missing_file_or_a_path_outside_the_pool_is_not_found_on_storage(
    lab: LabServer, cs: CloudStack
) -> None:
    outside = Path(tempfile.mkdtemp(prefix="cslab-outside-"))
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(outside / "x"), "1M"], check=True)
        for path in ("no-such-file", str(outside / "x"), f"../{outside.name}/x", "sub/x"):
            err = job_error(lambda p=path: cs.importVolume(storageid=pool_id(lab), path=p, fetch_result=True))  # type: ignore[misc]
            assert (err["errorcode"], err["errortext"]) == (
                530,
                f"Cannot find volume on storage pool: {path}",
            )
    finally:
        shutil.rmtree(outside)
    err = job_error(lambda: cs.importVolume(storageid=pool_id(lab), fetch_result=True))
    assert (err["errorcode"], err["errortext"]) == (
        431,
        "Unable to execute API command importvolume due to missing parameter path",
    )
    err = job_error(lambda: cs.importVolume(storageid=str(uuid.uuid4()), path="x", fetch_result=True))
    assert err["errorcode"] == 431 and "Invalid parameter storageid" in err["errortext"]


def test_a_pool_not_up_refuses_imports_and_listings(lab: LabServer, cs: CloudStack) -> None:
    name = qcow2(lab, 1 * MIB)
    lab.cloud.state.pool.state = "Maintenance"
    [pl] = cs.listStoragePools(id=pool_id(lab))["storagepool"]
    assert pl["state"] == "Maintenance"
    text = f"Storage pool {pl['name']} is not Up: Maintenance"
    assert (
        job_error(lambda: cs.importVolume(storageid=pool_id(lab), path=name, fetch_result=True))["errortext"]
        == text
    )
    assert job_error(lambda: cs.listVolumesForImport(storageid=pool_id(lab)))["errortext"] == text
    lab.cloud.state.pool.state = "Up"
    assert cs.importVolume(storageid=pool_id(lab), path=name, fetch_result=True)["volume"]["state"] == "Ready"


def test_an_import_beyond_the_pools_capacity_is_refused(lab: LabServer, cs: CloudStack) -> None:
    name = qcow2(lab, 5 * GIB)  # the pool holds 4 GiB
    err = job_error(lambda: cs.importVolume(storageid=pool_id(lab), path=name, fetch_result=True))
    assert (err["errorcode"], err["cserrorcode"]) == (533, 4340)
    assert err["errortext"].startswith(
        f"Insufficient capacity on storage pool lab-primary-1 for importing volume {name}"
    )
    assert cs.listVolumes(name=name) == {} and (pool(lab) / name).exists()  # the file stays, unmanaged


def test_unmanage_forgets_a_detached_ready_volume_and_keeps_its_file(lab: LabServer, cs: CloudStack) -> None:
    name = qcow2(lab, 1 * MIB)
    vol = cs.importVolume(storageid=pool_id(lab), path=name, name="to-unmanage", fetch_result=True)["volume"]
    assert cs.unmanageVolume(id=vol["id"], fetch_result=True) == {"success": True}
    assert cs.listVolumes(name="to-unmanage") == {} and (pool(lab) / name).exists()
    [again] = cs.listVolumesForImport(storageid=pool_id(lab), path=name)["volumeforimport"]
    assert again["path"] == name
    custom = [o for o in cs.listDiskOfferings()["diskoffering"] if o["name"] == "lab-custom"][0]
    allocated = cs.createVolume(
        zoneid=lab.info["zoneid"], diskofferingid=custom["id"], size=1, fetch_result=True
    )
    err = job_error(lambda: cs.unmanageVolume(id=allocated["volume"]["id"], fetch_result=True))
    assert err["errorcode"] == 530 and err["errortext"].endswith("is not ready")
