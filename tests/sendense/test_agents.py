"""sendense.agents: which fresh agent runs a VM, from the agents' announcements."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sendense.agents import FORGET, FRESH, Announcement, LocalVm, Located, alive, heard, locate

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


def test_a_host_a_platform_api_names_is_taken_only_while_its_agent_is_fresh() -> None:
    """A CloudStack VM's host comes from the API (Platform.locate); a sync placed on a host with no
    live agent would wait for one forever, so that host's agent must have been heard from lately."""
    asked = Located(host_id="kvm-2")
    assert alive([agent("kvm-1"), agent("kvm-2")], asked, T0 + timedelta(seconds=5)) == asked
    stale = alive([agent("kvm-2")], asked, T0 + FRESH + timedelta(seconds=1))
    assert (
        stale.host_id is None and "host kvm-2, whose agent was not heard from in the last 60 s" in stale.why
    )
    assert alive([agent("kvm-1")], asked, T0).host_id is None  # no agent on that host at all
    nowhere = Located(why="CloudStack VM web is Stopped, on no host")
    assert alive([agent("kvm-1")], nowhere, T0) == nowhere


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


def test_steps_run_on_the_control_queue_for_cloud_ends_and_a_cloud_target_goes_with_its_writer() -> None:
    """platforms.queues: a cloud source's steps on the control queue (its copy on the target's agent);
    a cloud target written from a source agent runs its steps there (its writer's records); a disk or
    hypervisor end on its host's agent (this machine's when it names none)."""
    from connectors.aws.spec import AwsSource, AwsTarget
    from connectors.kvm.spec import KvmSource, KvmTarget
    from sendense import config
    from sendense.models import JobSpec
    from sendense.platforms import queues

    aws_s = AwsSource(platform="aws", region="us-east-1", instance_id="i-0123456789abcdef0")
    aws_t = AwsTarget(platform="aws", region="us-east-1")
    kvm_s = KvmSource(platform="kvm", disks=["/srv/vm/a.qcow2"])
    kvm_t = KvmTarget(platform="kvm", path="/srv/replicas")

    def q(source: object, target: object) -> tuple[str, str]:
        return queues(JobSpec(name="j", source=source, target=target))  # type: ignore[arg-type]

    here, ctl = config.host_queue(), config.CONTROL_QUEUE
    assert q(aws_s, aws_t) == (ctl, ctl)
    assert q(aws_s, kvm_t) == (ctl, here)
    assert q(kvm_s, aws_t) == (here, here)
    assert q(kvm_s.model_copy(update={"host": "site-a"}), aws_t) == ("host-site-a", "host-site-a")
    assert q(kvm_s, kvm_t.model_copy(update={"host": "site-b"})) == (here, "host-site-b")
    assert q(aws_s.model_copy(update={"host": "site-a"}), aws_t) == ("host-site-a", "host-site-a")


def test_a_libvirt_uri_with_a_password_is_never_announced(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """SENDENSE_KVM_LIBVIRT_URIS holding a password: not listed, not opened, said without the password."""
    import pytest

    from connectors.kvm.inventory import local_vms
    from sendense.errors import ResourceUnavailable

    monkeypatch.setenv("SENDENSE_KVM_LIBVIRT_URIS", "qemu+ssh://root:hunter2@kvm1/system")
    with pytest.raises(ResourceUnavailable) as e:
        local_vms()
    assert "entry 1" in str(e.value) and "hunter2" not in str(e.value), e.value


def test_a_moved_source_at_an_address_the_spec_refuses_stays_where_it_was() -> None:
    """KvmSource.moved validates the announced URI (the workflow keeps the job where it was on refusal)."""
    import pytest

    from connectors.kvm.spec import KvmSource

    src = KvmSource(platform="kvm", libvirt={"uri": "qemu:///system", "domain": "web", "uuid": U})
    assert src.moved("b", "qemu+tls://b/system").libvirt.uri == "qemu+tls://b/system"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        src.moved("b", "qemu+ssh://root:hunter2@b/system")
