"""The CloudStack source against the CloudStack lab (root: its hosts are private libvirtds; slow: its VMs
boot the bootable guest under TCG). This process is the agent of the lab host the VM runs on
(helpers_cloudstack.agent_on), as a sendense agent on that host would be.

Every point is compared with the VM's volumes at the snapshot instant, taken apart from the connector:
the domain is paused (QMP `stop` drains and flushes its I/O), each volume's qcow2 file is converted to
raw, the snapshot is taken, the domain resumes; the guest (which boots and writes its ROOT on its own)
and the test then write on, before and during the copy, and the point must still equal the instant.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from helpers_cloudstack import LabVmHandle, agent_on, client, control, lab_cache, lab_hosts, source_spec
from helpers_kvm import MiB, Synced, sync_point

from connectors.cloudstack.client import AccessDenied
from connectors.cloudstack.source import CloudStackSourceConnector
from connectors.cloudstack.spec import CloudStackSource, key_envs
from connectors.kvm.target import KvmTarget
from labs.cloudstack.server import LabServer
from sendense.errors import InvalidSpec, ResourceNotFound, ResourceUnavailable
from sendense.models import SnapshotRef

pytestmark = [pytest.mark.root, pytest.mark.slow]

GIB = 1 << 30
KiB = 1 << 10
READY = "SENDENSE-GUEST-READY"
ROOT_FREE = 512 * KiB  # ROOT: between the MBR and the partition at 1 MiB: the test's, not the guest's


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabServer]:
    from helpers_cloudstack import cloudstack_lab

    with cloudstack_lab(lab_cache(request), stop_timeout=1) as server:
        yield server


@pytest.fixture
def make_vm(lab: LabServer) -> Iterator[Any]:
    made: list[LabVmHandle] = []

    def make(**kw: Any) -> LabVmHandle:
        vm = LabVmHandle(lab, **kw)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.destroy()


def wait_ready(lab: LabServer, vm: LabVmHandle, timeout: float = 90) -> None:
    t0 = time.monotonic()
    while READY not in _console(lab, vm):
        assert time.monotonic() - t0 < timeout, f"{vm.name} did not boot"
        time.sleep(0.3)


def _console(lab: LabServer, vm: LabVmHandle) -> str:
    import urllib.request

    with urllib.request.urlopen(lab.url.rsplit("/client/api", 1)[0] + f"/_lab/vms/{vm.id}/console") as r:
        return r.read().decode(errors="replace")


class AtInstant:
    """The source, whose create_snapshot also takes the reference of every volume at the instant (the
    domain paused around it), then lets the guest and `after` write on before the copy."""

    def __init__(self, src: CloudStackSourceConnector, vm: LabVmHandle, tmp: Path, after: Any = None) -> None:
        self.src, self.vm, self.tmp, self.after = src, vm, tmp, after
        self.refs: dict[str, Path] = {}

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        with self.vm.domain() as dom:
            dom.suspend()
            try:
                self.refs = {}
                for key, f in self.vm.volume_files().items():
                    ref = self.tmp / f"{snapshot_id}-{key}.raw"
                    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", f, ref], check=True)
                    self.refs[key] = ref
                snap = self.src.create_snapshot(snapshot_id, base)
            finally:
                dom.resume()
        if self.after is not None:
            self.after(snap)
        return snap

    def __getattr__(self, name: str) -> Any:
        return getattr(self.src, name)


def same(point: Path, ref: Path) -> bool:
    p = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(point), str(ref)],
        capture_output=True,
        text=True,
    )
    assert p.returncode in (0, 1), p.stderr
    return p.returncode == 0


def sync(
    src: CloudStackSourceConnector,
    vm: LabVmHandle,
    tgt: KvmTarget,
    tmp: Path,
    sync_id: str,
    base: dict[str, str | None] | None = None,
    after: Any = None,
) -> Synced:
    """One sync, whose point must equal every volume at the snapshot instant."""
    at = AtInstant(src, vm, tmp, after)
    s = sync_point(at, tgt, sync_id, base)
    assert sorted(at.refs) == sorted(d.key for d in s.snap.disks)
    for key, ref in at.refs.items():
        assert same(tgt.point_path(sync_id, key), ref), f"point {sync_id} disk {key} differs from the instant"
    return s


def kinds(s: Synced) -> dict[str, str]:
    return {k: r.kind for k, r in s.results.items()}


def connector(lab: LabServer, vm: LabVmHandle, work: Path, job: str = "job1") -> CloudStackSourceConnector:
    return CloudStackSourceConnector(job, source_spec(lab, vm.name), work)


# ------------------------------------------------------------------------------------------- tests


def test_full_then_incremental_of_a_booting_guest_are_the_instant(
    lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_vm(blank=False, data_gib=(1,))
    agent_on(monkeypatch, lab, vm.host())
    src, tgt = connector(lab, vm, tmp_path / "work"), KvmTarget("job1", tmp_path / "replicas")
    vm.write("vdb", 3 * MiB, 2 * MiB + 100, 0x11)
    vm.write("vda", ROOT_FREE, 64 * KiB, 0x12)

    def guest_writes_on(snap: SnapshotRef) -> None:  # after the instant: not in the point
        vm.write("vdb", 3 * MiB, 4096, 0x99)
        vm.write("vdb", 900 * MiB, 10, 0x98)
        vm.write("vda", ROOT_FREE, 512, 0x97)

    s1 = sync(src, vm, tgt, tmp_path, "p1", after=guest_writes_on)  # while the guest boots
    assert kinds(s1) == {"vda": "full", "vdb": "full"}
    assert [d.size for d in s1.snap.disks] == [256 * MiB, GIB]
    wait_ready(lab, vm)
    vm.write("vdb", 10 * MiB, 64 * KiB, 0x21)
    vm.zero("vdb", 3 * MiB, 64 * KiB)
    s2 = sync(src, vm, tgt, tmp_path, "p2", s1.base, after=guest_writes_on)
    assert kinds(s2) == {"vda": "incremental", "vdb": "incremental"}
    assert s2.results["vdb"].stats.bytes_read <= 4 * 64 * KiB  # what was written since p1, not the disk


def test_a_volume_attached_is_read_in_full_the_others_incrementally_and_a_detached_one_goes(
    lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_vm(blank=False, data_gib=(1,))  # a guest that acknowledges the hot unplug
    agent_on(monkeypatch, lab, vm.host())
    src, tgt = connector(lab, vm, tmp_path / "work"), KvmTarget("job1", tmp_path / "replicas")
    vm.write("vdb", 0, MiB, 0x11)
    wait_ready(lab, vm)
    s1 = sync(src, vm, tgt, tmp_path, "p1")

    added = vm.attach(1)  # createVolume + attachVolume: hot-plugged as vdc
    assert added["deviceid"] == 2
    vm.write("vdc", 5 * MiB, 64 * KiB, 0x22)
    vm.write("vdb", 2 * MiB, 64 * KiB, 0x23)
    s2 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p2", s1.base)
    assert kinds(s2) == {"vda": "incremental", "vdb": "incremental", "vdc": "full"}
    assert s2.snap.disk("vdc").base_change_id is None and s2.snap.disk("vdc").tracking_lost is None

    vm.write("vdc", 6 * MiB, 64 * KiB, 0x24)
    s3 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p3", s2.base)
    assert kinds(s3) == {"vda": "incremental", "vdb": "incremental", "vdc": "incremental"}

    client(lab).job("detachVolume", id=added["id"])
    vm.write("vdb", 3 * MiB, 64 * KiB, 0x25)
    s4 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p4", s3.base)
    assert kinds(s4) == {"vda": "incremental", "vdb": "incremental"}
    info = CloudStackSourceConnector("job1", source_spec(lab, vm.name), tmp_path / "w").discover()
    assert [d.key for d in info.disks] == ["vda", "vdb"]


def test_a_volume_grown_by_resize_volume_between_syncs_gives_an_exact_point(
    lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_vm(blank=True, data_gib=(1,))
    agent_on(monkeypatch, lab, vm.host())
    src, tgt = connector(lab, vm, tmp_path / "work"), KvmTarget("job1", tmp_path / "replicas")
    vm.write("vdb", GIB - MiB, MiB, 0x11)
    s1 = sync(src, vm, tgt, tmp_path, "p1")

    [vdb] = [
        v for v in client(lab).list("listVolumes", "volume", virtualmachineid=vm.id) if v["deviceid"] == 1
    ]
    client(lab).job("resizeVolume", id=vdb["id"], size=2)  # blockresize of the running domain
    vm.write("vdb", GIB + 3 * MiB, 64 * KiB, 0x21)  # in the grown part
    vm.write("vdb", MiB, 64 * KiB, 0x22)
    s2 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p2", s1.base)
    assert s2.snap.disk("vdb").size == 2 * GIB
    # the bitmap grew with the disk (QEMU resizes it): the grown part reads zero but what was written
    print(f"\nFIGURE resized vdb: {kinds(s2)['vdb']}, read {s2.results['vdb'].stats.bytes_read} bytes")
    assert kinds(s2) == {"vda": "incremental", "vdb": "incremental"}


def migrated(lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A booted guest synced once (p1) on its host, written there, live-migrated to the other host and
    written there too; this process then the agent of the new host. (vm, tgt, s1, new host id)"""
    vm = make_vm(blank=False, data_gib=(1,))
    old = vm.host()
    [new] = [h for h in lab_hosts(lab) if h != old]
    agent_on(monkeypatch, lab, old)
    tgt = KvmTarget("job1", tmp_path / "replicas")
    vm.write("vdb", 0, MiB, 0x11)
    wait_ready(lab, vm)
    s1 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p1")

    vm.write("vdb", 4 * MiB, 64 * KiB, 0x21)  # on the old host, before the migration
    vm.write("vda", ROOT_FREE, 64 * KiB, 0x22)
    t0 = time.monotonic()
    client(lab).job("migrateVirtualMachine", virtualmachineid=vm.id, hostid=new)
    print(f"\nFIGURE live migration {time.monotonic() - t0:.1f} s")
    assert vm.host() == new
    vm.write("vdb", 8 * MiB + 100, 10, 0x23)  # on the new host, after it
    vm.write("vda", ROOT_FREE + 128 * KiB, 64 * KiB, 0x24)

    # the old host's agent is asked: refused in one line naming the VM and where it runs
    with pytest.raises(ResourceUnavailable) as e:
        connector(lab, vm, tmp_path / "work").create_snapshot("p2", s1.base)
    msg = str(e.value)
    assert "\n" not in msg and vm.name in msg and f"runs on host {lab_hosts(lab)[new]['name']}" in msg
    assert not e.value.retryable
    agent_on(monkeypatch, lab, new)  # the new host's agent (a fresh connector, as a new activity)
    return vm, tgt, s1, new


