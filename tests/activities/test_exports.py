"""The source agent's check of each data connection (activities.exports.authorize) against the export
records `export_snapshot` writes, and the ends an agent checks (policy.is_local)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from activities import exports
from sendense import policy
from sendense.datapath.remote import Hello
from sendense.errors import NotAllowed, ResourceNotFound
from sendense.models import DiskSnapshot, JobSpec, SnapshotRef


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SENDENSE_HOST_ID", "site-a")
    p = tmp_path / "policy.yaml"
    p.write_text(yaml.safe_dump({"platforms": ["kvm"], "source_roots": [str(tmp_path)], "target_roots": []}))
    monkeypatch.setenv("SENDENSE_POLICY", str(p))
    return tmp_path


def spec(tmp: Path, target_host: str | None = "site-b") -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "web",
            "source": {"platform": "kvm", "disks": [str(tmp / "d.qcow2")], "host": "site-a"},
            "target": {"platform": "kvm", "path": "/srv/replicas", "host": target_host},
        }
    )


def record(tmp: Path, token: str = "s3cret", peer: str = "site-b") -> None:
    snap = SnapshotRef(
        snapshot_id="s1",
        created_at=datetime.now(UTC),
        disks=[DiskSnapshot(key="disk0", size=1 << 20, change_id="c1")],
    )
    rec = exports.ExportRecord(
        spec=spec(tmp),
        sync_id="s1",
        snapshot=snap,
        peer_host=peer,
        token_sha256=hashlib.sha256(token.encode()).hexdigest(),
    )
    path = tmp / "home" / "work" / "web" / "exports" / "s1.json"
    path.parent.mkdir(parents=True)
    path.write_text(rec.model_dump_json())


def hello(export: str = "web/s1", token: str = "s3cret", disk: str = "disk0") -> Hello:
    return Hello(op="read", export=export, token=token, disk=disk, args={})


def test_the_exports_reader_with_its_token_gets_the_disk(agent: Path) -> None:
    record(agent)
    key, opener = exports.authorize(hello(), "site-b")
    assert key == "web/s1/disk0" and callable(opener)


def test_another_agent_a_wrong_token_or_an_unknown_export_is_refused(agent: Path) -> None:
    record(agent)
    with pytest.raises(
        NotAllowed, match=r"agent host-site-c is not the target of export web/s1 \(host-site-b is\)"
    ):
        exports.authorize(hello(), "site-c")
    with pytest.raises(NotAllowed, match="the token is not this export's"):
        exports.authorize(hello(token="s3creT"), "site-b")
    with pytest.raises(ResourceNotFound, match="web/s2: not served by agent host-site-a"):
        exports.authorize(hello(export="web/s2"), "site-b")
    with pytest.raises(ResourceNotFound, match="no disk 'disk9'"):
        exports.authorize(hello(disk="disk9"), "site-b")
    for name in ("../../etc/x", "web/../s1", "web/.s1", "/abs/s1"):
        with pytest.raises(ResourceNotFound, match="not an export name"):
            exports.authorize(hello(export=name), "site-b")


def test_an_export_released_is_gone(agent: Path) -> None:
    record(agent)
    exports.unexport(spec(agent), "s1")
    with pytest.raises(ResourceNotFound, match="released, or never exported"):
        exports.authorize(hello(), "site-b")


def test_an_agent_checks_only_its_own_ends(agent: Path) -> None:
    """The source agent's policy has no target roots: a target on another agent is not its business;
    a target on this agent (or on no named agent) is checked, and refused."""
    policy.authorize(spec(agent, target_host="site-b"))
    for host in ("site-a", None):
        with pytest.raises(NotAllowed, match="target.path /srv/replicas is outside"):
            policy.authorize(spec(agent, target_host=host))
