"""The spliced data path (datapath.wire) against real qemu-nbd exports: handover from libnbd, the
same bytes and stats as the buffered path, zero detection, and the failures a copy meets (a full
target, a source that dies)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_kvm import KiB, MiB, allocation_map, make_qcow2, qemu_io, same_content, to_raw

from sendense.datapath import copy as copy_mod
from sendense.datapath.copy import CopyPlan, run_copy
from sendense.datapath.extents import Extent
from sendense.datapath.nbd import ALLOCATION, NbdConnection
from sendense.datapath.throttle import Throttle
from sendense.datapath.wire import Splicer
from sendense.errors import DataPathError
from tools.qemu import qemu_nbd

SIZE = 16 * MiB
CHUNK = 1 * MiB


class CountingSplicer(Splicer):
    copies = 0

    def copy(self, offset: int, length: int):  # type: ignore[no-untyped-def]
        type(self).copies += 1
        return super().copy(offset, length)


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> type[CountingSplicer]:
    """Counts the chunks that went through a Splicer (the copy engine looks the class up at run time)."""
    CountingSplicer.copies = 0
    monkeypatch.setattr(copy_mod, "Splicer", CountingSplicer)
    return CountingSplicer


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[Path, str, bytes]]:
    img = make_qcow2(tmp_path / "src.qcow2", SIZE)
    qemu_io(
        img,
        "write -P 0x11 0 3M",
        "write -P 0 4M 1M",  # a whole chunk of zeroes, allocated on the source
        "write -P 0 6M 1M",
        "write -P 0x5a 6148k 1020k",  # a chunk whose first 4 KiB are zero and the rest is data
        "write -P 0x77 9M 2M",
        "write -P 0x22 15M 1M",
    )
    raw = to_raw(img, tmp_path / "src.raw").read_bytes()
    with qemu_nbd(img, readonly=True) as srv:
        yield img, srv.uri, raw


def data_extents(uri: str) -> list[Extent]:
    with NbdConnection(uri, contexts=(ALLOCATION,)) as c:
        return [e for e in c.changed_extents(None) if not e.zero]


def plan(src: str, dst: str, **kw: object) -> CopyPlan:
    return CopyPlan(
        extents=data_extents(src),
        open_reader=lambda: NbdConnection(src),
        open_writer=lambda: NbdConnection(dst, writable=True),
        **{"chunk_size": CHUNK, "connections": 3, **kw},  # type: ignore[arg-type]
    )


def test_data_connections_hand_over_their_socket_and_take_it_back(source, tmp_path) -> None:
    _, uri, _ = source
    with NbdConnection(uri, contexts=(ALLOCATION,)) as c:
        assert c.wire() is None  # block status needs structured replies: never spliced
    tgt = make_qcow2(tmp_path / "t.qcow2", SIZE)
    with qemu_nbd(tgt, readonly=False) as dst:
        c = NbdConnection(dst.uri, writable=True)
        w = c.wire()
        assert w is not None
        w.write(9 * MiB, b"\x5a" * 64 * KiB)
        w.zero(9 * MiB, 4 * KiB)
        w.release()
        assert c.read(9 * MiB, 64 * KiB) == bytes(4 * KiB) + b"\x5a" * 60 * KiB  # libnbd carries on
        c.close()


def test_spliced_and_buffered_copies_agree_byte_for_byte_and_in_stats(source, tmp_path, spliced) -> None:
    img, uri, _ = source
    results = {}
    for mode in ("splice", "buffered"):
        tgt = make_qcow2(tmp_path / f"{mode}.qcow2", SIZE)
        with qemu_nbd(tgt, readonly=False) as dst:
            stats, watermark = run_copy(plan(uri, dst.uri, splice=(mode == "splice")))
        assert same_content(img, tgt), mode
        results[mode] = (stats.bytes_read, stats.bytes_written, stats.bytes_zeroed, stats.extents, watermark)
        if mode == "splice":
            assert spliced.copies == stats.extents > 0  # every data chunk went through the splicer
            spliced.copies = 0
    assert spliced.copies == 0  # splice=False never splices
    assert results["splice"] == results["buffered"]
    read, written, zeroed, _, _ = results["splice"]
    assert zeroed == 1 * MiB  # the all-zero chunk at 4M, detected without being sent
    assert written == read - zeroed  # the chunk at 6M starts with zeroes but is data: sent whole


def test_all_zero_chunks_become_zero_clusters_and_the_rest_stays_data(source, tmp_path) -> None:
    img, uri, _ = source
    tgt = make_qcow2(tmp_path / "t.qcow2", SIZE)
    with qemu_nbd(tgt, readonly=False) as dst:
        run_copy(plan(uri, dst.uri))
    assert same_content(img, tgt)
    m = allocation_map(tgt)
    at = {e["start"]: e for e in m}
    zero_chunk = [e for e in m if e["start"] < 5 * MiB and e["start"] + e["length"] > 4 * MiB]
    assert all(not e["data"] for e in zero_chunk), zero_chunk
    assert any(e["data"] for e in m if e["start"] <= 6 * MiB < e["start"] + e["length"]), at


@pytest.mark.root
def test_a_full_target_fails_once_with_a_clear_error_that_is_not_retried(source, tmp_path) -> None:
    """The target's filesystem fills up mid-copy: a one-line 'is full' error, marked non-retryable
    (retrying cannot help), and every copy thread stops."""
    _, uri, _ = source
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        for splice in (True, False):
            tgt = make_qcow2(small / "t.qcow2", SIZE)
            with qemu_nbd(tgt, readonly=False) as dst:
                before = {t for t in threading.enumerate() if t.name == "copy-worker"}
                with pytest.raises(DataPathError, match="is full") as e:
                    run_copy(plan(uri, dst.uri, splice=splice))
                assert e.value.retryable is False
                assert "\n" not in str(e.value)
                assert [t for t in threading.enumerate() if t.name == "copy-worker" and t not in before] == []
            tgt.unlink()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_source_that_dies_mid_copy_fails_retryably_and_promptly(tmp_path) -> None:
    img = make_qcow2(tmp_path / "src.qcow2", SIZE)
    qemu_io(img, f"write -P 0x33 0 {SIZE}")
    tgt = make_qcow2(tmp_path / "t.qcow2", SIZE)
    with qemu_nbd(img, readonly=True) as src, qemu_nbd(tgt, readonly=False) as dst:
        p = plan(src.uri, dst.uri, throttle=Throttle(8 * MiB, burst=CHUNK))  # about 2 s in all
        threading.Timer(0.5, src.proc.kill).start()
        t0 = time.monotonic()
        with pytest.raises(DataPathError) as e:
            run_copy(p)
        assert e.value.retryable is True
        assert time.monotonic() - t0 < 5
