"""The agent's policy (sendense.policy): what a job may read, write and call, whoever started it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from connectors.kvm.spec import KvmTarget
from sendense import config, policy
from sendense.errors import NotAllowed
from sendense.models import JobSpec


def _policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **doc: object) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("SENDENSE_POLICY", str(p))
    return p


def _spec(source: dict[str, object], target: dict[str, object]) -> JobSpec:
    return JobSpec.model_validate({"name": "web", "source": source, "target": target})


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    src, dst = tmp_path / "images", tmp_path / "replicas"
    src.mkdir()
    dst.mkdir()
    _policy(
        tmp_path,
        monkeypatch,
        platforms=["kvm", "aws"],
        source_roots=[str(src)],
        target_roots=[str(dst)],
        endpoints=["aws:eu-*", "qemu:///system"],
    )
    return src, dst


def test_paths_inside_the_roots_are_allowed(roots: tuple[Path, Path]) -> None:
    src, dst = roots
    policy.authorize(
        _spec(
            {"platform": "kvm", "disks": [str(src / "a.qcow2"), str(src / "sub/b.qcow2")]},
            {"platform": "kvm", "path": str(dst / "web")},
        )
    )
    policy.authorize(
        _spec({"platform": "kvm", "qmp": str(src / "vm.sock")}, {"platform": "kvm", "path": str(dst)})
    )


@pytest.mark.parametrize(
    "disk, message",
    [
        ("/etc/shadow", "source.disks[1] /etc/shadow is outside this agent's source roots"),
        ("{src}/../replicas/x.qcow2", "source.disks[1] {src}/../replicas/x.qcow2 is outside"),
        ("{src}-evil/x.qcow2", "source.disks[1] {src}-evil/x.qcow2 is outside"),  # a prefix, not a root
    ],
)
def test_a_source_disk_outside_the_roots_is_refused_naming_its_field(
    roots: tuple[Path, Path], disk: str, message: str
) -> None:
    src, dst = roots
    spec = _spec(
        {"platform": "kvm", "disks": [str(src / "ok.qcow2"), disk.format(src=src)]},
        {"platform": "kvm", "path": str(dst)},
    )
    with pytest.raises(NotAllowed) as e:
        policy.authorize(spec)
    assert e.value.message.startswith(f"job web: {message.format(src=src)}")
    assert "\n" not in e.value.message


def test_a_symlink_inside_a_root_to_a_file_outside_is_refused(roots: tuple[Path, Path]) -> None:
    src, dst = roots
    (src / "link.qcow2").symlink_to("/etc/shadow")
    with pytest.raises(NotAllowed, match=r"source.disks\[0\] .*link.qcow2 is outside"):
        policy.authorize(
            _spec(
                {"platform": "kvm", "disks": [str(src / "link.qcow2")]}, {"platform": "kvm", "path": str(dst)}
            )
        )


def test_a_target_outside_the_roots_or_in_a_system_tree_is_refused(
    roots: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = roots
    with pytest.raises(
        NotAllowed, match=r"^job web: target.path /root/x is outside this agent's target roots"
    ):
        policy.authorize(
            _spec({"platform": "kvm", "disks": [str(src / "a")]}, {"platform": "kvm", "path": "/root/x"})
        )
    # a policy that (wrongly) allows / still never lets replicas into /proc, /etc, /dev... (the spec
    # model refuses them too: here a target model that does not, as a stored older spec might be)
    _policy(tmp_path, monkeypatch, platforms=["kvm"], source_roots=["/"], target_roots=["/"])
    ok = _spec({"platform": "kvm", "disks": [str(src / "a")]}, {"platform": "kvm", "path": str(dst)})
    for system in ("/proc", "/proc/self", "/etc/sendense", "/dev/shm", "/", "/sys/kernel"):
        target = KvmTarget.model_construct(platform="kvm", path=Path(system), libvirt=None, host=None)
        with pytest.raises(NotAllowed, match="is a system directory"):
            policy.authorize(ok.model_copy(update={"target": target}))


def test_platforms_and_endpoints(
    roots: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = roots
    kvm_target = {"platform": "kvm", "path": str(dst)}
    aws = {"platform": "aws", "instance_id": "i-0123456789abcdef0"}
    policy.authorize(_spec({**aws, "region": "eu-west-1"}, kvm_target))
    with pytest.raises(
        NotAllowed, match=r"^job web: source.region aws:us-east-1 is not among this agent's endpoints"
    ):
        policy.authorize(_spec({**aws, "region": "us-east-1"}, kvm_target))
    lab = "http://127.0.0.1:45999"
    with pytest.raises(NotAllowed, match=r"source.endpoint_url http://127.0.0.1:45999 is not among"):
        policy.authorize(_spec({**aws, "region": "eu-west-1", "endpoint_url": lab}, kvm_target))
    # a lab this agent's user started here registered its endpoint under SENDENSE_HOME: allowed
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    config.register_lab(lab, {"AWS_ACCESS_KEY_ID": "x"})
    policy.authorize(_spec({**aws, "region": "eu-west-1", "endpoint_url": lab + "/"}, kvm_target))
    libvirt = {"platform": "kvm", "libvirt": {"uri": "qemu+ssh://root@other/system", "domain": "web"}}
    with pytest.raises(NotAllowed, match=r"source.libvirt.uri qemu\+ssh://root@other/system is not among"):
        policy.authorize(_spec(libvirt, kvm_target))

    _policy(tmp_path, monkeypatch, platforms=["aws"], source_roots=[str(src)], target_roots=[str(dst)])
    with pytest.raises(
        NotAllowed, match=r"^job web: source.platform kvm is not served by this agent \(it serves: aws\)"
    ):
        policy.authorize(_spec({"platform": "kvm", "disks": [str(src / "a")]}, kvm_target))


def test_an_agent_without_a_policy_refuses_every_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SENDENSE_POLICY")
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path))
    with pytest.raises(NotAllowed, match=rf"^this agent has no policy \({tmp_path}/policy.yaml\)"):
        policy.current()


def test_the_policy_is_read_again_when_it_changes(roots: tuple[Path, Path]) -> None:
    src, dst = roots
    spec = _spec({"platform": "kvm", "disks": ["/opt/vm/a.qcow2"]}, {"platform": "kvm", "path": str(dst)})
    with pytest.raises(NotAllowed):
        policy.authorize(spec)
    p = policy.path()
    doc = yaml.safe_load(p.read_text())
    doc["source_roots"].append("/opt/vm")
    p.write_text(yaml.safe_dump(doc))
    os.utime(p, ns=(1, 1))  # a different stamp even within the file system's time granularity
    policy.authorize(spec)


@pytest.mark.parametrize(
    "text, message",
    [
        ("platforms: [kvm]\nsource_root: [/x]\n", "source_root: Extra inputs are not permitted"),
        ("platforms: [kvm\n", "not valid YAML"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),
        ("x" * (policy.MAX_POLICY_BYTES + 1), "larger than 64 KiB"),
    ],
)
def test_a_bad_policy_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    monkeypatch.setenv("SENDENSE_POLICY", str(p))
    with pytest.raises(NotAllowed) as e:
        policy.current()
    assert message in e.value.message and "\n" not in e.value.message


def test_the_starter_policy_allows_the_demo_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text(policy.starter(tmp_path))
    monkeypatch.setenv("SENDENSE_POLICY", str(p))
    pol = policy.current()
    assert "memory" not in pol.platforms and {"kvm", "aws"} <= set(pol.platforms)
    policy.authorize(
        _spec(
            {"platform": "kvm", "qmp": str(tmp_path / "lab/qmp.sock")},
            {"platform": "kvm", "path": str(tmp_path / "replicas")},
        )
    )
    # a CloudStack target writes its points on primary storage: an NFS pool's mount, or the lab's pool
    for pool in (Path("/mnt/0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"), tmp_path / "labs/cloudstack/primary"):
        policy.require_target_path(pool / "sendense", "the pool")
    with pytest.raises(NotAllowed):
        policy.require_target_path(tmp_path / "labs/aws", "a lab's own state")
    for disk, target in [(tmp_path / "policy.yaml", tmp_path / "replicas"), (tmp_path / "lab/a", tmp_path)]:
        with pytest.raises(NotAllowed):
            policy.authorize(
                _spec({"platform": "kvm", "disks": [str(disk)]}, {"platform": "kvm", "path": str(target)})
            )
