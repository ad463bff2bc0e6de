"""Typed snapshot handles (issue 10 item 3): each connector's own pydantic model, stored in workflow
history as a JSON object; a credential, a signed URL or a URL with a password never goes in one; handles
recorded before they were typed (every value a string) still decode."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from connectors.aws.handles import AwsDisk
from connectors.kvm.handles import OfflineDisk, QmpDisk
from sendense.models import DiskSnapshot, SnapshotRef


def disk(handle: dict[str, object]) -> DiskSnapshot:
    return DiskSnapshot(key="disk0", size=1 << 20, change_id="c1", handle=handle)


def test_a_typed_handle_round_trips_through_the_wire() -> None:
    h = QmpDisk(node="drive0", export="sde-1", prev_bitmaps=["b1", "b2"], regrown=4096)
    snap = SnapshotRef(snapshot_id="s1", created_at=datetime.now(UTC), disks=[disk(h.dump())])
    back = SnapshotRef.model_validate_json(snap.model_dump_json())
    assert QmpDisk.parse(back.disk("disk0").handle) == h
    assert OfflineDisk.parse(disk(OfflineDisk(path="/vm/a.qcow2").dump()).handle).regrown is None
    assert (
        AwsDisk.parse(disk(AwsDisk(volume_id="vol-1", device="/dev/xvda").dump()).handle).volume_id == "vol-1"
    )


def test_handles_recorded_before_they_were_typed_still_decode() -> None:
    old = {"node": "drive0", "regrown": "4096", "prev_bitmaps": '["b1", "b2"]', "temp_bitmap": ""}
    h = QmpDisk.parse(disk(old).handle)
    assert h.regrown == 4096 and h.prev_bitmaps == ["b1", "b2"]


@pytest.mark.parametrize(
    "handle, field",
    [
        ({"password": "hunter2"}, "password"),
        ({"session_token": "abc"}, "session_token"),
        ({"url": "https://acct.blob.core.windows.net/d/x.vhd?sv=2026-10-06&sig=AbC%3D"}, "url"),
        ({"url": "https://bucket.s3.amazonaws.com/k?X-Amz-Signature=deadbeef"}, "url"),
        ({"uri": "qemu+ssh://root:PW@host/system"}, "uri"),
    ],
)
def test_a_secret_never_goes_in_a_handle(handle: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        disk(handle)
    msg = str(e.value)
    assert f"snapshot handle field {field!r}" in msg
    for v in handle.values():
        assert str(v) not in msg  # refused without echoing it
    with pytest.raises(ValidationError):
        SnapshotRef(snapshot_id="s", created_at=datetime.now(UTC), disks=[], handle=handle)


def test_sockets_and_paths_are_not_mistaken_for_secrets() -> None:
    h = {"socket": "/run/sendense/nbd.sock", "export": "nbd+unix:///sde-1?socket=/run/x.sock", "job_id": "j"}
    assert disk(h).handle == h
