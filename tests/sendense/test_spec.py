"""Job specs: the documented forms parse; every mistake is a one-line InvalidSpec naming the field."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.spec import load_spec, parse_spec

STOPPED_VM = """\
name: web1
source:
  platform: kvm
  disks:
    - /var/lib/libvirt/images/web1.qcow2
    - /var/lib/libvirt/images/web1-data.qcow2
target:
  platform: kvm
  path: /srv/replicas
schedule:
  interval: 5m
retention:
  points: 24
tuning:
  chunk_size: 4194304
  connections: 4
  bandwidth_limit: 104857600
"""

QMP_VM = """\
name: db-01
source:
  platform: kvm
  qmp: /run/vms/db-01.qmp
target:
  platform: kvm
  path: /srv/replicas
  host: dr-host-1
schedule:
  interval: 30s
"""

LIBVIRT_VM = """\
name: app-prod_2
source:
  platform: kvm
  libvirt:
    uri: qemu:///system
    domain: app-prod-2
  host: kvm-host-3
target:
  platform: kvm
  path: /srv/replicas
schedule:
  interval: 1h
retention:
  points: 48
"""

MINIMAL: dict[str, Any] = {
    "name": "web1",
    "source": {"platform": "kvm", "disks": ["/img/web1.qcow2"]},
    "target": {"platform": "kvm", "path": "/srv/replicas"},
}


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def spec_error(data: Any) -> str:
    with pytest.raises(InvalidSpec) as ei:
        parse_spec(data, "job.yaml")
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def with_(**changes: Any) -> dict[str, Any]:
    """MINIMAL with dotted-path changes; a value of ... deletes the field."""
    d = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return d


# ----------------------------------------------------------------------------------- documented forms


def test_stopped_vm_form(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, STOPPED_VM))
    assert spec.name == "web1"
    assert spec.source.mode == "offline"
    assert spec.source.disks == [
        Path("/var/lib/libvirt/images/web1.qcow2"),
        Path("/var/lib/libvirt/images/web1-data.qcow2"),
    ]
    assert spec.target.path == Path("/srv/replicas")
    assert spec.schedule.interval == timedelta(minutes=5)
    assert spec.retention.points == 24
    assert (spec.tuning.chunk_size, spec.tuning.connections) == (4 << 20, 4)
    assert spec.tuning.bandwidth_limit == 100 << 20


def test_qmp_form(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, QMP_VM))
    assert spec.source.mode == "qmp"
    assert spec.source.qmp == Path("/run/vms/db-01.qmp")
    assert spec.source.disks is None and spec.source.libvirt is None
    assert spec.target.host == "dr-host-1"
    assert spec.schedule.interval == timedelta(seconds=30)
    assert spec.retention.points == 24  # default


def test_libvirt_form(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, LIBVIRT_VM))
    assert spec.source.mode == "libvirt"
    assert spec.source.libvirt is not None
    assert (spec.source.libvirt.uri, spec.source.libvirt.domain) == ("qemu:///system", "app-prod-2")
    assert spec.source.host == "kvm-host-3"
    assert spec.schedule.interval == timedelta(hours=1)
    assert spec.retention.points == 48


def test_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.schedule.interval == timedelta(minutes=5)
    assert spec.retention.points == 24
    assert (spec.tuning.chunk_size, spec.tuning.connections) == (512 << 10, 8)
    assert spec.tuning.bandwidth_limit is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1.5h", 5400),
        ("2d", 172800),
        ("1500ms", 1.5),
        (90, 90),
        ("45", 45),
    ],
)
def test_durations(value: Any, seconds: float) -> None:
    assert parse_spec(with_(schedule__interval=value)).schedule.interval == timedelta(seconds=seconds)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (with_(source__disk=["/x.qcow2"]), "job.yaml: source.disk: unknown field"),
        (with_(tuning__chunk_sise=1), "job.yaml: tuning.chunk_sise: unknown field"),
        (with_(schedule__every="5m"), "job.yaml: schedule.every: unknown field"),
        (with_(colour="red"), "job.yaml: colour: unknown field"),
        (
            with_(source__disks=..., source__libvirt={"uri": "qemu:///system", "domain": "d", "domian": "x"}),
            "job.yaml: source.libvirt.domian: unknown field",
        ),
        (with_(target=...), "job.yaml: target: field required"),
        (with_(target__path=...), "job.yaml: target.path: field required"),
        (
            with_(source__platform=...),
            "job.yaml: source.platform: field required (one of: kvm, aws, vsphere, cloudstack)",
        ),
        (
            with_(source__platform="vmware"),
            "job.yaml: source.platform: not a supported platform (one of: kvm, aws, vsphere, cloudstack)",
        ),
        (with_(source__qmp="/run/vm.qmp"), "job.yaml: source: give exactly one of disks, qmp or libvirt"),
        (with_(source__disks=...), "job.yaml: source: give exactly one of disks, qmp or libvirt"),
        (with_(source__disks=[]), "job.yaml: source: disks must list at least one qcow2 image"),
        (with_(source__disks=["/a.qcow2", "/a.qcow2"]), "job.yaml: source: disks lists the same image twice"),
        (
            with_(schedule__interval="5 minutes"),
            "job.yaml: schedule.interval: not a duration (use e.g. 30s, 5m, 1h)",
        ),
        (with_(schedule__interval="0s"), "job.yaml: schedule.interval: interval must be at least 1s"),
        (with_(schedule__interval="500ms"), "job.yaml: schedule.interval: interval must be at least 1s"),
    ],
)
def test_invalid_spec_is_one_line_naming_the_field(data: dict[str, Any], expected: str) -> None:
    assert spec_error(data) == expected


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (with_(source__platform="vmware"), "source.platform: "),
        (with_(tuning__connections=99), "tuning.connections: "),
        (with_(tuning__chunk_size=4096), "tuning.chunk_size: "),
        (with_(retention__points=0), "retention.points: "),
        (with_(tuning__bandwidth_limit=10), "tuning.bandwidth_limit: "),
    ],
)
def test_out_of_range_values_name_the_field(data: dict[str, Any], field: str) -> None:
    assert spec_error(data).startswith(f"job.yaml: {field}")


@pytest.mark.parametrize("name", ["My Job", "-web", "_web", "a" * 64, "web.db", "Web1", ""])
def test_bad_job_names_are_rejected(name: str) -> None:
    """Dots are not allowed either: they separate job and snapshot in bitmap names."""
    assert spec_error(with_(name=name)).startswith("job.yaml: name: must be 1-63 chars of a-z 0-9 ")


@pytest.mark.parametrize("name", ["web1", "0db", "app-prod_2", "a" * 63])
def test_good_job_names_are_accepted(name: str) -> None:
    assert parse_spec(with_(name=name)).name == name


def test_several_problems_report_the_first_and_a_count() -> None:
    msg = spec_error(with_(colour="red", tuning__connections=99))
    assert msg.endswith("(+1 more)")


def test_not_a_mapping() -> None:
    assert spec_error(["name", "web1"]) == "job.yaml: expected a mapping with name, source and target"
    assert spec_error(None) == "job.yaml: expected a mapping with name, source and target"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ResourceNotFound, match="not found"):
        load_spec(tmp_path / "absent.yaml")
    bad = write(tmp_path, "name: web1\nsource: [unclosed\n", "bad.yaml")
    with pytest.raises(InvalidSpec) as ei:
        load_spec(bad)
    assert str(ei.value).startswith(f"{bad} line ")
    assert str(ei.value).endswith("not valid YAML")
    empty = write(tmp_path, "", "empty.yaml")
    with pytest.raises(InvalidSpec, match="expected a mapping"):
        load_spec(empty)
    typo = write(tmp_path, STOPPED_VM.replace("  interval: 5m", "  intervall: 5m"), "typo.yaml")
    with pytest.raises(InvalidSpec) as ei:
        load_spec(typo)
    assert str(ei.value) == f"{typo}: schedule.intervall: unknown field"


# ---------------------------------------------------------------------------------- relative paths


def test_relative_paths_are_resolved_against_the_spec_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # elsewhere than the spec's directory
    spec_dir = tmp_path / "jobs" / "web"
    text = (
        "name: web1\n"
        "source: {platform: kvm, disks: [web1.qcow2, ../shared/data.qcow2, /abs/other.qcow2]}\n"
        "target: {platform: kvm, path: replicas}\n"
    )
    spec = load_spec(write(spec_dir, text))
    assert spec.source.disks == [
        spec_dir / "web1.qcow2",
        tmp_path / "jobs" / "shared" / "data.qcow2",
        Path("/abs/other.qcow2"),
    ]
    assert spec.target.path == spec_dir / "replicas"

    qmp = load_spec(
        write(
            spec_dir,
            "name: db\nsource: {platform: kvm, qmp: sock/db.qmp}\ntarget: {platform: kvm, path: /srv/r}\n",
            "qmp.yaml",
        )
    )
    assert qmp.source.qmp == spec_dir / "sock" / "db.qmp"
    assert qmp.target.path == Path("/srv/r")


def test_parse_spec_alone_leaves_paths_as_given() -> None:
    spec = parse_spec(with_(source__disks=["rel.qcow2"], target__path="out"))
    assert spec.source.disks == [Path("rel.qcow2")]
    assert spec.target.path == Path("out")


def test_the_same_image_twice_is_caught_after_paths_are_resolved(tmp_path: Path) -> None:
    """`vm.qcow2` and `<spec dir>/vm.qcow2` name one image: replicating it as two disks is a mistake."""
    text = (
        "name: web1\n"
        f"source: {{platform: kvm, disks: [vm.qcow2, {tmp_path / 'vm.qcow2'}]}}\n"
        "target: {platform: kvm, path: /srv/replicas}\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(InvalidSpec) as ei:
        load_spec(path)
    assert str(ei.value) == (
        f"{path}: source: disks lists the same image twice "
        f"({tmp_path / 'vm.qcow2'} and {tmp_path / 'vm.qcow2'})"
    )


# ------------------------------------------------------------------------------------------------ aws

AWS_TO_KVM = """\
name: ec2-web
source:
  platform: aws
  instance_id: i-0123456789abcdef0
  region: eu-west-1
