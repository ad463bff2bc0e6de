"""The source power contract (sendense.protocols.SourcePower), the same test for every source platform:
made by the registry from the rig's job, a failover's sequence (pause, power off) and a failback's
(power on where `can_power_on`, else VmNotStartable at once), every verb repeated as a no-op."""

from __future__ import annotations

import pytest
from contract.rigs import Rig

from connectors.aws.power import AwsSourcePower
from connectors.cloudstack.power import CloudStackSourcePower
from sendense.errors import VmNotStartable
from sendense.platforms import source_power_for
from sendense.protocols import POWER_STATES, SourcePower


def test_pause_power_off_and_on_follow_the_contract(source_rig: Rig) -> None:
    p = source_power_for(source_rig.spec(), source_rig.work)
    assert isinstance(p, SourcePower)
    if isinstance(p, AwsSourcePower | CloudStackSourcePower):
        p.poll_seconds = 0.05
    first = p.power_state()
    assert first in POWER_STATES and first not in ("gone", "unreachable")
    if first == "paused":  # (the lab QEMU starts with its vCPUs stopped)
        p.resume_vm()
        assert p.power_state() == "running"
    stopped_form = first == "stopped"  # a VM known by its disks: nothing runs

    for _ in range(2):
        p.pause_vm()
        assert p.power_state() == ("stopped" if p.pause_stops or stopped_form else "paused")
    if not stopped_form:
        p.resume_vm()
        assert p.power_state() == "running"
        p.pause_vm()
    for _ in range(2):
        p.power_off_vm()
        assert p.power_state() == "stopped"

    if not p.can_power_on:
        with pytest.raises(VmNotStartable) as e:
            p.power_on_vm()
        assert "\n" not in str(e.value) and "operator's" in str(e.value)
        return
    for _ in range(2):
        p.power_on_vm()
        assert p.power_state() == "running"
    p.power_off_vm()