def bitmaps(vm: LabVmHandle) -> dict[str, list[dict[str, Any]]]:
    from connectors.kvm.migrated_checkpoints import FollowsMigrations

    with vm.domain() as dom:
        src = FollowsMigrations("x", "", vm.instancename, Path("/nonexistent"))
        return {k: sorted(v.values(), key=lambda b: b["name"]) for k, v in src._bitmaps(dom).items()}


def test_a_vm_live_migrated_between_syncs_goes_on_incrementally_from_the_bitmaps_it_brought(
    lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm, tgt, s1, new = migrated(lab, make_vm, tmp_path, monkeypatch)
    # libvirt's checkpoint records stayed behind; QEMU brought the bitmaps (persistent, recording)
    with vm.domain() as dom:
        assert [c.getName() for c in dom.listAllCheckpoints(0)] == []
    assert {k: [(b["name"], b["recording"], b["persistent"]) for b in v] for k, v in bitmaps(vm).items()} == {
        "vda": [("sendense.job1.p1", True, True)],
        "vdb": [("sendense.job1.p1", True, True)],
    }
    s2 = sync(connector(lab, vm, tmp_path / "work-new"), vm, tgt, tmp_path, "p2", s1.base)
    # every write since p1, before the migration on the old host and after it on the new, is in p2
    # (compared with the volumes at the instant): the redefined checkpoint's bitmap missed none
    assert kinds(s2) == {"vda": "incremental", "vdb": "incremental"}
    assert {d.key: d.tracking_lost for d in s2.snap.disks} == {"vda": None, "vdb": None}
    assert s2.results["vdb"].stats.bytes_read == 2 * 64 * KiB
    print(f"FIGURE after the migration: {kinds(s2)}, vdb read {s2.results['vdb'].stats.bytes_read} bytes")
    with vm.domain() as dom:  # committed: the adopted base went, as any older checkpoint of the job
        assert [c.getName() for c in dom.listAllCheckpoints(0)] == ["sendense.job1.p2"]
    assert [b["name"] for b in bitmaps(vm)["vdb"]] == ["sendense.job1.p2"]
    vm.write("vdb", 9 * MiB, 64 * KiB, 0x25)
    s3 = sync(connector(lab, vm, tmp_path / "work-new"), vm, tgt, tmp_path, "p3", s2.base)
    assert kinds(s3) == {"vda": "incremental", "vdb": "incremental"}
    assert s3.results["vdb"].stats.bytes_read == 64 * KiB


def test_after_a_migration_a_disabled_bitmap_is_not_adopted_and_the_vm_is_resynced_with_why(
    lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connectors.kvm.migrated_checkpoints import REDEFINE, FollowsMigrations

    vm, tgt, s1, new = migrated(lab, make_vm, tmp_path, monkeypatch)
    node = next(
        b["inserted"]["node-name"]
        for b in vm.qmp("query-block")
        if b["qdev"].endswith("virtio-disk1/virtio-backend")
    )
    vm.qmp("block-dirty-bitmap-disable", node=node, name="sendense.job1.p1")  # vdb's misses writes now
    vm.write("vdb", 12 * MiB, 64 * KiB, 0x26)  # ... such as this one

    # what libvirt's own REDEFINE_VALIDATE says of it (the connector checks before asking it)
    xml = FollowsMigrations._redefine_xml("sendense.job1.p1", ["vda", "vdb"], {"vda", "vdb"}, [])
    with vm.domain() as dom:
        try:
            dom.checkpointCreateXML(xml, REDEFINE).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            validate = "accepted"
        except libvirt.libvirtError as e:
            validate = f"refused: {e.get_error_message()}"
    print(f"\nFIGURE libvirt REDEFINE_VALIDATE with vdb's bitmap disabled: {validate}")

    s2 = sync(connector(lab, vm, tmp_path / "work-new"), vm, tgt, tmp_path, "p2", s1.base)
    assert kinds(s2) == {"vda": "resync", "vdb": "resync"}  # every disk of the checkpoint, or none
    for d in s2.snap.disks:
        assert d.tracking_lost and "\n" not in d.tracking_lost
        assert "dirty bitmap sendense.job1.p1 of disk vdb is not recording (disabled)" in d.tracking_lost
    vm.write("vdb", 13 * MiB, 64 * KiB, 0x27)
    s3 = sync(connector(lab, vm, tmp_path / "work-new"), vm, tgt, tmp_path, "p3", s2.base)
    assert kinds(s3) == {"vda": "incremental", "vdb": "incremental"}


def test_unknown_zone_vm_and_a_bad_key_are_one_line_each_without_the_secret(
    lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_vm(blank=True, data_gib=())
    agent_on(monkeypatch, lab, vm.host())
    spec = source_spec(lab, vm.name)

    def attempt(s: CloudStackSource) -> Exception:
        with pytest.raises(Exception) as e:
            CloudStackSourceConnector("job1", s, tmp_path / "work").validate()
        msg = str(e.value)
        assert "\n" not in msg and lab.info["secret_key"] not in msg and lab.info["api_key"] not in msg
        return e.value

    e = attempt(spec.model_copy(update={"zone": "no-such-zone"}))
    assert isinstance(e, InvalidSpec) and "source.zone: no zone 'no-such-zone'" in str(e)
    e = attempt(spec.model_copy(update={"vm": "no-such-vm"}))
    assert isinstance(e, ResourceNotFound) and "no CloudStack VM 'no-such-vm' in zone" in str(e)
    e = attempt(spec.model_copy(update={"vm": "00000000-0000-4000-8000-000000000000"}))
    assert isinstance(e, ResourceNotFound) and "is gone" in str(e)
    monkeypatch.setenv(key_envs("default")[1], "not-the-secret-key")
    e = attempt(spec)
    assert isinstance(e, AccessDenied) and re.search(
        r"refused the API key or the request's signature", str(e)
    )
    assert "not-the-secret-key" not in str(e)
    assert control(lab, "/_lab/health")["ok"]


def test_a_volume_shrunk_and_grown_back_between_syncs_gives_an_exact_point(
    lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_vm(blank=True, data_gib=(2,))
    agent_on(monkeypatch, lab, vm.host())
    tgt = KvmTarget("job1", tmp_path / "replicas")
    vm.write("vdb", GIB + 5 * MiB, MiB, 0x11)  # in the part the shrink drops
    s1 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p1")
    [vdb] = [
        v for v in client(lab).list("listVolumes", "volume", virtualmachineid=vm.id) if v["deviceid"] == 1
    ]
    client(lab).job("resizeVolume", id=vdb["id"], size=1, shrinkok=True)
    client(lab).job("resizeVolume", id=vdb["id"], size=2)  # the dropped part reads zero now
    vm.write("vdb", MiB, 64 * KiB, 0x22)
    s2 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p2", s1.base)
    with open(tmp_path / "p2-vdb.raw", "rb") as f:  # (the reference: the dropped part reads zero)
        f.seek(GIB + 5 * MiB)
        assert f.read(MiB) == bytes(MiB)
    # QEMU treats a resize as a write of the part that changed size: the grown part is dirty in the
    # checkpoint's bitmap, so the incremental covers the zeros where the old data was (exact above)
    assert kinds(s2) == {"vda": "incremental", "vdb": "incremental"}
    print(f"\nFIGURE vdb shrunk and grown back: read {s2.results['vdb'].stats.bytes_read} B")


def test_a_stopped_vm_is_read_at_rest_in_the_same_change_tracking_and_goes_on_when_started(
    lab: LabServer, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a planned failover does (CloudStack has no pause: the VM is stopped, then its last point is
    taken): the stopped VM's volumes are read at rest, incrementally from the bitmaps QEMU stored as it
    stopped; the point's bitmap is added to each volume, so that once the VM is started again (on
    whichever host) that host's libvirt adopts it and the next sync is incremental too."""
    vm = make_vm(blank=True, data_gib=(1,))
    agent_on(monkeypatch, lab, vm.host())
    tgt = KvmTarget("job1", tmp_path / "replicas")
    vm.write("vdb", 0, 1 * MiB, 0x11)
    s1 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p1")
    vm.write("vdb", 4 * MiB, 64 * KiB, 0x12)
    client(lab).job("stopVirtualMachine", id=vm.id)

    refs = {}
    for key, f in vm.volume_files().items():  # at rest: nothing writes them
        refs[key] = tmp_path / f"p2-{key}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", f, refs[key]], check=True)
    s2 = sync_point(connector(lab, vm, tmp_path / "work"), tgt, "p2", s1.base)
    assert kinds(s2) == {"vda": "incremental", "vdb": "incremental"}
    assert s2.results["vdb"].stats.bytes_read == 64 * KiB
    for key, ref in refs.items():
        assert same(tgt.point_path("p2", key), ref), key

    client(lab).job("startVirtualMachine", id=vm.id)
    agent_on(monkeypatch, lab, vm.host())  # wherever it started
    vm.write("vdb", 8 * MiB, 64 * KiB, 0x13)
    s3 = sync(connector(lab, vm, tmp_path / "work"), vm, tgt, tmp_path, "p3", s2.base)
    assert kinds(s3) == {"vda": "incremental", "vdb": "incremental"}
    assert s3.results["vdb"].stats.bytes_read == 64 * KiB
    with vm.domain() as dom:
        assert [c.getName() for c in dom.listAllCheckpoints(0)] == ["sendense.job1.p3"]
