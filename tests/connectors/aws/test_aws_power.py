"""The AWS source instance's power (connectors/aws/power.py) against the AWS lab, whose instances really
run (a QEMU VM per running instance: StopInstances kills it, StartInstances boots a new one) and, with a
state delay, stay `stopping` (the VM still running) and `pending` as EC2's do."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.aws.power import AwsSourcePower
from connectors.aws.spec import AwsSource
from connectors.memory.spec import MemoryTarget
from labs.aws import AwsLab
from sendense.errors import ResourceNotFound
from sendense.models import JobSpec
from sendense.platforms import source_power_for
from sendense.protocols import SourcePower


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def instance(aws_lab: AwsLab) -> Iterator[str]:
    inst = aws_lab.make_instance(f"p-{uuid.uuid4().hex[:6]}", [1])
    yield inst.instance_id
    aws_lab.set_instance_state_delay(0)
    aws_lab.clear_faults()
    aws_lab.client("ec2").terminate_instances(InstanceIds=[inst.instance_id])


def spec(lab: AwsLab, instance_id: str, endpoint: str | None = None) -> AwsSource:
    return AwsSource(
        platform="aws", region=lab.region, endpoint_url=endpoint or lab.endpoint_url, instance_id=instance_id
    )


def power(lab: AwsLab, instance_id: str) -> AwsSourcePower:
    p = AwsSourcePower("j", spec(lab, instance_id))
    p.poll_seconds = 0.05
    return p


def ec2_state(lab: AwsLab, instance_id: str) -> str:
    res = lab.client("ec2").describe_instances(InstanceIds=[instance_id])
    return str(res["Reservations"][0]["Instances"][0]["State"]["Name"])


def calls(lab: AwsLab, op: str) -> int:
    return lab.stats().get(op, 0)


def test_the_registry_makes_it_and_it_is_a_source_power(aws_lab: AwsLab, instance: str) -> None:
    job = JobSpec(name="j", source=spec(aws_lab, instance), target=MemoryTarget(platform="memory"))
    p = source_power_for(job, Path("/nonexistent"))
    assert isinstance(p, SourcePower) and isinstance(p, AwsSourcePower)
    assert p.can_power_on and p.pause_stops


def test_pause_stops_the_instance_and_its_vm_resume_boots_it_again_each_verb_idempotent(
    aws_lab: AwsLab, instance: str
) -> None:
    p = power(aws_lab, instance)
    first = aws_lab.vm(instance)["pid"]
    assert p.power_state() == "running" and alive(first)

    t0 = time.monotonic()
    p.pause_vm()
    print(f"aws lab pause_vm (StopInstances, waited): {time.monotonic() - t0:.2f} s")
    assert ec2_state(aws_lab, instance) == "stopped" and p.power_state() == "stopped"
    assert not alive(first) and not aws_lab.vm(instance)["running"]  # nothing left to write
    stops = calls(aws_lab, "StopInstances")
    p.pause_vm()  # paused (stopped) already: no call, no error
    assert calls(aws_lab, "StopInstances") == stops and p.power_state() == "stopped"

    p.resume_vm()
    second = aws_lab.vm(instance)["pid"]
    assert ec2_state(aws_lab, instance) == "running" and alive(second) and second != first
    starts = calls(aws_lab, "StartInstances")
    p.resume_vm()
    assert calls(aws_lab, "StartInstances") == starts and aws_lab.vm(instance)["pid"] == second

    t0 = time.monotonic()
    p.power_off_vm()
    print(f"aws lab power_off_vm: {time.monotonic() - t0:.2f} s")
    assert p.power_state() == "stopped" and not alive(second)
    p.power_off_vm()
    assert calls(aws_lab, "StopInstances") == stops + 1

    t0 = time.monotonic()
    p.power_on_vm()
    print(f"aws lab power_on_vm (StartInstances, waited): {time.monotonic() - t0:.2f} s")
    third = aws_lab.vm(instance)["pid"]
    assert p.power_state() == "running" and alive(third)
    p.power_on_vm()
    assert aws_lab.vm(instance)["pid"] == third and calls(aws_lab, "StartInstances") == starts + 1


def test_a_pause_returns_only_once_the_instance_is_stopped_and_a_start_once_it_runs(
    aws_lab: AwsLab, instance: str
) -> None:
    """While `stopping` the instance's VM still runs (its guest writes): a pause that returned then
    would let writes land after the final sync."""
    aws_lab.set_instance_state_delay(1.0)
    p = power(aws_lab, instance)
    first = aws_lab.vm(instance)["pid"]
    p.pause_vm()
    assert ec2_state(aws_lab, instance) == "stopped" and not alive(first)
    p.power_on_vm()
    assert ec2_state(aws_lab, instance) == "running" and alive(aws_lab.vm(instance)["pid"])
    p.power_off_vm()
    assert ec2_state(aws_lab, instance) == "stopped"
    p.resume_vm()
    assert ec2_state(aws_lab, instance) == "running"


def test_a_stop_that_does_not_end_is_forced(aws_lab: AwsLab, instance: str) -> None:
    aws_lab.set_instance_state_delay(600)  # a guest that never finishes shutting down
    p = power(aws_lab, instance)
    p.force_after = 0.2
    first = aws_lab.vm(instance)["pid"]
    p.power_off_vm()
    assert ec2_state(aws_lab, instance) == "stopped" and not alive(first)


def test_a_start_into_a_stopping_instance_waits_for_the_stop_then_starts(
    aws_lab: AwsLab, instance: str
) -> None:
    aws_lab.set_instance_state_delay(0.5)
    aws_lab.client("ec2").stop_instances(InstanceIds=[instance])
    p = power(aws_lab, instance)
    assert p.power_state() == "running"  # stopping: it may still write
    p.power_on_vm()  # (EC2 refuses StartInstances while stopping)
    assert ec2_state(aws_lab, instance) == "running" and alive(aws_lab.vm(instance)["pid"])


def test_an_unreachable_or_failing_endpoint_is_unreachable_in_bounded_time(
    aws_lab: AwsLab, instance: str
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = AwsSourcePower("j", spec(aws_lab, instance, f"http://127.0.0.1:{port}"))
    assert dead.power_state() == "unreachable"

    aws_lab.inject("DescribeInstances", "InternalError", count=1)  # a 500: no retry for a power state
    assert power(aws_lab, instance).power_state() == "unreachable"
    assert power(aws_lab, instance).power_state() == "running"


def test_a_terminated_instance_is_gone_pause_and_off_are_no_errors_start_says_so_in_one_line(
    aws_lab: AwsLab, instance: str
) -> None:
    ec2: Any = aws_lab.client("ec2")
    ec2.terminate_instances(InstanceIds=[instance])
    p = power(aws_lab, instance)
    assert p.power_state() == "gone"
    p.pause_vm()
    p.resume_vm()
    p.power_off_vm()
    with pytest.raises(ResourceNotFound) as e:
        p.power_on_vm()
    assert "\n" not in str(e.value) and instance in str(e.value) and "terminated" in str(e.value)
    unknown = power(aws_lab, "i-0123456789abcdef0")
    assert unknown.power_state() == "gone"
