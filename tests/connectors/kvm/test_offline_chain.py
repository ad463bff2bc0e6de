"""A stopped VM's images name other files (backing chains, external data files): they are followed
only inside the agent's allowed source roots, as plain files with explicit formats; everything else
is refused in one line naming the disk field, before QEMU opens anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from helpers_kvm import MiB, make_qcow2, qemu_io, run, same_content, sync_point, to_raw
from helpers_qcow2 import header, write_image

from connectors.kvm.offline import OfflineQcow2Source
from connectors.kvm.target import KvmTarget
from sendense.errors import InvalidSpec, NotAllowed, SendenseError

JOB = "j"


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The agent's policy allows sources under `<tmp>/roots` only; `<tmp>/host` stands for the rest
    of the host (replicas go anywhere under <tmp>)."""
    root = tmp_path / "roots"
    root.mkdir()
    (tmp_path / "host").mkdir()
    policy = tmp_path / "policy.yaml"
    doc = {"platforms": ["kvm"], "source_roots": [str(root)], "target_roots": [str(tmp_path)]}
    policy.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("SENDENSE_POLICY", str(policy))
    return root


def outside(what: str, path: Path, root: Path) -> str:
    return f"{what} {path} is outside this agent's source roots ({root})"


def secret(tmp: Path) -> Path:
    """A host file the job's owner may not read (root-only on a real host)."""
    s = tmp / "host" / "shadow"
    s.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n" * 1000)
    s.chmod(0o600)
    return s


def overlay(path: Path, backing: str, fmt: str | None, size: int | None = None) -> Path:
    """qcow2 `path` backed by `backing` as written (no check, no open: -u), with format `fmt`; without
    one, a hand-made header (qemu-img no longer makes such images, older ones did)."""
    if fmt is None:
        name = backing.encode()
        head = header(backing_offset=512, backing_size=len(name), size=size or MiB)
        return write_image(path, head, at={512: name})
    args: list[object] = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing]
    if fmt:
        args += ["-F", fmt]
    run(*args, path, *([size] if size else [1 * MiB]))
    return path


def refusal(img: Path) -> str:
    with pytest.raises(SendenseError) as ei:
        OfflineQcow2Source(JOB, [make_qcow2(img.parent / "ok.qcow2", MiB), img]).validate()
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"source.disks[1]: {img}"), msg
    return msg


def full_sync(tmp: Path, img: Path) -> Path:
    tgt = KvmTarget(JOB, tmp / "replicas")
    sync_point(OfflineQcow2Source(JOB, [img]), tgt, "p1")
    return tgt.point_path("p1", "disk0")


def test_a_backing_file_outside_the_roots_is_refused_naming_the_disk(tmp_path: Path, roots: Path) -> None:
    shadow = secret(tmp_path)
    img = overlay(roots / "vm.qcow2", str(shadow), "raw")
    msg = refusal(img)
    assert msg == outside(f"source.disks[1]: {img}: backing file", shadow, roots)
    with pytest.raises(NotAllowed):  # nor does a sync read it
        full_sync(tmp_path, img)


def test_a_relative_backing_name_and_a_symlink_are_resolved_before_the_check(
    tmp_path: Path, roots: Path
) -> None:
    shadow = secret(tmp_path)
    rel = overlay(roots / "rel.qcow2", os.path.relpath(shadow, roots), "raw")
    assert refusal(rel).endswith(outside("backing file", shadow, roots))
    (roots / "base.raw").symlink_to(shadow)
    linked = overlay(roots / "linked.qcow2", "base.raw", "raw")
    assert refusal(linked).endswith(outside("backing file", shadow, roots))


def test_a_chain_inside_the_roots_replicates_exactly(tmp_path: Path, roots: Path) -> None:
    """qcow2 -> qcow2 -> raw, relative names: every level is followed and the point reads the chain."""
    (roots / "base").mkdir()
    base = roots / "base" / "base.raw"
    run("qemu-img", "create", "-q", "-f", "raw", base, 16 * MiB)
    qemu_io(base, "write -P 0x11 0 4M", fmt="raw")
    mid = overlay(roots / "base" / "mid.qcow2", "base.raw", "raw", 16 * MiB)
    qemu_io(mid, "write -P 0x22 2M 4M")
    top = overlay(roots / "top.qcow2", "base/mid.qcow2", "qcow2", 16 * MiB)
    qemu_io(top, "write -P 0x33 5M 1M", "write -z 0 64k")
    point = full_sync(tmp_path, top)
    assert same_content(point, top)
    expected = bytearray(16 * MiB)
    expected[0 : 4 * MiB] = b"\x11" * (4 * MiB)
    expected[2 * MiB : 6 * MiB] = b"\x22" * (4 * MiB)
    expected[5 * MiB : 6 * MiB] = b"\x33" * MiB
    expected[0 : 64 * 1024] = bytes(64 * 1024)
    assert to_raw(point, tmp_path / "point.raw").read_bytes() == bytes(expected)


