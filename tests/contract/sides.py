"""The two ends of a contract rig: VMs of each platform as their guests write them, and each platform's
replica store with what it holds of a job (rigs.py puts one of each together)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers_kvm import KiB, MiB, all_bitmap_names, make_qcow2, qemu_io, run, virtual_size

from connectors.aws.blocks import BLOCK as EBS_BLOCK
from connectors.aws.source import disk_key
from connectors.aws.spec import AwsSource, AwsTarget
from connectors.aws.tags import ROLE_SOURCE, ROLE_TARGET, TAG_JOB, TAG_ROLE
from connectors.kvm.spec import KvmSource, KvmTarget
from connectors.memory.spec import MemorySource, MemoryTarget
from connectors.memory.store import Store
from connectors.vsphere.session import extra_config
from connectors.vsphere.source import job_key
from connectors.vsphere.spec import VsphereSource, VsphereTarget
from labs.aws import AwsLab
from labs.kvm.vm import LabVm
from labs.vsphere import VsphereLab
from sendense import config
from sendense.models import SourceSpec, TargetSpec
from tools.qmp import QmpClient

# ------------------------------------------------------------------------------------ VM sides


class VmSide:
    """A VM of one platform, written to as its guest would; `sizes` are its disks in order."""

    platform = ""
    granule = 1  # change tracking's unit: an incremental lists whole granules
    zero_writes_listed_as_zero = True  # False: a zero write is listed as a data block of zeros
    # why a write after the snapshot makes its copy refuse the snapshot (SnapshotInconsistent, the
    # workflow takes a new one) instead of reading the instant, if it does
    refuses_writes_after_snapshot: str | None = None
    sizes: dict[str, int]

    def spec(self) -> SourceSpec:
        raise NotImplementedError

    def write(self, key: str, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def zero(self, key: str, offset: int, length: int) -> None:
        raise NotImplementedError

    def discard(self, key: str, offset: int, length: int) -> None:
        raise NotImplementedError

    def resize(self, key: str, size: int) -> None:
        raise NotImplementedError

    def lose_tracking(self, key: str, change_id: str) -> None:
        """The base `change_id` of disk `key` goes, as a lost bitmap or a deleted snapshot would."""
        raise NotImplementedError

    def tracking_state(self, job: str) -> list[str]:
        """Whatever of the job's change tracking the source holds (empty after forget)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class MemoryVm(VmSide):
    platform = "memory"
    granule = 16 * KiB  # the spec's block_size (below the store's 64 KiB chunks, on purpose)

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sizes = {"disk0": 4 * MiB, "disk1": 3 * MiB + 4 * KiB}
        self.guest = store.create_vm("vm", self.sizes)

    def spec(self) -> SourceSpec:
        return MemorySource(platform="memory", store=self.store.name, vm="vm", block_size=self.granule)

    def write(self, key: str, offset: int, data: bytes) -> None:
        self.guest.write(key, offset, data)

    def zero(self, key: str, offset: int, length: int) -> None:
        self.guest.zero(key, offset, length)

    def discard(self, key: str, offset: int, length: int) -> None:
        self.guest.discard(key, offset, length)

    def resize(self, key: str, size: int) -> None:
        self.guest.resize(key, size)

    def lose_tracking(self, key: str, change_id: str) -> None:
        self.store.lose_tracking("vm", key)

    def tracking_state(self, job: str) -> list[str]:
        ids = [f"{k}: {c}" for k, cs in self.store.change_ids("vm").items() for c in cs if f".{job}." in c]
        return ids + self.store.contents(f"snap/vm/{job}/")


