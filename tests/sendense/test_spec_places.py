"""Hostile or mistaken places in a spec: one image listed twice under other names, credentials in a
URL, and system trees as a target or a source. Each refused in one line, by the CLI's loader and, for
a job given through the SDK (no loader), by the model or by the agent's validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from connectors.kvm.offline import OfflineQcow2Source
from connectors.kvm.target import KvmTarget as Replicas
from sendense.errors import InvalidSpec
from sendense.spec import load_spec, parse_spec


def write(tmp_path: Path, data: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data)
    return p


def load_error(path: Path) -> str:
    with pytest.raises(InvalidSpec) as ei:
        load_spec(path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def spec_error(data: Any) -> str:
    with pytest.raises(InvalidSpec) as ei:
        parse_spec(data, "job.yaml")
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def kvm_job(disks: list[str], target: str = "/srv/r", **target_extra: Any) -> dict[str, Any]:
    return {
        "name": "web1",
        "source": {"platform": "kvm", "disks": disks},
        "target": {"platform": "kvm", "path": target, **target_extra},
    }


# ----------------------------------------------------------------------- one image under two names


@pytest.mark.parametrize("how", ["symlink", "hard link", "bind mount"])
def test_the_same_image_under_another_name_is_caught_by_its_identity(tmp_path: Path, how: str) -> None:
    """Before: the check compared resolved path text, so a hard link (or a bind mount) of the image
    passed as a second disk, and the job replicated one image as two."""
    (tmp_path / "img").mkdir()
    image = tmp_path / "img" / "vm.qcow2"
    image.write_bytes(b"QFI\xfb")
    other = tmp_path / "other.qcow2"
    if how == "symlink":
        other.symlink_to(image)
    elif how == "hard link":
        os.link(image, other)
    else:
        if os.geteuid() != 0:
            pytest.fail("a bind mount needs root (the suite runs as root)")
        import subprocess

        other = tmp_path / "bound" / "vm.qcow2"
        other.parent.mkdir()
        subprocess.run(["mount", "--bind", str(image.parent), str(other.parent)], check=True)
    try:
        path = write(
            tmp_path,
            f"name: web1\nsource: {{platform: kvm, disks: [{image}, {other}]}}\n"
            "target: {platform: kvm, path: /srv/r}\n",
        )
        assert load_error(path) == f"{path}: source: disks lists the same image twice ({image} and {other})"
        # a job given through the SDK: the agent's validation says the same
        src = OfflineQcow2Source("web1", [image, other])
        with pytest.raises(InvalidSpec) as ei:
            src.validate()
        assert str(ei.value) == f"source: disks lists the same image twice ({image} and {other})"
    finally:
        if how == "bind mount":
            import subprocess

            subprocess.run(["umount", str(other.parent)], check=True)


def test_two_images_with_equal_content_are_two_disks(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    a.write_bytes(b"QFI\xfb")
    b.write_bytes(b"QFI\xfb")
    spec = load_spec(
        write(
            tmp_path,
            f"name: web1\nsource: {{platform: kvm, disks: [{a}, {b}]}}\n"
            "target: {platform: kvm, path: /srv/r}\n",
        )
    )
    assert spec.source.disks == [a, b]  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- credentials in URLs

SECRET = "S3cr3tPW"


def aws_job(endpoint: str, side: str = "target") -> dict[str, Any]:
    aws: dict[str, Any] = {"platform": "aws", "region": "eu-west-1", "endpoint_url": endpoint}
    kvm_src = {"platform": "kvm", "disks": ["/img/a.qcow2"]}
    kvm_tgt = {"platform": "kvm", "path": "/srv/r"}
    if side == "source":
        return {"name": "j", "source": {**aws, "instance_id": "i-0123456789abcdef0"}, "target": kvm_tgt}
    return {"name": "j", "source": kvm_src, "target": aws}


def libvirt_job(uri: str, side: str) -> dict[str, Any]:
    if side == "source":
        return {
            "name": "j",
            "source": {"platform": "kvm", "libvirt": {"uri": uri, "domain": "web"}},
            "target": {"platform": "kvm", "path": "/srv/r"},
        }
    return kvm_job(["/img/a.qcow2"], libvirt={"uri": uri})


@pytest.mark.parametrize("side", ["source", "target"])
@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        (f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:4566", "carries a password (user:password@)"),
        (f"https://AKIAEXAMPLE:{SECRET}/x@ec2.example.com", "carries a password (user:password@)"),
        (f"https://AKIAEXAMPLE:{SECRET}?x@ec2.example.com", "carries a password (user:password@)"),
        (f"https://{SECRET}@ec2.example.com", "carries user-info (user@)"),
        (f"https://ec2.example.com/?X-Amz-Signature={SECRET}", "carries a token or a signature"),
        (f"https://ec2.example.com/?token={SECRET}", "carries a token or a signature"),
        (f"https://ec2.example.com/{SECRET} x", "has no spaces or control characters"),
        (f"{SECRET}.example.com", "not an http(s) URL"),
    ],
)
def test_an_endpoint_url_with_credentials_is_refused_without_echoing_it(
    side: str, endpoint: str, says: str
) -> None:
    """Before: `endpoint_url: http://KEY:SECRET@host` was accepted and stored in workflow history."""
    msg = spec_error(aws_job(endpoint, side))
    assert msg.startswith(f"job.yaml: {side}.endpoint_url: ") and says in msg, msg
    assert SECRET not in msg and "AKIAEXAMPLE" not in msg


@pytest.mark.parametrize("side", ["source", "target"])
@pytest.mark.parametrize(
    ("uri", "says"),
    [
        (f"qemu+ssh://root:{SECRET}@kvm1.example/system", "the URI carries a password (user:password@)"),
        (f"qemu+ssh://root:{SECRET}/x@kvm1.example/system", "the URI carries a password (user:password@)"),
        (f"qemu+ssh://kvm1.example/system?token={SECRET}", "the URI carries a token or a signature"),
        (f"{SECRET}", "not a libvirt URI"),
    ],
)
def test_a_libvirt_uri_with_a_password_is_refused_on_either_side(side: str, uri: str, says: str) -> None:
    """Before: the target's libvirt URI was checked, the source's (LibvirtDomain) was not."""
    msg = spec_error(libvirt_job(uri, side))
    assert msg.startswith(f"job.yaml: {side}.libvirt.uri: ") and says in msg, msg
    assert SECRET not in msg


@pytest.mark.parametrize(
    "uri",
    ["qemu:///system", "qemu+ssh://root@kvm1.example/system?keyfile=/root/.ssh/id", "qemu+tcp://h:16509/"],
)
def test_libvirt_uris_without_secrets_are_accepted(uri: str) -> None:
    assert parse_spec(libvirt_job(uri, "source")).source.libvirt.uri == uri  # type: ignore[attr-defined]
    assert parse_spec(libvirt_job(uri, "target")).target.libvirt.uri == uri  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:4566", "https://ec2.eu-west-1.amazonaws.com/", "http://[::1]:80"]
)
def test_plain_endpoints_are_accepted(endpoint: str) -> None:
    assert parse_spec(aws_job(endpoint)).target.endpoint_url == endpoint  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------- system trees


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/proc", "under /proc"),
        ("/proc/self/fd", "under /proc"),
        ("/sys/kernel", "under /sys"),
        ("/dev", "under /dev"),
        ("/dev/shm/../shm/r", "under /dev"),
        ("/", "/, the root"),
        ("//", "/, the root"),
        ("/srv/..", "/, the root"),
        ("/boot/replicas", "under /boot"),
        ("/etc", "under /etc"),
        ("/run/r", "under /run"),
        ("/var/run/r", "under /var/run"),
    ],
)
def test_a_target_path_in_a_system_tree_is_refused(path: str, says: str) -> None:
    """Before: `target.path: /proc` was accepted (and a purge deletes what the job made there)."""
    assert spec_error(kvm_job(["/img/a.qcow2"], path)) == f"job.yaml: target.path: {says}, a system tree"


@pytest.mark.parametrize("path", ["/srv/replicas", "/var/lib/sendense", "/procs", "/device/r", "/home/run"])
def test_a_target_path_beside_a_system_tree_is_accepted(path: str) -> None:
    assert parse_spec(kvm_job(["/img/a.qcow2"], path)).target.path == Path(path)  # type: ignore[attr-defined]


def test_a_symlink_into_a_system_tree_is_refused_as_target(tmp_path: Path) -> None:
    link = tmp_path / "replicas"
    link.symlink_to("/proc/self")
    path = write(
        tmp_path,
        f"name: web1\nsource: {{platform: kvm, disks: [/img/a.qcow2]}}\n"
        f"target: {{platform: kvm, path: {link}}}\n",
    )
    assert load_error(path) == f"{path}: target.path: {link} is under /proc, a system tree"
    root = tmp_path / "root"
    root.symlink_to("/")
    path = write(
        tmp_path,
        f"name: web1\nsource: {{platform: kvm, disks: [/img/a.qcow2]}}\n"
        f"target: {{platform: kvm, path: {root}}}\n",
    )
    assert load_error(path) == f"{path}: target.path: {root} is /, the root, a system tree"
    # a job given through the SDK: the agent's validation follows the link too
    with pytest.raises(InvalidSpec) as ei:
        Replicas("web1", link, job_id="j1").validate()
    assert str(ei.value) == f"target.path: {link} is under /proc, a system tree"


@pytest.mark.parametrize("disk", ["/proc/self/fd/0", "/sys/block/sda", "/dev/sda", "/dev/shm/vm.qcow2"])
def test_a_source_disk_in_a_system_tree_is_refused(tmp_path: Path, disk: str) -> None:
    """Source disks are qcow2 image files (block devices are not supported): /proc, /sys and /dev
    hold none."""
    msg = spec_error(kvm_job(["/img/a.qcow2", disk]))
    assert msg.startswith("job.yaml: source.disks: disks[1] is under /") and "a system tree" in msg, msg
    link = tmp_path / "vm.qcow2"
    link.symlink_to(disk)
    path = write(
        tmp_path,
        f"name: web1\nsource: {{platform: kvm, disks: [{link}]}}\ntarget: {{platform: kvm, path: /srv/r}}\n",
    )
    assert load_error(path).startswith(f"{path}: source.disks[0]: {link} is under /")
    with pytest.raises(InvalidSpec, match=r"^source\.disks\[0\]: .* is under /.*, a system tree$"):
        OfflineQcow2Source("web1", [link]).validate()
