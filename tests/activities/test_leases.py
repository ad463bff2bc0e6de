"""The lease keeper (activities.leases): grants applied to the copy's throttle, the bytes it moved
reported, the last rate kept while the lease is valid and then the floor when the governor does not
answer; and the copy activities taking a lease only for a job on a link (the real activities on real
qcow2 images, a governor faked here: the real one is in tests/activities/test_link_shares.py)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from helpers_kvm import MiB, make_qcow2, qemu_io
from temporalio.testing import ActivityEnvironment

from activities import leases
from activities.leases import FLOOR_RATE, LeaseKeeper
from activities.replication import begin_and_copy, copy_disk
from connectors.kvm.spec import KvmSource, KvmTarget
from sendense.datapath.throttle import Throttle
from sendense.links import LeaseGrant, LeaseRelease, LeaseRequest
from sendense.models import CopyRequest, JobSpec, SnapshotRequest, Tuning


class FakeGovernor:
    def __init__(self, rate: int | None = 4 * MiB, valid_for: float = 4.0) -> None:
        self.rate, self.valid_for = rate, valid_for
        self.down = False
        self.leases: list[LeaseRequest] = []
        self.releases: list[LeaseRelease] = []
        self.lock = threading.Lock()

    def lease(self, link: str, req: LeaseRequest, timeout: float) -> LeaseGrant:
        assert link == "wan"
        if self.down:
            raise ConnectionError("server away")
        with self.lock:
            self.leases.append(req)
        return LeaseGrant(
            rate=self.rate, share=0.5, budget=None, priority=req.priority, valid_for=self.valid_for
        )

    def release(self, link: str, req: LeaseRelease, timeout: float) -> None:
        self.releases.append(req)


def keeper(gov: FakeGovernor | None, throttle: Throttle, period: float = 0.05) -> LeaseKeeper:
    return LeaseKeeper(
        "wan", "web", "critical", None, "web/x", throttle, gov, period=period, floor=FLOOR_RATE
    )


def wait_for(cond, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_grants_are_applied_and_bytes_reported() -> None:
    gov, t = FakeGovernor(rate=8 * MiB), Throttle(None)
    k = keeper(gov, t)
    k.start()
    assert t.rate == 8 * MiB  # the first lease before the copy starts
    t.consume(3 * MiB)
    gov.rate = 2 * MiB
    wait_for(lambda: t.rate == 2 * MiB)
    t.consume(1 * MiB)
    k.stop()
    reported = sum(r.bytes for r in gov.leases) + sum(r.bytes for r in gov.releases)
    assert reported == 4 * MiB and [r.holder for r in gov.releases] == ["web/x"]
    assert all((r.job, r.priority) == ("web", "critical") for r in gov.leases)


def test_no_answer_keeps_the_last_rate_while_valid_then_the_floor_then_recovers(caplog) -> None:  # type: ignore[no-untyped-def]
    gov, t = FakeGovernor(rate=50 * MiB, valid_for=0.6), Throttle(None)
    k = keeper(gov, t)
    with caplog.at_level(logging.WARNING, logger="activities.leases"):
        k.start()
        gov.down = True
        down_at = time.monotonic()
        time.sleep(0.3)
        assert t.rate == 50 * MiB  # still valid: the last grant holds
        wait_for(lambda: t.rate == FLOOR_RATE)
        assert time.monotonic() - down_at >= 0.5
        time.sleep(0.3)
        gov.down = False
        wait_for(lambda: t.rate == 50 * MiB)
        k.stop()
    said = [r.message for r in caplog.records if "does not answer" in r.message]
    assert len(said) == 1 and "copies at 1048576 bytes/s" in said[0], said


def test_no_governor_at_all_copies_at_the_floor() -> None:
    t = Throttle(None)
    k = keeper(None, t)
    k.start()
    assert t.rate == FLOOR_RATE
    k.stop()


# ----------------------------------------------------------------------- the copy activities


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobSpec:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    disks = [make_qcow2(tmp_path / "d0.qcow2", 16 * MiB), make_qcow2(tmp_path / "d1.qcow2", 16 * MiB)]
    qemu_io(disks[0], "write -P 0x11 0 1M")
    qemu_io(disks[1], "write -P 0x22 0 6M")
    return JobSpec(
        name="onlink",
        source=KvmSource(platform="kvm", disks=disks),
        target=KvmTarget(platform="kvm", path=tmp_path / "rep"),
        tuning=Tuning(chunk_size=256 << 10, connections=2, bandwidth_limit=64 * MiB),
        link="wan",
        priority="low",
    )


def test_copies_of_a_job_on_a_link_run_at_their_grant(job: JobSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    gov = FakeGovernor(rate=2 * MiB)
    monkeypatch.setattr(leases, "_attached", gov)
    env = ActivityEnvironment()
    begun = env.run(begin_and_copy, SnapshotRequest(spec=job, snapshot_id="s1", copy_up_to=2 * MiB))
    assert [r.key for r in begun.copied] == ["disk0"]  # inline, under a lease of its own
    assert len(gov.releases) == 1
    t0 = time.monotonic()
    env.run(copy_disk, CopyRequest(spec=job, sync_id="s1", snapshot=begun.snapshot, disk="disk1"))
    took = time.monotonic() - t0
    # 6 MiB at 2 MiB/s, the first 1 MiB from the bucket's start: at least 2.5 s
    assert took >= 2.4, took
    assert len(gov.releases) == 2
    assert {(r.job, r.priority, r.cap) for r in gov.leases} == {("onlink", "low", 64 * MiB)}
    # job / run / activity # attempt (ActivityEnvironment's ids: "test-run", "test")
    assert {r.holder for r in gov.releases} == {"onlink/test-run/test#1"}
    moved = sum(r.bytes for r in gov.leases) + sum(r.bytes for r in gov.releases)
    assert moved == 7 * MiB  # every data byte of both disks, reported


def test_a_job_without_a_link_takes_no_lease(job: JobSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    gov = FakeGovernor()
    monkeypatch.setattr(leases, "_attached", gov)
    spec = job.model_copy(update={"link": None})
    env = ActivityEnvironment()
    begun = env.run(begin_and_copy, SnapshotRequest(spec=spec, snapshot_id="s1", copy_up_to=64 * MiB))
    assert len(begun.copied) == 2 and gov.leases == [] and gov.releases == []
