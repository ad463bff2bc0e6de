"""KvmTarget: immutable recovery points as a qcow2 backing chain, crash recovery, prune, export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers_kvm import MiB, content_digest, file_digest, image_info, qemu_io, run, same_content, virtual_size

from connectors.kvm.target import KvmTarget
from sendense.datapath.nbd import NbdConnection
from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.models import DiskInfo, PointDisk, PointInfo

JOB = "j"
SIZE = 32 * MiB


class Model:
    """The target plus what every point must read: an in-memory image of each disk at each point."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tgt = KvmTarget(JOB, tmp / "replicas")
        self.current: dict[str, bytearray] = {}
        self.expected: dict[str, dict[str, bytes]] = {}  # point -> key -> bytes

    def disks(self, sizes: dict[str, int]) -> list[DiskInfo]:
        for key, size in sizes.items():
            buf = self.current.setdefault(key, bytearray(size))
            if len(buf) < size:
                buf.extend(bytes(size - len(buf)))
        return [DiskInfo(key=k, size=s) for k, s in sizes.items()]

    def write(self, sync_id: str, key: str, writes: list[tuple[int, bytes]]) -> None:
        with self.tgt.open_disk(sync_id, key) as td, NbdConnection(td.uri, writable=True) as w:
            for off, data in writes:
                w.write(off, data)
                self.current[key][off : off + len(data)] = data
            w.flush()

    def point(self, sync_id: str, sizes: dict[str, int]) -> PointInfo:
        now = datetime.now(UTC)
        return PointInfo(
            point_id=sync_id,
            job=JOB,
            created_at=now,
            committed_at=now,
            kind="incremental",
            disks=[PointDisk(key=k, size=s, change_id=f"c-{sync_id}") for k, s in sizes.items()],
        )

    def sync(
        self, sync_id: str, writes: dict[str, list[tuple[int, bytes]]], sizes: dict[str, int] | None = None
    ) -> PointInfo:
        sizes = sizes or {k: SIZE for k in writes}
        self.tgt.prepare(sync_id, self.disks(sizes))
        for key, w in writes.items():
            self.write(sync_id, key, w)
        p = self.tgt.commit(sync_id, self.point(sync_id, sizes))
        self.expected[sync_id] = {k: bytes(self.current[k][: sizes[k]]) for k in sizes}
        return p

    def raw(self, point_id: str, key: str) -> Path:
        p = self.tmp / f"expected-{point_id}-{key.replace('/', '%2F')}.raw"
        if not p.exists():
            p.write_bytes(self.expected[point_id][key])
        return p

    def assert_point(self, point_id: str) -> None:
        for key in self.expected[point_id]:
            assert same_content(self.tgt.point_path(point_id, key), self.raw(point_id, key)), (point_id, key)

    def point_ids(self) -> list[str]:
        return [p.point_id for p in self.tgt.list_points()]


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


@pytest.fixture
def m(tmp_path: Path) -> Model:
    return Model(tmp_path)


def three_points(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, 4 * MiB)), (20 * MiB, pattern(2, MiB))]})
    m.sync("p2", {"disk0": [(1 * MiB, pattern(3, 64 * 1024)), (30 * MiB, pattern(4, 2 * MiB))]})
    m.sync("p3", {"disk0": [(2 * MiB, pattern(5, 3 * MiB)), (20 * MiB, bytes(MiB))]})


# ------------------------------------------------------------------------------------------- points


def test_points_are_listed_newest_first(m: Model) -> None:
    three_points(m)
    pts = m.tgt.list_points()
    assert [p.point_id for p in pts] == ["p3", "p2", "p1"]
    assert pts[0].committed_at >= pts[1].committed_at >= pts[2].committed_at
    assert m.tgt.get_point(None).point_id == "p3"
    assert m.tgt.get_point("p2").point_id == "p2"
    assert pts[0].disks[0].path == str(m.tgt.point_path("p3", "disk0"))
    for p in ("p1", "p2", "p3"):
        m.assert_point(p)


def test_commit_is_idempotent(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))]})
    again = m.tgt.commit("p1", m.point("p1", {"disk0": SIZE}))
    assert again == m.tgt.list_points()[0]
    assert m.point_ids() == ["p1"]


def test_an_existing_point_never_changes_after_later_syncs(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, 4 * MiB))]})
    f1 = m.tgt.point_path("p1", "disk0")
    before = (file_digest(f1), content_digest(f1, m.tmp))
    assert f1.stat().st_mode & 0o222 == 0  # read-only on disk
    m.sync("p2", {"disk0": [(0, pattern(9, 8 * MiB))]})
    m.sync("p3", {"disk0": [(1 * MiB, bytes(2 * MiB))]})
    m.tgt.prepare("s4", m.disks({"disk0": SIZE}))
    m.write("s4", "disk0", [(0, pattern(7, SIZE))])
    m.tgt.abort("s4")
    assert (file_digest(f1), content_digest(f1, m.tmp)) == before
    for p in ("p1", "p2", "p3"):
        m.assert_point(p)


