"""What the memory platform promises beyond the contract suite (tests/contract): its spec is for
developers only, its fault injection does exactly what a test asks, its two backends behave the same,
its extents are exact for any block size, and its errors are one line naming what the user knows."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.memory.faults import InjectedFault
from connectors.memory.source import MemorySourceConnector
from connectors.memory.spec import MemorySource, MemoryTarget
from connectors.memory.store import Store
from connectors.memory.target import MemoryTargetConnector
from sendense import platforms
from sendense.datapath.extents import Extent, coalesce
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import DiskInfo, JobSpec
from sendense.spec import parse_spec

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(params=["memory", "files"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store.named(f"t-{uuid.uuid4().hex[:8]}") if request.param == "memory" else Store.at(tmp_path / "st")
    yield s
    Store.discard(s)


def source(store: Store, job: str = "j", **kw: object) -> MemorySourceConnector:
    place = {"directory": Path(store.name)} if store.name.startswith("/") else {"store": store.name}
    return MemorySourceConnector(job, MemorySource(platform="memory", vm="vm", **place, **kw))  # type: ignore[arg-type]


def target(store: Store, job: str = "j", job_id: str = "", **kw: object) -> MemoryTargetConnector:
    place = {"directory": Path(store.name)} if store.name.startswith("/") else {"store": store.name}
    return MemoryTargetConnector(job, MemoryTarget(platform="memory", **place, **kw), job_id)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ spec


def test_the_platform_is_for_developers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {
        "name": "j",
        "source": {"platform": "memory", "vm": "web"},
        "target": {"platform": "memory", "store": "lab"},
    }
    monkeypatch.delenv(platforms.DEVELOPER_PLATFORMS, raising=False)
    with pytest.raises(InvalidSpec) as ei:
        parse_spec(data, "job.yaml")
    assert str(ei.value) == (
        "job.yaml: source.platform: 'memory' is for developers (set SENDENSE_DEVELOPER_PLATFORMS=1); "
        "one of: kvm, aws, vsphere, cloudstack"
    )
    assert "memory" not in platforms.offered("target")
    monkeypatch.setenv(platforms.DEVELOPER_PLATFORMS, "1")
    spec = parse_spec(data, "job.yaml")
    assert (spec.source.describe(), spec.target.describe()) == ("memory:default:web", "memory:lab")
    assert platforms.offered("source") == ["kvm", "aws", "vsphere", "cloudstack", "memory"]


@pytest.mark.parametrize(
    ("end", "message"),
    [
        ({"platform": "memory", "vm": "web", "block_size": 3000}, "block_size must be a power of two"),
        ({"platform": "memory", "vm": "web", "store": "a", "directory": "/d"}, "give store or directory"),
        ({"platform": "memory", "vm": "web", "password": "x"}, "credentials never go in a job spec"),
        ({"platform": "memory", "vm": "no/such"}, "source.vm"),
    ],
)
def test_spec_errors_are_one_line_naming_the_field(
    end: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(platforms.DEVELOPER_PLATFORMS, "1")
    with pytest.raises(InvalidSpec, match=message) as ei:
        parse_spec({"name": "j", "source": end, "target": {"platform": "memory"}})
    assert "\n" not in str(ei.value)


def test_a_directory_is_resolved_against_the_spec_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(platforms.DEVELOPER_PLATFORMS, "1")
    spec = JobSpec.model_validate(
        {
            "name": "j",
            "source": {"platform": "memory", "vm": "w", "directory": "st"},
            "target": {"platform": "memory"},
        }
    )
    assert spec.source.resolved(tmp_path).directory == tmp_path / "st"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------- faults


def test_faults_fail_the_nth_call_once_or_always_as_asked(store: Store) -> None:
    store.create_vm("vm", {"d": 1 * MiB})
    src = source(store)
    store.faults.fail("source.validate", nth=2)
    src.validate()
    with pytest.raises(InjectedFault, match=r"^injected fault: source.validate \(call 2\)$") as ei:
        src.validate()
    assert ei.value.retryable
    src.validate()  # once
    store.faults.fail("source.discover", times=None, retryable=False, error=ResourceNotFound, message="gone")
    for _ in range(3):
        with pytest.raises(ResourceNotFound, match="^gone$") as e2:
            src.discover()
        assert not e2.value.retryable
    store.faults.clear()
    src.discover()
    with pytest.raises(ValueError, match="no verb 'target.wrte'"):
        store.faults.fail("target.wrte")


def test_kill_after_fails_the_write_that_would_pass_the_bytes_once(store: Store) -> None:
    tgt = target(store)
    tgt.prepare("s1", [DiskInfo(key="d", size=1 * MiB)])
    store.faults.kill_after(100 * KiB)
    with tgt.open_disk("s1", "d") as disk:
        w = disk.connect()
        w.write(0, b"\x01" * 64 * KiB)
        w.zero(64 * KiB, 64 * KiB)  # a zero write moves no bytes
        with pytest.raises(InjectedFault, match="copy killed after 102400 bytes"):
            w.write(128 * KiB, b"\x02" * 64 * KiB)  # 64 + 64 > 100 KiB: fails, writes nothing
        assert w.read(128 * KiB, 4) == bytes(4)
        w.write(128 * KiB, b"\x02" * 64 * KiB)  # once
    assert store.faults.pending == []
    assert store.faults.calls["target.write"] == 4


# ---------------------------------------------------------------------------------------- extents


@pytest.mark.parametrize("block", [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB])
def test_full_extents_are_every_block_tagged_by_its_content(store: Store, block: int) -> None:
    size = 3 * MiB + 12 * KiB
    guest = store.create_vm("vm", {"d": size})
    for off, n in [(0, 10), (70 * KiB, 4 * KiB), (200 * KiB, 1), (1 * MiB + 5, 300 * KiB), (size - 3, 3)]:
        guest.write("d", off, b"\x5a" * n)
    guest.write("d", 2 * MiB, bytes(64 * KiB))  # zeros written: reads zero
    src = source(store, block_size=block)
    snap = src.create_snapshot("s1", {})
    content = guest.read("d", 0, size)
    for start in (0, 5 * KiB, 1 * MiB + 1):
        with src.open_disk(snap, "d") as disk:
            got = list(disk.extents(None, start))
        want = [
            Extent(max(lo, start), min(lo + block, size) - max(lo, start), not any(content[lo : lo + block]))
            for lo in range(0, size, block)
            if lo + block > start
        ]
        assert got == list(coalesce(want)), (block, start)


# ------------------------------------------------------------------------------------ one-liners


def test_errors_name_what_the_user_knows(store: Store) -> None:
    with pytest.raises(ResourceNotFound, match=f"^source.vm: no VM vm in memory store {store.name}$"):
        source(store).validate()
    store.create_vm("vm", {"d": 1 * MiB})
    tgt = target(store, block_size=64 * KiB)
    tgt.prepare("s1", [DiskInfo(key="d", size=1 * MiB - 512)])
    with tgt.open_disk("s1", "d") as disk:
        w = disk.connect()
        with pytest.raises(TargetError, match=r"write of 4096 bytes at 0 is not whole 65536-byte blocks"):
            w.write(0, b"x" * 4096)
        w.write(15 * 64 * KiB, b"x" * (64 * KiB - 512))  # the last block, short at the disk's end
    with pytest.raises(ResourceNotFound, match="^target: disk d of sync s2 is not prepared in memory store"):
        with tgt.open_disk("s2", "d"):
            pass
    with pytest.raises(InvalidSpec, match="--format: 'vdi' is not one of raw, qcow2, vmdk, vhdx"):
        tgt.export("s1", "vdi", Path("/nonexistent"))
    tgt.commit("s1", _point("s1", 1 * MiB - 512))
    with pytest.raises(TargetError, match="holds the points of an earlier job j; delete them"):
        target(store, job_id="another-identity").validate()


def test_a_retried_snapshot_replaces_the_earlier_attempt(store: Store) -> None:
    guest = store.create_vm("vm", {"d": 1 * MiB})
    src = source(store)
    first = src.create_snapshot("s1", {})
    guest.write("d", 0, b"\x01" * 10)
    second = src.create_snapshot("s1", {})
    assert first.disks[0].change_id != second.disks[0].change_id
    assert store.change_ids("vm") == {"d": [second.disks[0].change_id]}
    with pytest.raises(ResourceNotFound, match="snapshot s1 of VM vm .*: gone"):
        with src.open_disk(first, "d"):
            pass
    with src.open_disk(second, "d") as disk:
        assert disk.connect().read(0, 10) == b"\x01" * 10


def test_a_directory_store_is_shared_by_processes(tmp_path: Path) -> None:
    store = Store.at(tmp_path / "st")
    store.create_vm("vm", {"d": 1 * MiB})
    snap = source(store).create_snapshot("s1", {})
    code = (
        "import sys; from pathlib import Path; from connectors.memory.store import Store; "
        "Store.at(Path(sys.argv[1])).guest('vm').write('d', 4096, b'other process')"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "st")], check=True, cwd=Path(__file__).parents[3]
    )
    assert store.guest("vm").read("d", 4096, 13) == b"other process"
    assert store.tracking("vm", "d")[snap.disks[0].change_id] == [(4096, 4096 + 13)]


def _point(point_id: str, size: int):  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from sendense.models import PointDisk, PointInfo

    now = datetime.now(UTC)
    return PointInfo(
        point_id=point_id,
        job="j",
        created_at=now,
        committed_at=now,
        kind="full",
        disks=[PointDisk(key="d", size=size, change_id="c")],
    )


def test_every_error_is_a_sendense_error() -> None:
    assert issubclass(InjectedFault, SendenseError) and InjectedFault.kind == "InjectedFault"
