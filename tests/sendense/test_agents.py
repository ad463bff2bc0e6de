"""sendense.agents: which fresh agent runs a VM, from the agents' announcements."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sendense.agents import FORGET, FRESH, Announcement, LocalVm, heard, locate

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
U = "6f1c2d3e-0000-4000-8000-000000000001"


def agent(host: str, *uuids: str, at: datetime = T0) -> Announcement:
    vms = [LocalVm(platform="kvm", vm_id=u, name="web", where=f"qemu+tls://{host}/system") for u in uuids]
    return Announcement(host_id=host, vms=vms, at=at)


def test_the_one_fresh_agent_that_runs_the_vm_is_found_with_its_address() -> None:
    found = locate([agent("a"), agent("b", U)], "kvm", U, T0 + timedelta(seconds=5))
    assert (found.host_id, found.where) == ("b", "qemu+tls://b/system")


def test_a_vm_of_another_platform_with_the_same_id_is_not_it() -> None:
    other = Announcement(host_id="b", vms=[LocalVm(platform="aws", vm_id=U)], at=T0)
    assert locate([other], "kvm", U, T0).host_id is None


def test_a_stale_agent_is_not_believed_and_is_named() -> None:
    found = locate([agent("a", U)], "kvm", U, T0 + FRESH + timedelta(seconds=1))
    assert found.host_id is None and "last seen on host a" in found.why


def test_two_agents_claiming_the_vm_keep_the_job_where_it_was() -> None:
    found = locate([agent("a", U), agent("b", U)], "kvm", U, T0)
    assert found.host_id is None and "hosts a, b" in found.why


def test_the_registry_keeps_the_latest_word_of_each_agent_and_forgets_the_long_gone() -> None:
    table = heard({}, agent("a", U, at=None), T0)  # type: ignore[arg-type]
    table = heard(table, agent("b"), T0 + timedelta(seconds=10))
    assert table["a"].at == T0 and table["b"].at == T0 + timedelta(seconds=10)
    table = heard(table, agent("a"), T0 + timedelta(seconds=20))  # it stopped running the VM
    assert table["a"].vms == []
    table = heard(table, agent("c"), T0 + timedelta(seconds=20) + FORGET + timedelta(seconds=1))
    assert sorted(table) == ["c"]