def test_abort_leaves_points_untouched(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, 4 * MiB))]})
    f1 = m.tgt.point_path("p1", "disk0")
    digest = file_digest(f1)
    m.tgt.prepare("s2", m.disks({"disk0": SIZE}))
    with m.tgt.open_disk("s2", "disk0") as td, NbdConnection(td.uri, writable=True) as w:
        w.write(0, pattern(0xEE, 8 * MiB))
    m.tgt.abort("s2")
    assert not list((m.tmp / "replicas").rglob("*.pending.qcow2"))
    assert m.point_ids() == ["p1"]
    assert file_digest(f1) == digest
    m.assert_point("p1")
    with pytest.raises(ResourceNotFound, match="not prepared"):
        with m.tgt.open_disk("s2", "disk0"):
            pass
    m.tgt.abort("s2")  # idempotent
    m.current["disk0"][:] = m.expected["p1"]["disk0"]
    m.sync("p3", {"disk0": [(5 * MiB, pattern(3, MiB))]})  # builds on p1, none of s2's writes
    m.assert_point("p3")


def test_prepare_for_another_sync_discards_an_abandoned_one(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, 4 * MiB))]})
    m.tgt.prepare("s2", m.disks({"disk0": SIZE}))
    with m.tgt.open_disk("s2", "disk0") as td, NbdConnection(td.uri, writable=True) as w:
        w.write(0, pattern(0xEE, 8 * MiB))
    m.tgt.prepare("s3", m.disks({"disk0": SIZE}))
    names = sorted(f.name for f in (m.tmp / "replicas" / JOB / "disks" / "disk0").iterdir())
    assert names == ["p1.qcow2", "s3.pending.qcow2"]
    # s3 starts from p1, without any of s2's writes
    assert same_content(m.tgt.dir / "disks" / "disk0" / "s3.pending.qcow2", m.raw("p1", "disk0"))


def test_prepare_again_for_the_same_sync_starts_afresh(m: Model) -> None:
    """Issue 9 item 2: a retried begin takes a new snapshot under the same sync id. A full copy writes
    only the new snapshot's data ranges, so whatever the first attempt wrote must be gone: the
    point reads zeros where the new snapshot has zeros, not the first attempt's bytes."""
    m.tgt.prepare("s1", m.disks({"disk0": SIZE}))
    with m.tgt.open_disk("s1", "disk0") as td, NbdConnection(td.uri, writable=True) as w:
        w.write(0, pattern(0xEE, 8 * MiB))  # the first attempt's snapshot, since zeroed at the source
        w.flush()
    m.tgt.prepare("s1", m.disks({"disk0": SIZE}))  # the retry, with its new snapshot
    with m.tgt.open_disk("s1", "disk0") as td:
        assert not td.has_base
    m.write("s1", "disk0", [(16 * MiB, pattern(2, MiB))])  # the new snapshot's only data
    m.tgt.commit("s1", m.point("s1", {"disk0": SIZE}))
    m.expected["s1"] = {"disk0": bytes(m.current["disk0"])}
    m.assert_point("s1")

    # the same for an incremental: the retry starts again from the latest point
    m.tgt.prepare("s2", m.disks({"disk0": SIZE}))
    with m.tgt.open_disk("s2", "disk0") as td, NbdConnection(td.uri, writable=True) as w:
        w.write(4 * MiB, pattern(0xEE, MiB))
        w.flush()
    m.tgt.prepare("s2", m.disks({"disk0": SIZE}))
    m.write("s2", "disk0", [(20 * MiB, pattern(3, MiB))])
    m.tgt.commit("s2", m.point("s2", {"disk0": SIZE}))
    m.expected["s2"] = {"disk0": bytes(m.current["disk0"])}
    m.assert_point("s2")
    m.assert_point("s1")


# ---------------------------------------------------------------------------- interrupted commit


def interrupted_commit(m: Model, sync_id: str, keys: list[str]) -> None:
    """A commit that crashed after renaming the overlays of `keys` but before writing the manifest."""
    for key in keys:
        ddir = m.tgt.dir / "disks" / key
        os.replace(ddir / f"{sync_id}.pending.qcow2", ddir / f"{sync_id}.qcow2")


