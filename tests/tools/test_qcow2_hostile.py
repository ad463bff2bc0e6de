"""Crafted qcow2 headers are refused in one line, before anything they ask for is allocated or read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_kvm import MiB, make_qcow2, run
from helpers_qcow2 import (
    CLUSTER,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    bitmaps_ext,
    ext,
    header,
    write_image,
)

from sendense.errors import InvalidSpec
from tools.qcow2 import BadImage, read_qcow2_header, sniff_format

HUGE = 0xFFFFFFF0


def hostile(tmp: Path, kind: str, *, big: bool = False) -> Path:
    """An image whose header lies in one way. `big`: the file is 6 GiB (sparse), so that a reader
    that trusts the lengths really reads gigabytes (a small file would only reserve them)."""
    p = tmp / f"{kind}.qcow2"
    if big:
        return write_image(p, hostile(tmp, kind).read_bytes()[: 4 * CLUSTER], file_size=6 << 30)
    if kind == "huge-backing-name":
        return write_image(p, header(backing_offset=512, backing_size=HUGE))
    if kind == "backing-name-past-eof":
        return write_image(p, header(backing_offset=CLUSTER - 8, backing_size=100), file_size=CLUSTER)
    if kind == "backing-name-past-first-cluster":
        return write_image(p, header(backing_offset=2 * CLUSTER, backing_size=100))
    if kind == "huge-extension":
        return write_image(p, header() + ext(0x1234, b"", length=HUGE))
    if kind == "huge-backing-format":
        return write_image(p, header() + ext(EXT_BACKING_FORMAT, b"q" * 64))
    if kind == "huge-data-file-name":
        return write_image(p, header() + ext(EXT_DATA_FILE, b"/" + b"d" * 4999))
    if kind == "huge-bitmap-directory":
        return write_image(p, header(autoclear=1) + bitmaps_ext(1, 1 << 40, CLUSTER))
    if kind == "bitmap-directory-past-eof":
        return write_image(p, header(autoclear=1) + bitmaps_ext(1, 4096, 1 << 50))
    if kind == "too-many-bitmaps":
        return write_image(p, header(autoclear=1) + bitmaps_ext(0xFFFFFFFF, 4096, CLUSTER))
    if kind == "bitmap-count-beyond-directory":
        return write_image(p, header(autoclear=1) + bitmaps_ext(60000, 4096, CLUSTER))
    if kind == "huge-bitmap-table":
        entry = bytes(8) + b"\xff\xff\xff\xff" + bytes(4) + b"\x01\x10\x00\x01" + bytes(4) + b"b"
        return write_image(p, header(autoclear=1) + bitmaps_ext(1, 32, CLUSTER), at={CLUSTER: entry})
    if kind == "huge-header-length":
        return write_image(p, header(header_length=HUGE))
    if kind == "huge-cluster-bits":
        return write_image(p, header(cluster_bits=40))
    if kind == "truncated":
        return write_image(p, header()[:80], file_size=80)
    raise AssertionError(kind)


KINDS = {
    "huge-backing-name": f"backing file name of {HUGE} bytes (max 1023)",
    "backing-name-past-eof": "backing file name at 65528 is outside the header cluster",
    "backing-name-past-first-cluster": "backing file name at 131072 is outside the header cluster",
    "huge-extension": f"extension 0x1234 of {HUGE} bytes runs past the header",
    "huge-backing-format": "backing format of 64 bytes (max 15)",
    "huge-data-file-name": "data file name of 5000 bytes (max 4095)",
    "huge-bitmap-directory": f"bitmap directory of {1 << 40} bytes (max 67107840)",
    "bitmap-directory-past-eof": f"bitmap directory at {1 << 50} (4096 bytes) is outside the file",
    "too-many-bitmaps": "4294967295 bitmaps (from 1 to 65535)",
    "bitmap-count-beyond-directory": "bitmap directory of 4096 bytes holds fewer than 60000 entries",
    "huge-bitmap-table": "bitmap entry 0: table of 4294967295 entries at 0 is invalid",
    "huge-header-length": f"header length of {HUGE} bytes",
    "huge-cluster-bits": "cluster_bits of 40 (from 9 to 21)",
    "truncated": "truncated: 80 bytes of a 104-byte version 3 header",
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_hostile_header_is_refused_in_one_line_naming_the_image_and_the_field(
    tmp_path: Path, kind: str
) -> None:
    img = hostile(tmp_path, kind)
    with pytest.raises(BadImage) as ei:
        read_qcow2_header(img)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{img}: qcow2 header: {KINDS[kind]}"), msg
    assert isinstance(ei.value, InvalidSpec)  # the user's image is at fault: not retried


_PEAK = """
import json, resource, sys
from pathlib import Path
from tools.qemu import read_qcow2_header
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_qcow2_header(Path(sys.argv[1]))
    outcome = "read"
