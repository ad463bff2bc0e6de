"""The memory source VM's power (connectors/memory/power.py): its state in the store, guest writes refused
while it is paused or stopped, every verb idempotent, faults before and after each verb's effect."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.memory.faults import InjectedFault
from connectors.memory.power import MemorySourcePower
from connectors.memory.source import MemorySourceConnector
from connectors.memory.spec import MemorySource, MemoryTarget
from connectors.memory.store import GuestHalted, Store
from sendense.errors import ResourceNotFound, ResourceUnavailable, VmNotStartable
from sendense.models import JobSpec
from sendense.platforms import source_power_for
from sendense.protocols import SourcePower


@pytest.fixture(params=["memory", "files"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store.named(f"p-{uuid.uuid4().hex[:8]}") if request.param == "memory" else Store.at(tmp_path / "st")
    s.create_vm("vm", {"d0": 1 << 20})
    yield s
    Store.discard(s)


def spec(store: Store) -> MemorySource:
    place = {"directory": Path(store.name)} if store.name.startswith("/") else {"store": store.name}
    return MemorySource(platform="memory", vm="vm", **place)  # type: ignore[arg-type]


def power(store: Store) -> MemorySourcePower:
    p = source_power_for(
        JobSpec(name="j", source=spec(store), target=MemoryTarget(platform="memory")), Path("/x")
    )
    assert isinstance(p, MemorySourcePower) and isinstance(p, SourcePower)
    return p


def test_pause_stops_guest_writes_resume_lets_them_land_each_verb_idempotent(store: Store) -> None:
    p, guest = power(store), store.guest("vm")
    assert p.power_state() == "running" and p.can_power_on and not p.pause_stops
    guest.write("d0", 0, b"a" * 4096)
    p.pause_vm()
    p.pause_vm()
    assert p.power_state() == "paused"
    with pytest.raises(GuestHalted, match="VM vm .* is paused: its guest cannot write"):
        guest.write("d0", 0, b"b" * 4096)
    for halted in (lambda: guest.zero("d0", 0, 512), lambda: guest.resize("d0", 2 << 20)):
        with pytest.raises(GuestHalted):
            halted()
    assert guest.read("d0", 0, 4096) == b"a" * 4096 and guest.size("d0") == 1 << 20  # nothing landed
    p.resume_vm()
    p.resume_vm()
    assert p.power_state() == "running"
    guest.write("d0", 0, b"c" * 4096)
    assert guest.read("d0", 0, 4096) == b"c" * 4096


def test_power_off_and_on_from_any_state_and_no_errors_where_nothing_is_to_do(store: Store) -> None:
    p = power(store)
    p.pause_vm()
    p.power_off_vm()
    assert p.power_state() == "stopped"
    p.power_off_vm()
    p.pause_vm()  # stopped: nothing writes, nothing to pause
    p.resume_vm()  # stopped, not paused: stays stopped
    assert p.power_state() == "stopped"
    with pytest.raises(GuestHalted, match="is stopped"):
        store.guest("vm").write("d0", 0, b"x")
    p.power_on_vm()
    p.power_on_vm()
    assert p.power_state() == "running"
    store.set_power("vm", "paused")
    p.power_on_vm()  # a paused VM is resumed
    assert p.power_state() == "running"


def test_gone_unreachable_and_not_startable(store: Store) -> None:
    p = power(store)
    store.set_power("vm", startable=False)
    assert not p.can_power_on
    p.power_off_vm()
    with pytest.raises(VmNotStartable) as e:
        p.power_on_vm()
    assert (
        "\n" not in str(e.value)
        and "operator's to start" in str(e.value)
        and e.value.kind == "VmNotStartable"
    )
    assert p.power_state() == "stopped"

    store.set_power("vm", reachable=False)
    assert p.power_state() == "unreachable"
    for verb in (p.pause_vm, p.resume_vm, p.power_off_vm, p.power_on_vm):
        with pytest.raises(ResourceUnavailable) as u:
            verb()
        assert u.value.retryable
    src = MemorySourceConnector("j", spec(store))
    with pytest.raises(ResourceUnavailable, match="unreachable"):
        src.validate()
    store.set_power("vm", reachable=True)
    src.validate()

    store.delete_vm("vm")
    assert p.power_state() == "gone"
    p.pause_vm()
    p.resume_vm()
    p.power_off_vm()
    with pytest.raises(ResourceNotFound, match="nothing to start"):
        p.power_on_vm()


def test_faults_before_and_after_the_effect_and_a_power_state_fault_is_unreachable(store: Store) -> None:
    p = power(store)
    store.faults.fail("source.power_state")
    assert p.power_state() == "unreachable"
    assert p.power_state() == "running"

    store.faults.fail("source.pause_vm")
    with pytest.raises(InjectedFault, match="source.pause_vm"):
        p.pause_vm()
    assert p.power_state() == "running"  # failed before its effect
    store.faults.fail("source.pause_vm", after_effect=True)
    with pytest.raises(InjectedFault, match="after its effect"):
        p.pause_vm()
    assert p.power_state() == "paused"  # the effect stands; a retry is a no-op
    p.pause_vm()

    for verb, end in (("resume_vm", "running"), ("power_off_vm", "stopped"), ("power_on_vm", "running")):
        store.faults.fail(f"source.{verb}", after_effect=True)
        with pytest.raises(InjectedFault):
            getattr(p, verb)()
        assert p.power_state() == end
        getattr(p, verb)()
    assert store.faults.calls["source.power_on_vm"] == 2