def test_an_interrupted_commit_is_finished_by_retrying_it(m: Model) -> None:
    sizes = {"disk0": SIZE, "disk1": 16 * MiB}
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))], "disk1": [(0, pattern(2, MiB))]}, sizes)
    m.tgt.prepare("p2", m.disks(sizes))
    m.write("p2", "disk0", [(4 * MiB, pattern(3, MiB))])
    m.write("p2", "disk1", [(8 * MiB, pattern(4, MiB))])
    interrupted_commit(m, "p2", ["disk0"])  # disk1 was not renamed yet
    assert m.point_ids() == ["p1"]  # no manifest, no point

    committed = m.tgt.commit("p2", m.point("p2", sizes))  # the retried commit finishes it
    m.expected["p2"] = {k: bytes(m.current[k]) for k in sizes}
    assert m.point_ids() == ["p2", "p1"]
    assert {d.key for d in committed.disks} == {"disk0", "disk1"}
    m.assert_point("p2")
    m.assert_point("p1")


def test_an_interrupted_commit_is_discarded_by_a_prepare_for_another_sync(m: Model) -> None:
    sizes = {"disk0": SIZE, "disk1": 16 * MiB}
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))], "disk1": [(0, pattern(2, MiB))]}, sizes)
    m.tgt.prepare("s2", m.disks(sizes))
    with m.tgt.open_disk("s2", "disk0") as td, NbdConnection(td.uri, writable=True) as w:
        w.write(4 * MiB, pattern(0xEE, MiB))
    interrupted_commit(m, "s2", ["disk0"])

    m.tgt.prepare("s3", m.disks(sizes))
    for key in sizes:
        names = sorted(f.name for f in (m.tgt.dir / "disks" / key).iterdir())
        assert names == ["p1.qcow2", "s3.pending.qcow2"], key
        pending = m.tgt.dir / "disks" / key / "s3.pending.qcow2"
        assert image_info(pending)["backing-filename"] == "p1.qcow2"
        assert same_content(pending, m.raw("p1", key))
    assert m.point_ids() == ["p1"]


# ------------------------------------------------------------------------------------------- prune


def test_prune_keeps_the_newest_points_with_identical_content(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, 4 * MiB)), (31 * MiB, pattern(2, MiB))]})
    grown = {"disk0": 48 * MiB}
    m.sync("p2", {"disk0": [(40 * MiB, pattern(3, 2 * MiB)), (MiB, pattern(4, 64 * 1024))]}, grown)
    m.sync("p3", {"disk0": [(2 * MiB, pattern(5, MiB)), (41 * MiB, bytes(MiB))]}, grown)
    m.sync("p4", {"disk0": [(47 * MiB, pattern(6, MiB))]}, grown)
    assert m.tgt.prune(10) == []

    assert m.tgt.prune(2) == ["p1", "p2"]
    assert m.point_ids() == ["p4", "p3"]
    m.assert_point("p3")
    m.assert_point("p4")
    assert sorted(f.name for f in (m.tgt.dir / "disks" / "disk0").iterdir()) == ["p3.qcow2", "p4.qcow2"]
    assert virtual_size(m.tgt.point_path("p3", "disk0")) == 48 * MiB

    assert m.tgt.prune(1) == ["p3"]
    assert m.point_ids() == ["p4"]
    m.assert_point("p4")
    assert "backing-filename" not in image_info(m.tgt.point_path("p4", "disk0"))


def test_prune_when_the_oldest_point_is_the_one_that_grew(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))]}, {"disk0": 16 * MiB})
    m.sync("p2", {"disk0": [(20 * MiB, pattern(2, MiB))]}, {"disk0": SIZE})
    m.sync("p3", {"disk0": [(30 * MiB, pattern(3, MiB))]}, {"disk0": SIZE})
    assert m.tgt.prune(1) == ["p1", "p2"]
    m.assert_point("p3")


def prune_interrupted_after_merge(m: Model) -> None:
    """prune(2) of p1..p3 that crashed after deleting p1's manifest and merging p2 into p1's file,
    before renaming that file to p2."""
    ddir = m.tgt.dir / "disks" / "disk0"
    (m.tgt.points_dir / "p1.json").unlink()
    run("qemu-img", "commit", "-q", "-f", "qcow2", "-d", ddir / "p2.qcow2")


def assert_pruned_to_p2_p3(m: Model) -> None:
    ddir = m.tgt.dir / "disks" / "disk0"
    assert "p1.qcow2" not in {f.name for f in ddir.iterdir()}
    assert "backing-filename" not in image_info(ddir / "p2.qcow2")
    assert image_info(ddir / "p3.qcow2")["backing-filename"] == "p2.qcow2"
    m.assert_point("p2")
    m.assert_point("p3")


def test_an_interrupted_prune_is_finished_by_the_next_prepare(m: Model) -> None:
    three_points(m)
    prune_interrupted_after_merge(m)
    assert m.point_ids() == ["p3", "p2"]
    m.tgt.prepare("s4", m.disks({"disk0": SIZE}))
    assert_pruned_to_p2_p3(m)