class KvmVm(VmSide):
    """A running QEMU (the lab VM, no guest OS) read by the QMP source: QEMU's own pull backup."""

    platform = "kvm"
    granule = 64 * KiB  # the lab images' cluster size, and the dirty bitmaps' granularity

    def __init__(self, work: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ctr-", dir="/tmp"))  # unix sockets: < 108 bytes
        self.work = work
        self.sizes = {"disk0": 8 * MiB, "disk1": 4 * MiB + 4 * KiB}
        self.vm = LabVm(self.dir / "vm", list(self.sizes.values()), discard=True).start()

    def spec(self) -> SourceSpec:
        return KvmSource(platform="kvm", qmp=self.vm.qmp_path)

    @staticmethod
    def _n(key: str) -> int:
        return int(key.removeprefix("disk"))

    def write(self, key: str, offset: int, data: bytes) -> None:
        self.vm.write(self._n(key), offset, data)

    def zero(self, key: str, offset: int, length: int) -> None:
        self.vm.write_zeroes(self._n(key), offset, length)

    def discard(self, key: str, offset: int, length: int) -> None:
        self.vm.qemu_io(self._n(key), f"discard {offset} {length}")

    def resize(self, key: str, size: int) -> None:
        self.vm.resize(self._n(key), size)

    def lose_tracking(self, key: str, change_id: str) -> None:
        with QmpClient(self.vm.qmp_path) as c:
            c.execute("block-dirty-bitmap-remove", node=key, name=change_id)

    def tracking_state(self, job: str) -> list[str]:
        with QmpClient(self.vm.qmp_path) as c:
            nodes = c.execute("query-named-block-nodes", flat=True)
            left = [
                f"{n['node-name']}: bitmap {b['name']}"
                for n in nodes
                for b in n.get("dirty-bitmaps", []) or []
                if b.get("name", "").startswith((f"sendense.{job}.", f"sendense-shrink.{job}."))
            ]
            left += [f"export {e['id']}" for e in c.execute("query-block-exports")]
            left += [f"job {j['id']}" for j in c.execute("query-jobs")]
        return left + [f"file {f}" for f in (self.work / "fleece").glob("*/*")]

    def close(self) -> None:
        try:
            self.vm.stop(timeout=10)
        finally:
            self.vm.kill()
            shutil.rmtree(self.dir, ignore_errors=True)


class KvmStoppedVm(VmSide):
    """A stopped VM's qcow2 images, written with qemu-io, tracked by persistent bitmaps in the images."""

    platform = "kvm"
    granule = 64 * KiB  # cluster size and bitmap granularity of helpers_kvm.make_qcow2's images
    refuses_writes_after_snapshot = (
        "a stopped VM's images are read in place: a write after the snapshot makes the copy refuse it "
        "(SnapshotInconsistent) and the workflow take a new snapshot at once"
    )

    def __init__(self, base: Path) -> None:
        self.sizes = {"disk0": 8 * MiB, "disk1": 4 * MiB + 4 * KiB}
        self.paths = {k: make_qcow2(base / f"{k}.qcow2", s) for k, s in self.sizes.items()}

    def spec(self) -> SourceSpec:
        return KvmSource(platform="kvm", disks=list(self.paths.values()))

    def write(self, key: str, offset: int, data: bytes) -> None:
        assert len(set(data)) == 1, "qemu-io writes a pattern byte"
        qemu_io(self.paths[key], f"write -P 0x{data[0]:02x} {offset} {len(data)}")

    def zero(self, key: str, offset: int, length: int) -> None:
        qemu_io(self.paths[key], f"write -z {offset} {length}")

    def discard(self, key: str, offset: int, length: int) -> None:
        qemu_io(self.paths[key], f"discard {offset} {length}")

    def resize(self, key: str, size: int) -> None:
        shrink = ["--shrink"] if size < virtual_size(self.paths[key]) else []
        run("qemu-img", "resize", "-q", *shrink, self.paths[key], size)

    def lose_tracking(self, key: str, change_id: str) -> None:
        run("qemu-img", "bitmap", "--remove", self.paths[key], change_id)

    def tracking_state(self, job: str) -> list[str]:
        mine = (f"sendense.{job}.", f"sendense-shrink.{job}.")
        return [
            f"{k}: bitmap {b}"
            for k, p in self.paths.items()
            for b in all_bitmap_names(p)
            if b.startswith(mine)
        ]


class AwsVm(VmSide):
    """An EC2 instance of the AWS lab with two 1 GiB volumes, written through the lab's control API."""

    platform = "aws"
    granule = EBS_BLOCK
    zero_writes_listed_as_zero = False  # EBS lists written blocks, zeros or not

    def __init__(self, lab: AwsLab) -> None:
        self.lab = lab
        self.ec2 = lab.client("ec2")
        inst = lab.make_instance(f"c-{uuid.uuid4().hex[:6]}", [1, 1])
        self.instance_id = inst.instance_id
        self.volumes = {disk_key(dev): vol for dev, vol, _ in inst.volumes}
        self.sizes = {disk_key(dev): gib << 30 for dev, _, gib in inst.volumes}

    def spec(self) -> SourceSpec:
        lab = self.lab
        return AwsSource(
            platform="aws", region=lab.region, endpoint_url=lab.endpoint_url, instance_id=self.instance_id
        )

    def write(self, key: str, offset: int, data: bytes) -> None:
        self.lab.write(self.volumes[key], offset, data)

    def zero(self, key: str, offset: int, length: int) -> None:
        self.lab.write(self.volumes[key], offset, bytes(length))

    def lose_tracking(self, key: str, change_id: str) -> None:
        self.ec2.delete_snapshot(SnapshotId=change_id)

    def close(self) -> None:
        """The lab runs a QEMU per running instance: terminate it (its volumes go with it)."""
        self.ec2.terminate_instances(InstanceIds=[self.instance_id])

    def tracking_state(self, job: str) -> list[str]:
        f = [
            {"Name": f"tag:{TAG_JOB}", "Values": [job]},
            {"Name": f"tag:{TAG_ROLE}", "Values": [ROLE_SOURCE]},
        ]
        snaps = self.ec2.describe_snapshots(OwnerIds=["self"], Filters=f)["Snapshots"]
        return [f"snapshot {s['SnapshotId']}" for s in snaps]


class CloudStackVm(VmSide):
    """A running VM of the CloudStack lab (a blank ROOT and a data volume, 1 GiB each: nothing but the
    test writes them), read by the CloudStack source as the agent of the lab host that runs it. Its
    guest writes go through the VM's own virtio-blk backend on that host (helpers_cloudstack)."""

    platform = "cloudstack"
    granule = 64 * KiB  # the volumes' qcow2 cluster size: the checkpoints' bitmap granularity

    def __init__(self, lab: Any, monkeypatch: Any) -> None:
        from helpers_cloudstack import LabVmHandle, agent_on

        self.lab = lab
        self.vm = LabVmHandle(lab, blank=True, data_gib=(1,))
        self.sizes = {"vda": 1 << 30, "vdb": 1 << 30}
        agent_on(monkeypatch, lab, self.vm.host())  # this process is the agent of the VM's host

    def spec(self) -> SourceSpec:
        from helpers_cloudstack import source_spec

        return source_spec(self.lab, self.vm.name)

    def write(self, key: str, offset: int, data: bytes) -> None:
        assert len(set(data)) == 1, "qemu-io writes a pattern byte"
        self.vm.write(key, offset, len(data), data[0])

    def zero(self, key: str, offset: int, length: int) -> None:
        self.vm.zero(key, offset, length)

    def _node(self, key: str) -> str:
        from labs.kvm.libvirtd import device_alias

        with self.vm.domain() as dom:
            qdev = f"/machine/peripheral/{device_alias(dom, key)}/virtio-backend"
        [b] = [b for b in self.vm.qmp("query-block") if b.get("qdev") == qdev]
        return str(b["inserted"]["node-name"])

    def lose_tracking(self, key: str, change_id: str) -> None:
        """The checkpoint's bitmap goes from that disk's image behind libvirt's back."""
        self.vm.qmp("block-dirty-bitmap-remove", node=self._node(key), name=change_id.split("@")[0])

    def tracking_state(self, job: str) -> list[str]:
        mine = f"sendense.{job}."
        with self.vm.domain() as dom:
            left = [
                f"checkpoint {n}" for c in dom.listAllCheckpoints(0) if (n := c.getName()).startswith(mine)
            ]
        nodes = self.vm.qmp("query-named-block-nodes", flat=True)
        left += [
            f"{n['node-name']}: bitmap {b['name']}"
            for n in nodes
            for b in n.get("dirty-bitmaps", []) or []
            if b.get("name", "").startswith(mine)
        ]
        left += [f"job {j['id']}" for j in self.vm.qmp("query-jobs")]
        return left

    def close(self) -> None:
        self.vm.destroy()


class VsphereVm(VmSide):
    """A powered-off VM of the vSphere lab (vcsim-lab): its guest writes land in the VM's current disk
    file (the delta on top of its snapshots), written with qemu-io on the file the lab names."""

    platform = "vsphere"
    granule = 64 * KiB  # the lab's tracking block (and the VMDK grain)
    zero_writes_listed_as_zero = False  # (a zero write allocates a VMDK grain of zeros)

    def __init__(self, lab: VsphereLab) -> None:
        self.lab = lab
        self.sizes = {"scsi0-0": 8 * MiB, "scsi0-1": 4 * MiB + 4 * KiB}
        self.name = f"c-{uuid.uuid4().hex[:8]}"
        self.moref = lab.make_vm(self.name, list(self.sizes.values()))
        self.vm = lab.vm(self.moref)

    def spec(self) -> SourceSpec:
        lab = self.lab
        return VsphereSource(
            platform="vsphere", server=f"{lab.host}:{lab.port}", thumbprint=lab.thumbprint, vm=self.name
        )

    def _file(self, key: str) -> tuple[str, str]:
        d = self._disk(key)
        info = self.lab.disk_info(self.moref, d.backing.fileName)
        return info["path"], info["format"]

    def _io(self, key: str, cmd: str) -> None:
        path, fmt = self._file(key)
        run("qemu-io", "-f", fmt, "-c", cmd, path)

    def write(self, key: str, offset: int, data: bytes) -> None:
        assert len(set(data)) == 1, "qemu-io writes a pattern byte"
        self._io(key, f"write -P 0x{data[0]:02x} {offset} {len(data)}")

    def zero(self, key: str, offset: int, length: int) -> None:
        self._io(key, f"write -z {offset} {length}")

    def _disk(self, key: str) -> Any:
        from pyVmomi import vim

        disks = [d for d in self.vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        return sorted(disks, key=lambda d: d.unitNumber)[list(self.sizes).index(key)]

    def lose_tracking(self, key: str, change_id: str) -> None:
        """That disk alone loses its change tracking (its -ctk.vmdk lost: the lab's per-disk reset, a new
        ctk uuid); the other disks keep theirs."""
        self.lab.reset_tracking(self.moref, self._disk(key).key)

    def tracking_state(self, job: str) -> list[str]:
        todo = list(self.vm.snapshot.rootSnapshotList) if self.vm.snapshot is not None else []
        left = []
        while todo:
            n = todo.pop()
            todo.extend(n.childSnapshotList or [])
            if n.name.startswith(f"sendense-{job}-"):
                left.append(f"snapshot {n.name}")
        if job_key(job) in extra_config(self.vm):
            left.append(f"mark {job_key(job)}")
        return sorted(left)

    def close(self) -> None:
        try:
            self.lab.wait(self.vm.Destroy_Task())
        except Exception:  # noqa: BLE001 (the lab may be gone with the session)
            pass


# ------------------------------------------------------------------------------- replica sides


class ReplicaSide:
    platform = ""
    block = 1  # the unit it writes in (a half-written attempt is written in it)
    # why prune keeps the point before a held one too, if it does
    keeps_point_before_held: str | None = None

    def spec(self) -> TargetSpec:
        raise NotImplementedError

    def leftovers(self, job: str) -> list[str]:
        """Everything of the job the target holds (points, replicas, pending writes, records)."""
        raise NotImplementedError


class MemoryReplicas(ReplicaSide):
    platform = "memory"

    def __init__(self, store: Store, block: int = 1) -> None:
        self.store, self.block = store, block

    def spec(self) -> TargetSpec:
        return MemoryTarget(platform="memory", store=self.store.name, block_size=self.block)

    def leftovers(self, job: str) -> list[str]:
        return self.store.contents(f"target/{job}/")


class KvmReplicas(ReplicaSide):
    platform = "kvm"
    keeps_point_before_held = (
        "a KVM point is pruned by merging it into its successor's file (qemu-img commit), "
        "which would rewrite the held point"
    )

    def __init__(self, path: Path) -> None:
        self.path = path

    def spec(self) -> TargetSpec:
        return KvmTarget(platform="kvm", path=self.path)

    def leftovers(self, job: str) -> list[str]:
        d = self.path / job
        return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


class AwsReplicas(ReplicaSide):
    platform = "aws"
    block = EBS_BLOCK

    def __init__(self, lab: AwsLab | None, region: str | None = None) -> None:
        """The lab's region; or, with no lab, a real AWS region (the agent's credential chain)."""
        self.lab = lab
        if lab is not None:
            self.region, self.endpoint_url = lab.region, lab.endpoint_url
            self.ec2 = lab.client("ec2")
        else:
            import boto3

            assert region is not None
            self.region, self.endpoint_url = region, None
            self.ec2 = boto3.client("ec2", region_name=region)

    def spec(self) -> TargetSpec:
        return AwsTarget(platform="aws", region=self.region, endpoint_url=self.endpoint_url)

    def leftovers(self, job: str) -> list[str]:
        """The job's target snapshots, and the target's local records but tombstones (the record that
        a snapshot was deleted, kept while EC2 may still list it)."""
        f = [
            {"Name": f"tag:{TAG_JOB}", "Values": [job]},
            {"Name": f"tag:{TAG_ROLE}", "Values": [ROLE_TARGET]},
        ]
        snaps = self.ec2.describe_snapshots(OwnerIds=["self"], Filters=f)["Snapshots"]
        records = config.home() / "aws-target" / job
        files = [f"record {p.name}" for p in records.glob("*") if not p.name.endswith(".deleted")]
        return sorted(f"snapshot {s['SnapshotId']}" for s in snaps) + sorted(files)


class VsphereReplicas(ReplicaSide):
    platform = "vsphere"
    keeps_point_before_held = (
        "removing a vSphere point's snapshot consolidates the next point's delta with it: the files a "
        "held point's VM runs on would be rewritten"
    )

    def __init__(self, lab: VsphereLab) -> None:
        self.lab = lab

    def spec(self) -> TargetSpec:
        lab = self.lab
        return VsphereTarget(
            platform="vsphere",
            server=f"{lab.host}:{lab.port}",
            thumbprint=lab.thumbprint,
            datacenter="DC0",
            datastore="LocalDS_0",
        )

    def leftovers(self, job: str) -> list[str]:
        """The job's placeholder VM and its snapshots, and hold fields of the job."""
        from pyVmomi import vim

        content = self.lab.si().RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        try:
            vms = [v for v in view.view if v.name == f"sendense-{job}"]
        finally:
            view.Destroy()
        out = []
        for vm in vms:
            out.append(f"vm {vm.name}")
            todo = list(vm.snapshot.rootSnapshotList) if vm.snapshot is not None else []
            while todo:
                n = todo.pop()
                todo.extend(n.childSnapshotList or [])
                out.append(f"snapshot {n.name}")
        fields = content.customFieldsManager.field or []
        out += [f"field {f.name}" for f in fields if f.name.startswith(f"sendense.hold.name:{job}.")]
        return sorted(out)


class CloudStackReplicas(ReplicaSide):
    """A CloudStack target on the CloudStack lab (in this process): the KVM target's points in the job's
    directory on the lab's primary storage pool, written by the agent of a lab host that mounts it."""

    platform = "cloudstack"
    keeps_point_before_held = (
        "a CloudStack point is a KVM target's file on the pool, pruned by merging it into its "
        "successor's (qemu-img commit), which would rewrite the held point"
    )

    def __init__(self, lab: Any, login: str) -> None:
        self.lab, self.login = lab, login

    def spec(self) -> TargetSpec:
        from connectors.cloudstack.spec import CloudStackTarget

        return CloudStackTarget(
            platform="cloudstack",
            url=self.lab.url,
            zone=self.lab.info["zone"],
            login=self.login,
            storage="lab-primary-1",
            template="sendense-guest",
            drill_network="lab-isolated",
            host="cs-lab-host-1",
        )

    def leftovers(self, job: str) -> list[str]:
        """The job's directory on the pool (a job without an id: sendense/<job>/<job>), and volumes."""
        d = self.lab.cloud.state.pool.path / "sendense" / job
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []
        vols = sorted(
            f"volume {v.name}" for v in self.lab.cloud.state.volumes.values() if v.name.startswith(job)
        )
        return files + vols


class CloudStackRealReplicas(CloudStackReplicas):
    """A CloudStack target on a real management server, configured by the environment: the API
    (SENDENSE_CLOUDSTACK_TEST_URL, _ZONE), a file pool (_STORAGE) that this machine mounts as the KVM
    host named SENDENSE_CLOUDSTACK_TEST_HOST, and the default login's keys. It only writes files of its
    own jobs into the pool (sendense/<job>/...) and removes them."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(None, "default")
        self.env = env

    def spec(self) -> TargetSpec:
        from connectors.cloudstack.spec import CloudStackTarget

        e = self.env
        return CloudStackTarget(
            platform="cloudstack",
            url=e["SENDENSE_CLOUDSTACK_TEST_URL"],
            zone=e["SENDENSE_CLOUDSTACK_TEST_ZONE"],
            storage=e["SENDENSE_CLOUDSTACK_TEST_STORAGE"],
            host=e["SENDENSE_CLOUDSTACK_TEST_HOST"],
        )

    def leftovers(self, job: str) -> list[str]:
        from connectors.cloudstack import api as csapi
        from connectors.cloudstack.spec import CloudStackTarget
        from connectors.cloudstack.target import find_pool

        spec = self.spec()
        assert isinstance(spec, CloudStackTarget)
        pool_dir = csapi.pool_dir(find_pool(csapi.client_for(spec), spec))
        d = (pool_dir or Path("/nonexistent")) / "sendense" / job
        return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def cloudstack_lab(root: Path, login: str, *, libvirt: bool, caps: Path | None = None) -> Iterator[Any]:
    """A CloudStack lab in this process, its keys in the environment under a login of its own (a
    test's SENDENSE_HOME is its own: no lab registration outlives it)."""
    from labs.cloudstack.server import LabServer
    from labs.cloudstack.state import LabConfig

    config = LabConfig(libvirt=libvirt, pool_capacity_gib=8, libvirt_cache=str(caps or ""), stop_timeout=2)
    server = LabServer(root, config).start()
    names = (
        f"SENDENSE_CLOUDSTACK_{login.upper()}_API_KEY",
        f"SENDENSE_CLOUDSTACK_{login.upper()}_SECRET_KEY",
    )
    os.environ[names[0]], os.environ[names[1]] = server.info["api_key"], server.info["secret_key"]
    try:
        yield server
    finally:
        for n in names:
            os.environ.pop(n, None)
        server.close()