except Exception as e:
    outcome = type(e).__name__
print(json.dumps({"before_kib": before, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "outcome": outcome}))
"""


def peak_rss(img: Path) -> dict[str, object]:
    """The peak RSS of a fresh interpreter that reads the header (what a worker would pay)."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(img)], capture_output=True, text=True, check=True, timeout=600
    )
    return dict(json.loads(out.stdout))


@pytest.mark.parametrize("kind", ["huge-backing-name", "huge-extension", "huge-bitmap-directory"])
def test_reading_a_hostile_header_allocates_nothing_it_asks_for(tmp_path: Path, kind: str) -> None:
    """These used to drive a worker to gigabytes (a read of the length the header gave)."""
    r = peak_rss(hostile(tmp_path, kind, big=True))
    assert r["outcome"] == "BadImage"
    grew = int(str(r["peak_kib"])) - int(str(r["before_kib"]))
    assert grew < 200 * 1024, r  # KiB


def test_extensions_are_read_only_within_the_first_cluster(tmp_path: Path) -> None:
    """A chain of empty extensions filling the file: the walk ends at the first cluster, as QEMU's."""
    many = b"".join(ext(0x1234, b"") for _ in range(4 * CLUSTER // 8))
    img = write_image(tmp_path / "many.qcow2", header() + many, file_size=8 * CLUSTER)
    assert read_qcow2_header(img).data_file is None


def test_stale_bitmaps_extension_is_ignored_as_qemu_does(tmp_path: Path) -> None:
    """Autoclear bit 0 clear: QEMU ignores the extension (a stale one), whatever it holds."""
    img = write_image(tmp_path / "stale.qcow2", header(autoclear=0) + bitmaps_ext(1, 1 << 40, CLUSTER))
    assert read_qcow2_header(img).bitmaps == {}


def test_backing_format_and_data_file_are_read(tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2", 16 * MiB)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    h = read_qcow2_header(top)
    assert (h.backing, h.backing_format, h.data_file, h.has_data_file) == ("base.qcow2", "qcow2", None, False)
    ext_img = tmp_path / "ext.qcow2"
    data = tmp_path / "ext.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", ext_img, 16 * MiB)
    h = read_qcow2_header(ext_img)
    assert (h.data_file, h.has_data_file) == (str(data), True)


def test_backing_name_is_a_c_string(tmp_path: Path) -> None:
    """QEMU stops at the first NUL: the name checked is the name QEMU would open."""
    name = b"base.raw\0/etc/shadow"
    img = write_image(
        tmp_path / "nul.qcow2", header(backing_offset=512, backing_size=len(name)), at={512: name}
    )
    assert read_qcow2_header(img).backing == "base.raw"


def test_formats_are_sniffed_without_qemu(tmp_path: Path) -> None:
    for fmt in ("raw", "qcow2", "vmdk", "vpc", "vdi", "vhdx", "qed"):
        img = tmp_path / f"x.{fmt}"
        run("qemu-img", "create", "-q", "-f", fmt, img, 4 * MiB)
        assert sniff_format(img) == fmt
    desc = tmp_path / "desc.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nRW 8 FLAT "/etc/shadow" 0\n')
    assert sniff_format(desc) == "vmdk"