def test_an_interrupted_prune_is_finished_by_the_next_prune(m: Model) -> None:
    three_points(m)
    prune_interrupted_after_merge(m)
    assert m.tgt.prune(5) == []
    assert_pruned_to_p2_p3(m)


def test_a_prune_interrupted_before_the_merge_is_finished_too(m: Model) -> None:
    three_points(m)
    (m.tgt.points_dir / "p1.json").unlink()
    assert m.tgt.prune(5) == []
    assert_pruned_to_p2_p3(m)


# ------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize(
    ("fmt", "ext"), [("raw", "img"), ("qcow2", "qcow2"), ("vmdk", "vmdk"), ("vhdx", "vhdx")]
)
def test_export_formats_read_the_same_as_the_point(m: Model, fmt: str, ext: str) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, 4 * MiB))], "disk1": [(MiB, pattern(2, MiB))]})
    m.sync("p2", {"disk0": [(8 * MiB, pattern(3, MiB))]}, {"disk0": SIZE, "disk1": SIZE})
    out = m.tmp / "out"
    files = m.tgt.export("p2", fmt, out)
    assert [k for k, _ in files] == ["disk0", "disk1"]
    for key, path in files:
        assert path.name == f"{JOB}-p2-{key}.{ext}"
        assert image_info(path)["format"] == fmt
        assert same_content(path, m.tgt.point_path("p2", key))
        assert same_content(path, m.raw("p2", key))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for _, p in files)  # no .part left


def test_export_errors(m: Model) -> None:
    with pytest.raises(ResourceNotFound, match="no recovery point"):
        m.tgt.export("p1", "raw", m.tmp / "out")
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))]})
    with pytest.raises(InvalidSpec) as ei:
        m.tgt.export("p1", "vdi", m.tmp / "out")
    assert "vdi" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(ResourceNotFound) as ei2:
        m.tgt.export("p9", "raw", m.tmp / "out")
    assert "p9" in str(ei2.value)


# ------------------------------------------------------------------------------------ misc


def test_validate_and_destroy(m: Model, tmp_path: Path) -> None:
    m.tgt.validate()  # the directory does not exist yet: its parent is checked
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidSpec, match=r"^target\.path: .* is not a directory"):
        KvmTarget(JOB, blocker / "sub").validate()
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))]})
    other = KvmTarget("other", m.tgt.root)
    other.prepare("s1", [DiskInfo(key="disk0", size=SIZE)])
    m.tgt.destroy()
    assert not m.tgt.dir.exists()
    assert m.tgt.list_points() == []
    assert (m.tgt.root / "other" / "disks" / "disk0" / "s1.pending.qcow2").exists()


def test_a_point_boots_as_a_backing_file(m: Model) -> None:
    """Test failover puts an overlay on a point; writing the overlay leaves the point as it was."""
    three_points(m)
    overlay = m.tmp / "failover.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        m.tgt.point_path("p2", "disk0"),
        "-F",
        "qcow2",
        overlay,
    )
    qemu_io(overlay, "write -P 0x77 0 8M")
    m.assert_point("p2")
    m.assert_point("p3")


@pytest.mark.root
def test_prune_works_for_an_agent_that_is_not_root() -> None:
    """Points are made read-only on commit; a host agent running as an ordinary user must still be
    able to prune them (root ignores the mode bits, so this runs the target as `nobody`)."""
    work = Path(tempfile.mkdtemp(prefix="sendense-nonroot-"))
    try:
        os.chmod(work, 0o755)
        shutil.chown(work, "nobody")
        script = work / "run.py"
        script.write_text(
            "import sys\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})\n"
            "from datetime import UTC, datetime\n"
            "from pathlib import Path\n"
            "from connectors.kvm.target import KvmTarget\n"
            "from sendense.models import DiskInfo, PointDisk, PointInfo\n"
            f"t = KvmTarget('j', Path({str(work / 'replicas')!r}))\n"
            "for s in ('p1', 'p2', 'p3'):\n"
            "    t.prepare(s, [DiskInfo(key='disk0', size=16 << 20)])\n"
            "    now = datetime.now(UTC)\n"
            "    disks = [PointDisk(key='disk0', size=16 << 20, change_id='c')]\n"
            "    point = PointInfo(point_id=s, job='j', created_at=now, committed_at=now, kind='full',\n"
            "                      disks=disks)\n"
            "    t.commit(s, point)\n"
            "print(t.prune(1))\n"
        )
        p = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, (p.stderr.strip().splitlines() or ["?"])[-1]
        assert p.stdout.strip() == "['p1', 'p2']"
    finally:
        shutil.rmtree(work, ignore_errors=True)
