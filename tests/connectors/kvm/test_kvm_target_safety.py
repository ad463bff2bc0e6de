"""KvmTarget against what a demanding user did to it (issue 9): shrink then prune, points in use,
exports during prunes, job directories shared through symlinks or nesting, jobs re-created under a
deleted job's name, purges that cannot delete everything, export failures, a full target."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_kvm import MiB, file_digest, run, virtual_size
from test_kvm_target import JOB, SIZE, Model, pattern

from connectors.kvm.jobdir import MARKER
from connectors.kvm.target import KvmTarget
from sendense.errors import InvalidSpec, ResourceNotFound, TargetError
from sendense.models import DiskInfo


@pytest.fixture
def m(tmp_path: Path) -> Model:
    return Model(tmp_path)


def export_raw(tgt: KvmTarget, point_id: str, out: Path) -> bytes:
    [(_, path)] = tgt.export(point_id, "raw", out)
    data = path.read_bytes()
    path.unlink()
    return data


# ------------------------------------------------------------------------------ shrink and prune


def test_shrink_then_prune_keeps_the_shrunk_size(m: Model) -> None:
    """Item 3: an 8 MiB disk shrunk to 4 MiB, retention 1: the surviving point is 4 MiB."""
    m.sync("p1", {"disk0": [(0, pattern(1, 8 * MiB))]}, {"disk0": 8 * MiB})
    m.current["disk0"] = m.current["disk0"][: 4 * MiB]
    m.sync("p2", {"disk0": [(MiB, pattern(2, MiB))]}, {"disk0": 4 * MiB})
    assert m.tgt.prune(1) == ["p1"]
    assert virtual_size(m.tgt.point_path("p2", "disk0")) == 4 * MiB
    m.assert_point("p2")
    assert export_raw(m.tgt, "p2", m.tmp / "out") == m.expected["p2"]["disk0"]


def test_shrink_grow_then_prune_reads_zeros_in_the_regrown_area(m: Model) -> None:
    """Item 3: shrink, grow back, prune: what lies beyond the shrunk size reads zeros, never the
    bytes the disk had before it shrank."""
    m.sync("p1", {"disk0": [(0, pattern(1, 8 * MiB))]}, {"disk0": 8 * MiB})
    m.current["disk0"] = m.current["disk0"][: 4 * MiB]
    m.sync("p2", {"disk0": []}, {"disk0": 4 * MiB})
    m.sync("p3", {"disk0": [(7 * MiB, pattern(3, 64 << 10))]}, {"disk0": 8 * MiB})
    assert m.expected["p3"]["disk0"][5 * MiB : 5 * MiB + 4] == bytes(4)
    m.assert_point("p3")
    assert m.tgt.prune(1) == ["p1", "p2"]
    m.assert_point("p3")
    assert export_raw(m.tgt, "p3", m.tmp / "out") == m.expected["p3"]["disk0"]


def test_prune_of_a_middle_point_after_a_shrink(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, 8 * MiB))]}, {"disk0": 8 * MiB})
    m.sync("p2", {"disk0": [(6 * MiB, pattern(2, MiB))]}, {"disk0": 8 * MiB})
    m.current["disk0"] = m.current["disk0"][: 4 * MiB]
    m.sync("p3", {"disk0": []}, {"disk0": 4 * MiB})
    m.sync("p4", {"disk0": [(6 * MiB, pattern(4, 4096))]}, {"disk0": 8 * MiB})
    assert m.tgt.prune(2) == ["p1", "p2"]
    for p in ("p3", "p4"):
        m.assert_point(p)


# ------------------------------------------------------------------------------- points in use


def test_a_point_in_use_by_a_vm_is_kept_and_nothing_vanishes(m: Model) -> None:
    """Item 11: a VM booted on the oldest point (an overlay backed by it, held open) makes prune keep
    that point, listed and intact; later syncs keep working; once the VM is gone, prune removes it."""
    m.sync("p1", {"disk0": [(0, pattern(1, 4 * MiB))]})
    m.sync("p2", {"disk0": [(MiB, pattern(2, MiB))]})
    overlay = m.tmp / "vm.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        m.tgt.point_path("p1", "disk0"),
        "-F",
        "qcow2",
        overlay,
    )
    vm = subprocess.Popen(
        ["qemu-nbd", "-k", str(m.tmp / "vm.sock"), "--pid-file", str(m.tmp / "vm.pid"), overlay]
    )
    try:
        deadline = time.monotonic() + 10
        while not (m.tmp / "vm.pid").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert m.tgt.prune(1) == []
        assert m.point_ids() == ["p2", "p1"]
        m.sync("p3", {"disk0": [(2 * MiB, pattern(3, MiB))]})
        assert m.tgt.prune(1) == ["p2"]  # p2 is not in use: merged into p3
        assert m.point_ids() == ["p3", "p1"]
        for p in ("p1", "p3"):
            m.assert_point(p)
    finally:
        vm.send_signal(signal.SIGTERM)
        vm.wait(10)
    assert m.tgt.prune(1) == ["p1"]
    assert m.point_ids() == ["p3"]
    m.assert_point("p3")


# ----------------------------------------------------------------------------- export vs prune


def test_an_export_holds_pruning_off_and_an_export_after_a_prune_says_so(m: Model) -> None:
    """Item 5: an export reads exactly its point while a prune is asked for; a prune that ran first
    makes the export of the pruned point fail in one line, never half one point, half the next."""
    sizes = {"disk0": 48 * MiB}
    m.sync("p1", {"disk0": [(0, pattern(1, 24 * MiB)), (24 * MiB, pattern(1, 24 * MiB))]}, sizes)
    m.sync("p2", {"disk0": [(0, pattern(2, 24 * MiB))]}, sizes)
    out = m.tmp / "out"
    result: dict[str, object] = {}

    def export() -> None:
        try:
            result["data"] = export_raw(m.tgt, "p1", out)
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    started = threading.Event()
    orig = m.tgt._points_read

    def slow_read(*, wait: bool):  # type: ignore[no-untyped-def]
        cm = orig(wait=wait)

        class Slow:
            def __enter__(self) -> bool:
                ok = cm.__enter__()
                if wait:
                    started.set()
                    time.sleep(1.0)  # the export is reading while the prune below is asked for
                return ok

            def __exit__(self, *exc: object) -> None:
                cm.__exit__(*exc)

        return Slow()

    m.tgt._points_read = slow_read  # type: ignore[method-assign]
    t = threading.Thread(target=export)
    t.start()
    assert started.wait(10)
    assert m.tgt.prune(1) == []  # an export is reading: pruning waits for a later commit
    t.join(30)
    assert result.get("data") == m.expected["p1"]["disk0"]
    m.tgt._points_read = orig  # type: ignore[method-assign]
    assert m.tgt.prune(1) == ["p1"]
    with pytest.raises(ResourceNotFound, match="no recovery point p1"):
        m.tgt.export("p1", "raw", out)
    assert not list(out.iterdir())


# -------------------------------------------------------------------------- job directories


def test_a_symlinked_job_directory_is_refused(tmp_path: Path) -> None:
    """Item 8: job B's directory is a symlink to job A's: refused, A's points untouched."""
    a = Model(tmp_path)
    a.sync("p1", {"disk0": [(0, pattern(1, MiB))]})
    other_root = tmp_path / "other"
    other_root.mkdir()
    (other_root / JOB).symlink_to(a.tgt.dir)
    b = KvmTarget(JOB, other_root, job_id="b")
    with pytest.raises(InvalidSpec, match="is a symlink"):
        b.validate()
    with pytest.raises(TargetError, match="is a symlink"):
        b.prepare("s1", [DiskInfo(key="disk0", size=SIZE)])
    with pytest.raises(TargetError, match="nothing deleted"):
        b.destroy()
    a.assert_point("p1")
    assert a.point_ids() == ["p1"]


