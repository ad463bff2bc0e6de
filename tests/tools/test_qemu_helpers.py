"""qcow2 headers read in-process match `qemu-img info`; the helpers around qemu processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers_kvm import MiB, image_info, make_qcow2, run

from sendense.errors import SendenseError
from tools.qemu import is_qcow2, qcow2_backing_name, qcow2_bitmaps, read_qcow2_header


def _assert_matches_qemu_img(path: Path) -> None:
    info = image_info(path)
    h = read_qcow2_header(path)
    assert h.size == info["virtual-size"]
    assert h.backing == info.get("backing-filename")
    assert h.bitmaps == qcow2_bitmaps(info)


def test_bitmaps_of_every_name_length_and_state(tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "a.qcow2", 48 * MiB + 512)
    names = ["a", "sendense.job-1.20261124T101010Z-0001", "x" * 255, "ünïcode", "disabled"]
    for n in names[:-1]:
        run("qemu-img", "bitmap", "--add", "--enable", img, n)
    run("qemu-img", "bitmap", "--add", "--disable", img, "disabled")
    run("qemu-img", "bitmap", "--add", "--enable", "-g", "1M", img, "coarse")
    h = read_qcow2_header(img)
    assert set(h.bitmaps) == {*names, "coarse"}
    assert h.bitmaps["disabled"] == [] and h.bitmaps["a"] == ["auto"]
    _assert_matches_qemu_img(img)
    run("qemu-img", "bitmap", "--remove", img, "a")
    assert "a" not in read_qcow2_header(img).bitmaps
    _assert_matches_qemu_img(img)


def test_overlay_and_no_bitmaps(tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2", 16 * MiB)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    h = read_qcow2_header(tmp_path / "top.qcow2")
    assert h.backing == "base.qcow2" and h.bitmaps == {} and h.size == 16 * MiB
    assert qcow2_backing_name(tmp_path / "top.qcow2") == "base.qcow2"
    assert qcow2_backing_name(base) is None
    _assert_matches_qemu_img(tmp_path / "top.qcow2")


def test_version_2_image(tmp_path: Path) -> None:
    img = tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", img, 8 * MiB)
    assert read_qcow2_header(img).bitmaps == {}
    _assert_matches_qemu_img(img)


def test_bitmap_left_in_use_by_a_killed_writer(tmp_path: Path) -> None:
    """QEMU marks a loaded bitmap in-use on disk; a writer killed before it closes the image leaves it so."""
    img = make_qcow2(tmp_path / "a.qcow2", 16 * MiB, bitmaps=("b",))
    sock, pid = tmp_path / "s", tmp_path / "pid"
    p = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock, "--pid-file", pid, img])
    try:
        deadline = time.monotonic() + 10
        while not pid.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid.exists(), "qemu-nbd did not start"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert read_qcow2_header(img).bitmaps == {"b": ["in-use", "auto"]}
    _assert_matches_qemu_img(img)


def test_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    assert not is_qcow2(raw)
    with pytest.raises(SendenseError, match="not a qcow2 image"):
        read_qcow2_header(raw)


def test_wait_exit_times_out_then_reaps() -> None:
    from tools.qemu import wait_exit

    p = subprocess.Popen(["sleep", "30"])
    try:
        assert wait_exit(p, 0.05) is False and p.poll() is None
        p.terminate()
        assert wait_exit(p, 10) is True
        assert p.returncode == -signal.SIGTERM
        assert wait_exit(p, 0.05) is True  # already reaped: no pidfd, Popen knows
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
