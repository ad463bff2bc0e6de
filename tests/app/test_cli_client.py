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