def test_a_job_directory_inside_another_jobs_is_refused(tmp_path: Path) -> None:
    """Item 8: a target path nested inside another job's directory (directly or through a symlinked
    target path) is refused, and the outer job's purge never deletes the inner job's files."""
    a = Model(tmp_path)
    a.sync("p1", {"disk0": [(0, pattern(1, MiB))]})
    nested = KvmTarget("inner", a.tgt.dir / "disks", job_id="x")
    with pytest.raises(InvalidSpec, match=f"inside the directory of job {JOB}"):
        nested.validate()
    link = tmp_path / "link"
    link.symlink_to(a.tgt.dir)
    with pytest.raises(InvalidSpec, match=f"inside the directory of job {JOB}"):
        KvmTarget("inner", link, job_id="x").validate()
    with pytest.raises(TargetError, match="inside the directory"):
        nested.prepare("s1", [DiskInfo(key="disk0", size=SIZE)])
    a.assert_point("p1")


def test_an_existing_directory_is_never_adopted(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "web").mkdir(parents=True)
    (root / "web" / "precious.txt").write_text("mine")
    tgt = KvmTarget("web", root, job_id="abc")
    with pytest.raises(InvalidSpec, match="not a sendense job directory"):
        tgt.validate()
    with pytest.raises(TargetError, match="nothing deleted"):
        tgt.destroy()
    assert (root / "web" / "precious.txt").read_text() == "mine"


