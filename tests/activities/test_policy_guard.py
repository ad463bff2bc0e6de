"""Every activity asks the agent's policy before it touches anything: a job started straight through
the SDK, with paths the agent's policy does not allow, fails in one line and reaches no connector."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from temporalio.exceptions import ApplicationError

from activities import recovery, replication
from activities.recovery import RECOVERY_ACTIVITIES
from activities.replication import HOST_ACTIVITIES
from sendense.models import JobSpec


@pytest.fixture
def narrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "images").mkdir()
    p = tmp_path / "policy.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "platforms": ["kvm"],
                "source_roots": [str(tmp_path / "images")],
                "target_roots": [str(tmp_path / "replicas")],
            }
        )
    )
    monkeypatch.setenv("SENDENSE_POLICY", str(p))

    def untouched(*a: object, **k: object) -> None:
        raise AssertionError("a refused job reached a connector or the agent's work directory")

    for name in ("source_for", "target_for", "work_dir"):
        monkeypatch.setattr(replication, name, untouched)
    for name in ("target_for", "vms_for"):
        monkeypatch.setattr(recovery, name, untouched)
    return tmp_path


@pytest.mark.parametrize("fn", [*HOST_ACTIVITIES, *RECOVERY_ACTIVITIES], ids=lambda f: f.__name__)
def test_every_activity_refuses_a_job_outside_the_policy(fn: typing.Any, narrow: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "name": "steal",
            "source": {"platform": "kvm", "disks": ["/root/secret/disk.qcow2"]},
            "target": {"platform": "kvm", "path": str(narrow / "replicas")},
        }
    )
    req_type = typing.get_type_hints(fn)["req"]
    req = req_type.model_construct(spec=spec)  # the guard reads only the spec
    with pytest.raises(ApplicationError) as e:
        fn(req)
    assert e.value.type == "NotAllowed" and e.value.non_retryable
    assert e.value.message.startswith(
        "job steal: source.disks[0] /root/secret/disk.qcow2 is outside this agent's source roots"
    )


@pytest.mark.parametrize("fn", [*HOST_ACTIVITIES, *RECOVERY_ACTIVITIES], ids=lambda f: f.__name__)
def test_every_activity_refuses_a_target_outside_the_policy(fn: typing.Any, narrow: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "name": "purge-root",
            "source": {"platform": "kvm", "disks": [str(narrow / "images/a.qcow2")]},
            "target": {"platform": "kvm", "path": "/root/owned"},
        }
    )
    with pytest.raises(ApplicationError, match=r"job purge-root: target.path /root/owned is outside"):
        fn(typing.get_type_hints(fn)["req"].model_construct(spec=spec))
