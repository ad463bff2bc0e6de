"""How the CLI reads a job's spec back from its workflow: a job whose stored settings were accepted
before they were checked (interval 0, bandwidth 1000) stays readable, with the problem said once."""

from __future__ import annotations

from typing import Any

from app.cli.client import readable_spec

STORED: dict[str, Any] = {
    "name": "web1",
    "job_id": "0123456789abcdef",
    "source": {"platform": "kvm", "disks": ["/img/web1.qcow2"]},
    "target": {"platform": "kvm", "path": "/srv/replicas"},
    "schedule": {"interval": "PT1H"},
    "retention": {"points": 5},
    "tuning": {"bandwidth_limit": 1000, "connections": 4},
}


def test_a_valid_spec_reads_as_is() -> None:
    spec, problem = readable_spec({**STORED, "tuning": {"connections": 4}})
    assert problem is None and spec.tuning.connections == 4 and spec.retention.points == 5


def test_invalid_stored_settings_fall_back_to_defaults_and_are_named() -> None:
    spec, problem = readable_spec(STORED)
    assert problem == (
        "its stored settings are invalid (tuning.bandwidth_limit: bandwidth limit must be 1048576 (1 MiB/s) "
        "to 1099511627776 bytes/s); set them again with `sendense job settings`"
    )
    assert (spec.name, spec.job_id, str(spec.target.path)) == ("web1", "0123456789abcdef", "/srv/replicas")
    assert spec.tuning.bandwidth_limit is None and spec.tuning.connections == 8  # the section's defaults
    assert spec.retention.points == 5  # valid sections are kept
    spec, problem = readable_spec({**STORED, "schedule": {"interval": "PT0S"}, "tuning": {}})
    assert problem is not None and problem.startswith("its stored settings are invalid (schedule.interval: ")
    assert spec.schedule.interval.total_seconds() == 300


def test_job_status_shows_the_sources_notes_on_the_last_sync() -> None:
    """A source says what an operator should know about a sync (vSphere: change tracking was off and
    was enabled; a quiesce asked for without VMware Tools): `job status` lists each under the last sync."""
    from datetime import UTC, datetime

    from app.cli.client import JobView
    from app.cli.jobs import status_rows
    from sendense.models import SyncResult

    note = "change tracking (CBT) was off on VM web: enabled; it takes effect at this sync's snapshot"
    st = JobView(
        name="j",
        state="idle",
        source="vsphere:vc:web",
        target="kvm:/r",
        interval_seconds=3600,
        retention_points=3,
        last_sync=SyncResult(
            point_id="p1", kind="full", bytes_read=1, bytes_written=1, bytes_zeroed=0, seconds=1.0,
            created_at=datetime.now(UTC), notes=[note],
        ),
    )  # fmt: skip
    rows = status_rows(st)
    i = [k for k, _ in rows].index("last sync")
    assert rows[i + 1] == ("  note", note)