def test_a_job_recreated_under_a_deleted_jobs_name_is_refused(tmp_path: Path) -> None:
    """Item 10: job web01 deleted without --purge keeps its points; a new job web01 (another id)
    is refused at create, naming the directory, and cannot prune or purge the old job's points."""
    old = KvmTarget(JOB, tmp_path / "replicas", job_id="old")
    m = Model(tmp_path)
    m.tgt = old
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))]})
    m.sync("p2", {"disk0": [(0, pattern(2, MiB))]})
    new = KvmTarget(JOB, tmp_path / "replicas", job_id="new")
    with pytest.raises(
        InvalidSpec, match="recovery points of an earlier job named j .*kept when it was deleted"
    ):
        new.validate()
    with pytest.raises(TargetError):
        new.prune(1)
    with pytest.raises(TargetError):
        new.destroy()
    assert [p.point_id for p in old.list_points()] == ["p2", "p1"]
    m.assert_point("p1")


def test_a_legacy_directory_is_adopted_only_by_a_legacy_job(tmp_path: Path) -> None:
    """Directories from before markers: a job with no id (created before ids) keeps using its own;
    a new job of that name (with an id) is refused."""
    m = Model(tmp_path)  # job_id ''
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))]})
    (m.tgt.dir / MARKER).unlink()
    with pytest.raises(InvalidSpec, match="earlier job"):
        KvmTarget(JOB, m.tgt.root, job_id="new").validate()
    m.tgt.validate()
    m.sync("p2", {"disk0": [(0, pattern(2, MiB))]})
    assert (m.tgt.dir / MARKER).exists()
    m.assert_point("p1")


def test_purge_deletes_replicas_and_names_what_it_kept(m: Model) -> None:
    m.sync("p1", {"disk0": [(0, pattern(1, MiB))]})
    (m.tgt.dir / "notes.txt").write_text("operator's")
    with pytest.raises(TargetError) as ei:
        m.tgt.destroy()
    msg = str(ei.value)
    assert "\n" not in msg and "notes.txt" in msg and str(m.tgt.dir) in msg
    assert m.tgt.list_points() == []
    assert not (m.tgt.dir / "disks").exists()
    assert (m.tgt.dir / "notes.txt").read_text() == "operator's"
    (m.tgt.dir / "notes.txt").unlink()
    m.tgt.destroy()
    assert not m.tgt.dir.exists()


# ------------------------------------------------------------------------------ export errors


def test_a_failed_export_leaves_no_part_file_and_says_where(m: Model) -> None:
    """Item 18: the output directory fills up: a one-line error naming the output file, no .part."""
    m.sync("p1", {"disk0": [(0, os.urandom(8 * MiB))]})
    small = m.tmp / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(TargetError) as ei:
            m.tgt.export("p1", "raw", small)
        msg = str(ei.value)
        assert "\n" not in msg and str(small) in msg and "p1" in msg
        assert "qemu-img convert: qemu-img" not in msg
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_full_target_names_the_target_path(m: Model) -> None:
    """Item 19: a full target is named as the user gave it, never as an internal socket."""
    small = m.tmp / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)], check=True)
    try:
        tgt = KvmTarget(JOB, small)
        tgt.prepare("s1", [DiskInfo(key="disk0", size=SIZE)])
        with tgt.open_disk("s1", "disk0") as td, td.connect() as w:
            with pytest.raises(Exception) as ei:
                for off in range(0, SIZE, MiB):
                    w.write(off, os.urandom(MiB))
                w.flush()
        msg = str(ei.value)
        assert f"target {small} (job {JOB}, disk disk0) is full" in msg, msg
        assert "socket" not in msg and "nbd" not in msg
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_disk_keys_that_differ_only_in_unsafe_characters_get_replicas_of_their_own(m: Model) -> None:
    """Two disk keys must never share a replica file because their file names look alike."""
    sizes = {"a/b": 4 * MiB, "a_b": 4 * MiB, "#block113": 4 * MiB, "_block113": 4 * MiB}
    writes = {k: [(0, pattern(i + 1, MiB))] for i, k in enumerate(sizes)}
    m.sync("p1", writes, sizes)
    files = {m.tgt.point_path("p1", k) for k in sizes}
    assert len(files) == 4
    m.assert_point("p1")
    exported = m.tgt.export("p1", "raw", m.tmp / "out")
    assert len({p for _, p in exported}) == 4
    for key, path in exported:
        assert path.read_bytes() == m.expected["p1"][key]


