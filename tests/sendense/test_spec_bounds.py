"""Hostile specs: size, nesting, list lengths and string lengths are bounded, in the CLI's loader and in
the models themselves (a job started through the SDK skips the loader), each refused in one line
naming the limit, before much is built."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from sendense.errors import InvalidSpec
from sendense.models import MAX_DISKS, MAX_PATH_BYTES, MAX_TEXT, JobSpec, ReplicationInput
from sendense.spec import MAX_SPEC_VALUES, load_spec, parse_spec

TAIL = "target: {platform: kvm, path: /srv/r}\n"


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


def kvm(disks: list[str], **source: Any) -> dict[str, Any]:
    return {
        "name": "web1",
        "source": {"platform": "kvm", "disks": disks, **source},
        "target": {"platform": "kvm", "path": "/srv/r"},
    }


def peak_mib(fn: Any) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak / (1 << 20)


# ------------------------------------------------------------------------------------ the YAML text


def test_a_spec_of_a_million_values_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """Before: a 1 MiB spec listing 524,000 disks took 11.7 s and 377 MB to be refused (as a duplicate
    image). Now the composer stops at the first value past the limit."""
    path = tmp_path / "job.yaml"
    path.write_text("name: web1\n" + TAIL + "source: {platform: kvm, disks: [" + "a," * 500_000 + "a]}\n")
    msg: list[str] = []
    peak = peak_mib(lambda: msg.append(load_error(path)))
    assert msg == [
        f"{path} line 3: more than {MAX_SPEC_VALUES} values (an alias counts what it repeats): not a job spec"
    ]
    assert peak < 32, f"{peak:.0f} MiB traced to refuse it"


def test_aliases_count_as_what_they_repeat(tmp_path: Path) -> None:
    """A billion laughs: 8 lines whose aliases expand to 10^8 values (and as many validations)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\nname: web1\n" + TAIL + "source: {platform: kvm, disks: *a8}\n")
    assert load_error(path).endswith(
        f"more than {MAX_SPEC_VALUES} values (an alias counts what it repeats): not a job spec"
    )
    merged = tmp_path / "merged.yaml"
    keys = ", ".join(f"k{i}: 1" for i in range(2000))
    merged.write_text(f"base: &b {{{keys}}}\n" + "".join(f"m{i}: {{<<: *b}}\n" for i in range(100)))
    assert load_error(merged).endswith("not a job spec")


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: web1\n" + TAIL + "source: &s {platform: kvm, disks: [*s]}\n")
    assert load_error(path) == f"{path} line 3: an alias inside its own anchor: a job spec is not recursive"


def test_anchors_and_aliases_within_the_limits_still_work(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: web1\nsource: {platform: kvm, disks: [/img/a.qcow2], host: &h kvm-1}\n"
        "target: {platform: kvm, path: /srv/r, host: *h}\n"
    )
    assert load_spec(path).target.host == "kvm-1"


# ------------------------------------------------------------------------------------ disks per VM


def test_the_disk_count_is_capped_naming_the_limit() -> None:
    """Before: 10,000 disks were accepted, and 1M took 858 MB before failing (as a duplicate)."""
    disks = [f"/img/d{i}.qcow2" for i in range(MAX_DISKS)]
    assert len(parse_spec(kvm(disks)).source.disks) == MAX_DISKS  # type: ignore[attr-defined]
    over = spec_error(kvm([*disks, "/img/one-more.qcow2"]))
    assert over == f"job.yaml: source.disks: at most {MAX_DISKS} disks per VM"
    assert spec_error(kvm(["/img/d.qcow2"] * 10_000)) == over


def test_a_million_disks_is_refused_before_any_is_validated() -> None:
    disks = ["/img/d.qcow2"] * 1_000_000  # one string, a million references: only the list costs
    msg: list[str] = []
    peak = peak_mib(lambda: msg.append(spec_error(kvm(disks))))
    assert msg == [f"job.yaml: source.disks: at most {MAX_DISKS} disks per VM"]
    assert peak < 16, f"{peak:.0f} MiB traced to refuse it"