@pytest.mark.parametrize(
    "name",
    [
        'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}',
        "nbd+unix:///?socket=/run/other.sock",
        "file:/etc/shadow",
    ],
)
def test_a_protocol_backing_name_is_refused(tmp_path: Path, roots: Path, name: str) -> None:
    img = overlay(roots / "vm.qcow2", name, "raw")
    assert "is not a plain file path" in refusal(img)


def test_an_external_data_file_outside_the_roots_is_refused(tmp_path: Path, roots: Path) -> None:
    shadow = secret(tmp_path)
    img = roots / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={shadow},data_file_raw=on", img, 1 * MiB)
    msg = refusal(img)
    assert msg == outside(f"source.disks[1]: {img}: external data file", shadow, roots)


def test_an_external_data_file_inside_the_roots_replicates_and_a_relative_one_is_refused(
    tmp_path: Path, roots: Path
) -> None:
    img, data = roots / "vm.qcow2", roots / "vm.data"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", img, 8 * MiB)
    qemu_io(img, "write -P 0x44 1M 2M")
    assert same_content(full_sync(tmp_path, img), img)

    rel = roots / "rel.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", rel, 8 * MiB)
    run("qemu-img", "amend", "-o", "data_file=vm.data", rel)
    assert "is a relative name" in refusal(rel)


def test_a_raw_backing_is_never_probed(tmp_path: Path, roots: Path) -> None:
    """A raw backing file whose bytes look like a qcow2 naming a host file (a guest can write that):
    without a backing format QEMU would probe it as qcow2 and follow; the chain walk does the same
    and refuses; with -F raw it is raw, opened as raw, and its bytes are the disk's."""
    shadow = secret(tmp_path)
    name = str(shadow).encode()
    fake = header(backing_offset=512, backing_size=len(name), size=1 * MiB, version=3)
    base = write_image(roots / "base.raw", fake, file_size=1 * MiB, at={512: name})
    probed = overlay(roots / "probed.qcow2", "base.raw", None)
    assert refusal(probed).endswith(outside("backing file", shadow, roots))
    explicit = overlay(roots / "explicit.qcow2", "base.raw", "raw")
    point = full_sync(tmp_path, explicit)
    assert to_raw(point, tmp_path / "point.raw").read_bytes() == base.read_bytes()


def test_other_backing_formats_loops_and_fifos_are_refused(tmp_path: Path, roots: Path) -> None:
    desc = roots / "disk.vmdk"
    desc.write_text(f'# Disk DescriptorFile\nversion=1\nRW 8 FLAT "{secret(tmp_path)}" 0\n')
    assert refusal(overlay(roots / "vmdk.qcow2", "disk.vmdk", None)).endswith(
        f"backing file {desc} is vmdk: only qcow2 and raw backing files are followed"
    )
    a, b = roots / "a.qcow2", roots / "b.qcow2"
    overlay(a, "b.qcow2", "qcow2")
    overlay(b, "a.qcow2", "qcow2")
    assert refusal(a).endswith("loops back into the chain")
    os.mkfifo(roots / "fifo")
    assert refusal(overlay(roots / "f.qcow2", "fifo", "raw")).endswith("not a regular file or block device")


def test_a_crafted_backing_level_is_refused_naming_the_disk(tmp_path: Path, roots: Path) -> None:
    write_image(roots / "bad.qcow2", header(backing_offset=512, backing_size=0xFFFFFFF0))
    img = overlay(roots / "vm.qcow2", "bad.qcow2", "qcow2")
    assert refusal(img) == (
        f"source.disks[1]: {img}: backing file {roots / 'bad.qcow2'}: qcow2 header: "
        "backing file name of 4294967280 bytes (max 1023)"
    )


def test_refusals_are_invalid_spec_or_the_policys_own(tmp_path: Path, roots: Path) -> None:
    img = overlay(roots / "vm.qcow2", "json:{}", "raw")
    with pytest.raises(InvalidSpec):
        OfflineQcow2Source(JOB, [img]).validate()