# -------------------------------------------------------------------------------------- holds


def test_a_held_point_survives_any_retention_and_its_files_never_change(m: Model) -> None:
    """A drill's VM runs on p2: prune(1) keeps p2 and p1 (p2's backing: merging p1 would rewrite p2's
    file) but prunes p3 into p4; purge is refused while held; once released, retention applies."""
    for n in range(1, 5):
        m.sync(f"p{n}", {"disk0": [(n * MiB, pattern(n, MiB))]})
    m.tgt.hold("p2", "drill-1", "drill")
    m.tgt.hold("p2", "drill-1", "drill")  # a retried saga step: one hold
    p2 = m.tgt.point_path("p2", "disk0")
    before = (p2.stat().st_ino, file_digest(p2))
    assert m.tgt.prune(1) == ["p3"]
    assert m.point_ids() == ["p4", "p2", "p1"]
    assert [p.holds for p in m.tgt.list_points()] == [[], ["drill-1"], []]
    assert (p2.stat().st_ino, file_digest(p2)) == before
    for p in ("p1", "p2", "p4"):
        m.assert_point(p)
    with pytest.raises(TargetError, match=r"nothing deleted: points are held: p2 \(drill-1\)"):
        m.tgt.destroy()
    m.tgt.release("p2", "drill-1")
    m.tgt.release("p2", "drill-1")  # idempotent
    assert m.tgt.prune(1) == ["p1", "p2"]
    m.assert_point("p4")
    with pytest.raises(ResourceNotFound):
        m.tgt.hold("p1", "drill-2", "drill")
    with pytest.raises(InvalidSpec):
        m.tgt.hold("p4", "../x", "drill")
    m.tgt.destroy()
    assert not m.tgt.dir.exists()


# ------------------------------------------------------------------------ privacy (issue 11 item 2)


@pytest.fixture
def open_model() -> Iterator[Model]:
    """A Model in a directory any user can reach (/tmp, 0755): only the product's modes protect it."""
    d = Path(tempfile.mkdtemp(prefix="sd-priv-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield Model(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.root
def test_replicas_points_and_exports_are_private_whatever_the_umask(open_model: Model) -> None:
    """Replicas are the VM's data: the job directory is 0700, pending replicas 0600, points 0400 and
    exports 0600, set explicitly even under a permissive umask; another user reads none of them."""
    m = open_model
    old = os.umask(0)  # the most permissive umask: nothing may be left to it
    try:
        m.sync("p1", {"disk0": [(0, pattern(1, MiB))]}, {"disk0": 2 * MiB})
        m.tgt.prepare("p2", m.disks({"disk0": 2 * MiB}))
        [(_, exported)] = m.tgt.export("p1", "raw", m.tmp / "out")
    finally:
        os.umask(old)
    mode = lambda p: oct(os.stat(p).st_mode & 0o777)  # noqa: E731
    point = m.tgt.point_path("p1", "disk0")
    pending = [f for f in point.parent.iterdir() if f.name.startswith("p2")]
    assert pending, sorted(point.parent.iterdir())
    assert mode(m.tgt.dir) == "0o700"
    assert mode(point) == "0o400"
    assert [mode(f) for f in pending] == ["0o600"]
    assert mode(exported) == "0o600"
    for f in (point, exported):
        p = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat", str(f)],
            capture_output=True,
        )
        assert p.returncode != 0 and b"Permission denied" in p.stderr, (f, p.stderr)
    m.tgt.abort("p2")