def test_the_caps_hold_for_a_job_given_through_the_sdk() -> None:
    """The worker decodes a job's input as JSON into these models: the caps are theirs, not the CLI's."""
    spec = kvm([f"/img/d{i}.qcow2" for i in range(MAX_DISKS + 1)])
    with pytest.raises(ValueError, match=f"at most {MAX_DISKS} disks per VM"):
        JobSpec.model_validate(spec)
    import json

    with pytest.raises(ValueError, match=f"at most {MAX_DISKS} disks per VM"):
        ReplicationInput.model_validate_json(json.dumps({"spec": spec}))


def test_other_lists_of_a_spec_are_capped() -> None:
    nic = {"mac": "52:54:00:12:34:56"}
    assert spec_error(kvm(["/img/a.qcow2"], hardware={"nics": [nic] * 65})) == (
        "job.yaml: source.hardware.nics: at most 64 NICs per VM"
    )
    aws = {
        "name": "web1",
        "source": {"platform": "kvm", "disks": ["/img/a.qcow2"]},
        "target": {
            "platform": "aws",
            "region": "eu-west-1",
            "instance": {"security_group_ids": ["sg-0123456789abcdef0"] * 17},
        },
    }
    assert spec_error(aws) == "job.yaml: target.instance.security_group_ids: at most 16 security groups"


# ------------------------------------------------------------------------------------ string lengths


def test_paths_are_capped_naming_the_limit(tmp_path: Path) -> None:
    long = "/" + "d/" * (MAX_PATH_BYTES // 2) + "x.qcow2"
    assert spec_error(kvm([long])) == f"job.yaml: source.disks.0: a path of at most {MAX_PATH_BYTES} bytes"
    target = kvm(["/img/a.qcow2"])
    target["target"]["path"] = long
    assert spec_error(target) == f"job.yaml: target.path: a path of at most {MAX_PATH_BYTES} bytes"
    # a relative path that resolution makes longer is held to the same limit
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200) / ("g" * 200) / ("h" * 200)
    deep.mkdir(parents=True)
    rel = "i" * (MAX_PATH_BYTES - 10)
    (deep / "job.yaml").write_text(f"name: web1\nsource: {{platform: kvm, disks: [{rel}]}}\n" + TAIL)
    assert load_error(deep / "job.yaml") == (
        f"{deep / 'job.yaml'}: source.disks[0]: a path of at most {MAX_PATH_BYTES} bytes"
    )


def test_a_qmp_socket_path_longer_than_a_unix_socket_path_is_refused() -> None:
    data = {
        "name": "web1",
        "source": {"platform": "kvm", "qmp": "/run/" + "q" * 120 + ".qmp"},
        "target": {"platform": "kvm", "path": "/srv/r"},
    }
    assert spec_error(data) == "job.yaml: source.qmp: a unix socket path is at most 107 bytes"


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (
            "source.libvirt.domain",
            {"disks": None, "libvirt": {"uri": "qemu:///system", "domain": "d" * 5000}},
        ),
        ("source.libvirt.uri", {"disks": None, "libvirt": {"uri": "qemu:///" + "s" * 5000, "domain": "d"}}),
    ],
)
def test_other_strings_are_capped(where: str, value: dict[str, Any]) -> None:
    data = kvm([])
    data["source"].update(value)
    data["source"] = {k: v for k, v in data["source"].items() if v is not None}
    assert spec_error(data) == f"job.yaml: {where}: String should have at most {MAX_TEXT} characters"


def test_a_nic_network_name_is_capped() -> None:
    """Up to 64 of them go into every request of a sync with the spec."""
    nic = {"mac": "52:54:00:12:34:56", "network": "b" * 256}
    assert spec_error(kvm(["/img/a.qcow2"], hardware={"nics": [nic]})) == (
        "job.yaml: source.hardware.nics.0.network: String should have at most 255 characters"
    )