target:
  platform: kvm
  path: /srv/replicas
"""

KVM_TO_AWS = """\
name: web-to-aws
source:
  platform: kvm
  disks: [/var/lib/libvirt/images/web1.qcow2]
target:
  platform: aws
  region: eu-west-1
  availability_zone: eu-west-1b
  endpoint_url: http://127.0.0.1:4566
  instance:
    instance_type: m5.large
    subnet_id: subnet-0abc12345678def90
    security_group_ids: [sg-0123456789abcdef0]
"""


def test_aws_forms_parse() -> None:
    import yaml

    src = parse_spec(yaml.safe_load(AWS_TO_KVM)).source
    assert (src.platform, src.instance_id, src.region, src.endpoint_url) == (  # type: ignore[union-attr]
        "aws",
        "i-0123456789abcdef0",
        "eu-west-1",
        None,
    )
    tgt = parse_spec(yaml.safe_load(KVM_TO_AWS)).target
    assert tgt.platform == "aws" and tgt.availability_zone == "eu-west-1b"  # type: ignore[union-attr]
    assert tgt.instance.instance_type == "m5.large"  # type: ignore[union-attr]
    assert tgt.instance.security_group_ids == ["sg-0123456789abcdef0"]  # type: ignore[union-attr]


def aws_error(text: str, **changes: Any) -> str:
    return spec_error(aws_data(text, **changes))


def aws_data(text: str, **changes: Any) -> Any:
    import yaml

    data = yaml.safe_load(text)
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return data


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"source__instance_id": ...}, "job.yaml: source.instance_id: field required"),
        (
            {"source__region": "mars"},
            "job.yaml: source.region: not an AWS region name (e.g. us-east-1)",
        ),
        (
            {"source__endpoint_url": "localhost:4566"},
            "job.yaml: source.endpoint_url: not an http(s) URL",
        ),
        ({"source__volumes": ["vol-1"]}, "job.yaml: source.volumes: unknown field"),
        ({"source__instance_id": "web01"}, "job.yaml: source.instance_id: String should match pattern"),
    ],
)
def test_aws_source_errors_name_the_field(changes: dict[str, Any], expected: str) -> None:
    assert aws_error(AWS_TO_KVM, **changes).startswith(expected)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"target__availability_zone": "us-east-1a"},
            "job.yaml: target.availability_zone: not a zone of region eu-west-1",
        ),
        (
            {"target__instance__security_group_ids": ["default"]},
            "job.yaml: target.instance.security_group_ids: not a security group id",
        ),
        ({"target__instance__subnet": "subnet-1"}, "job.yaml: target.instance.subnet: unknown field"),
        ({"target__region": ...}, "job.yaml: target.region: field required"),
    ],
)
def test_aws_target_errors_name_the_field(changes: dict[str, Any], expected: str) -> None:
    assert aws_error(KVM_TO_AWS, **changes).startswith(expected)


@pytest.mark.parametrize("key", ["aws_secret_access_key", "access_key_id", "credentials", "session-token"])
def test_credentials_in_a_spec_are_refused_without_echoing_them(key: str) -> None:
    msg = aws_error(AWS_TO_KVM, **{f"source__{key}": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})
    assert msg.startswith(f"job.yaml: source: {key}: credentials never go in a job spec")
    assert "wJalr" not in msg and "\n" not in msg


# ------------------------------------------------------------------- hostile or mistaken spec files

SPEC_TAIL = "source: {platform: kvm, disks: [/img/web1.qcow2]}\ntarget: {platform: kvm, path: /srv/r}\n"


def load_error(path: Path) -> str:
    with pytest.raises(InvalidSpec) as ei:
        load_spec(path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def test_a_key_given_twice_is_refused_not_last_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "name: web1\n" + SPEC_TAIL + "schedule: {interval: 5m, interval: 1h}\n")
    assert load_error(path) == f"{path} line 4: key 'interval' given twice"
    top = write(tmp_path, "name: web1\nname: web2\n" + SPEC_TAIL, "top.yaml")
    assert load_error(top) == f"{top} line 2: key 'name' given twice"


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    """`$` admits a trailing newline: such a job was created and then never found by its name."""
    assert spec_error(with_(name="web1\n")).startswith("job.yaml: name: must be 1-63 chars")


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ("99999999999999d", "duration out of range (at most 30d)"),
        (float("inf"), "duration out of range (at most 30d)"),
        (float("nan"), "duration out of range (at most 30d)"),
        ("99999999d", "interval must be at most 30d"),
        ("P99999999D", "interval must be at most 30d"),
        ("31d", "interval must be at most 30d"),
        (True, "not a duration (use e.g. 30s, 5m, 1h)"),
    ],
)
def test_a_huge_interval_names_the_field(interval: Any, expected: str) -> None:
    assert spec_error(with_(schedule__interval=interval)).startswith(
        f"job.yaml: schedule.interval: {expected}"
    )


def test_the_largest_interval_is_accepted() -> None:
    assert parse_spec(with_(schedule__interval="30d")).schedule.interval == timedelta(days=30)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0s", "heartbeat_timeout must be at least 1s"), ("2h", "heartbeat_timeout must be at most 1h")],
)
def test_heartbeat_timeout_is_bounded(value: str, expected: str) -> None:
    assert (
        spec_error(with_(tuning__heartbeat_timeout=value))
        == f"job.yaml: tuning.heartbeat_timeout: {expected}"
    )


def test_a_binary_spec_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(range(256)))
    assert load_error(path) == f"spec file {path}: not UTF-8 text (byte 3); a spec is YAML"


def test_a_directory_is_not_reported_as_missing(tmp_path: Path) -> None:
    assert load_error(tmp_path) == f"spec file {tmp_path}: is a directory, not a YAML file"


def test_a_huge_spec_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = write(tmp_path, "name: web1\n" + SPEC_TAIL + "#" * (1 << 20))
    size = path.stat().st_size
    assert load_error(path) == f"spec file {path}: {size} bytes; a job spec is at most 1048576"


@pytest.mark.parametrize(
    "text", ["[" * 5000 + "]" * 5000, "name: x\nsource: " + "{a: " * 3000 + "1" + "}" * 3000]
)
def test_deeply_nested_yaml_is_one_line(tmp_path: Path, text: str) -> None:
    """Before: a bare RecursionError (5000 levels), caught and worded after the fact."""
    path = write(tmp_path, text)
    line = text.count("\n") + 1
    assert load_error(path) == f"{path} line {line}: nested deeper than 16 levels: not a job spec"


def test_tilde_is_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = (
        "name: web1\nsource: {platform: kvm, disks: [~/vm.qcow2]}\n"
        "target: {platform: kvm, path: ~/replicas}\n"
    )
    spec = load_spec(write(tmp_path / "jobs", text))
    assert spec.source.disks == [tmp_path / "home" / "vm.qcow2"]
    assert spec.target.path == tmp_path / "home" / "replicas"
    qmp = "name: db\nsource: {platform: kvm, qmp: ~/db.qmp}\ntarget: {platform: kvm, path: /srv/r}\n"
    assert load_spec(write(tmp_path / "jobs", qmp, "qmp.yaml")).source.qmp == tmp_path / "home" / "db.qmp"


def test_the_same_image_through_dotdot_or_a_symlink_is_caught(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "vm.qcow2").write_bytes(b"")
    (tmp_path / "link.qcow2").symlink_to(tmp_path / "img" / "vm.qcow2")
    for other in (tmp_path / "img" / ".." / "img" / "vm.qcow2", tmp_path / "link.qcow2"):
        text = (
            f"name: web1\nsource: {{platform: kvm, disks: [{tmp_path / 'img' / 'vm.qcow2'}, {other}]}}\n"
            "target: {platform: kvm, path: /srv/r}\n"
        )
        path = write(tmp_path, text)
        assert load_error(path) == (
            f"{path}: source: disks lists the same image twice ({tmp_path / 'img' / 'vm.qcow2'} and {other})"
        )


@pytest.mark.parametrize("host", ["kvm 1", "kvm-1\n", "", "-x", "a" * 64, "host/1"])
def test_a_host_id_no_agent_could_serve_is_refused(host: str) -> None:
    """The host id names the agent's task queue: before, `host: "kvm 1"` was accepted and the job's
    steps waited on a queue no agent serves."""
    for side, data in (
        ("source", with_(source__host=host)),
        ("target", with_(target__host=host)),
        ("source", aws_data(AWS_TO_KVM, source__host=host)),
    ):
        assert spec_error(data).startswith(f"job.yaml: {side}.host: not a host id"), side


@pytest.mark.parametrize("host", ["dr-host-1", "3f2a9c1b77d0", "kvm-1.example.com", "A_1"])
def test_host_ids_are_accepted(host: str) -> None:
    assert parse_spec(with_(source__host=host, target__host=host)).source.host == host


def test_an_aws_region_or_group_with_a_trailing_newline_is_refused() -> None:
    assert aws_error(AWS_TO_KVM, source__region="eu-west-1\n").startswith("job.yaml: source.region: ")
    bad = aws_error(KVM_TO_AWS, target__instance__security_group_ids=["sg-0123456789abcdef0\n"])
    assert bad.startswith("job.yaml: target.instance.security_group_ids: ")
