"""Shared pieces of the benchmark: the embedded stack on free ports, jobs, RSS/CPU sampling, statistics.

Every measure gets a `Bench` context: one embedded stack (a real Temporal dev server and a real worker
process) in a temporary SENDENSE_HOME, a scratch directory, the options, and the results so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from temporalio.api.enums.v1 import EventType

from app import stack
from app.cli.client import Jobs
from connectors.kvm.spec import KvmSource, KvmTarget
from sendense.models import JobSpec, Schedule, SyncResult, Tuning

log = logging.getLogger(__name__)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def parse_size(text: str) -> int:
    """`2G`, `512M`, `64k`, or plain bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": GiB << 10}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "KMGT" else t) * mult)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mib(n: float) -> float:
    return round(n / MiB, 2)


# --------------------------------------------------------------------------------------- processes


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants."""
    return sum(split_cpu_seconds(pid))


def split_cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process's own CPU seconds, those of its reaped children and live descendants)."""
    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        kids = t.children_user + t.children_system
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                ct = c.cpu_times()
                kids += ct.user + ct.system
        return t.user + t.system, kids
    except psutil.Error:
        return 0.0, 0.0


def job_id(name: str) -> str:
    """A bench job's identity (its replicas carry it; the bench reads them back with it)."""
    return f"bench-{name}"


class RssSampler:
    """Samples RSS of a process (and separately of its descendants) every `interval` seconds."""

    def __init__(self, pid_fn: Callable[[], int | None], interval: float = 0.1) -> None:
        self.pid_fn, self.interval = pid_fn, interval
        self.peak_self = self.peak_children = self.peak_total = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _sample(self) -> None:
        pid = self.pid_fn()
        if not pid:
            return
        try:
            p = psutil.Process(pid)
            own = p.memory_info().rss
            kids = 0
            for c in p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kids += c.memory_info().rss
        except psutil.Error:
            return
        self.samples += 1
        self.peak_self = max(self.peak_self, own)
        self.peak_children = max(self.peak_children, kids)
        self.peak_total = max(self.peak_total, own + kids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def report(self) -> dict[str, float]:
        return {
            "worker_peak_rss_mib": mib(self.peak_self),
            "children_peak_rss_mib": mib(self.peak_children),
            "worker_and_children_peak_rss_mib": mib(self.peak_total),
        }


# ------------------------------------------------------------------------------------------- bench


def write_policy(state: Path, root: Path) -> Path:
    """The bench agent's policy (sendense.policy): every image and target of a measure lives under
    `root`; the AWS lab's endpoint is allowed once the lab registers it. Without it the stack writes its
    starter policy, whose roots are the stack's own `lab/` and `replicas/`: every bench job refused."""
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    p = state / "policy.yaml"
    roots = [str(root)]
    doc = {
        "platforms": ["kvm", "aws", "vsphere"],
        "source_roots": roots,
        "target_roots": roots,
        "endpoints": [],
    }
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    p.chmod(0o600)
    return p


@dataclass
class Options:
    quick: bool = False
    size: int = 2 * GiB
    runs: int = 3
    only: list[str] = field(default_factory=list)
    jobs: list[int] = field(default_factory=lambda: [50, 100])


@dataclass
class Bench:
    """One embedded stack and a scratch directory shared by every measure of a run."""

    opts: Options
    root: Path
    state: Path
    host_id: str
    jobs: Jobs | None = None
    results: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # handed between measures, not reported
    _env: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def start(cls, opts: Options) -> Iterator[Bench]:
        root = Path(tempfile.mkdtemp(prefix="sendense-bench-"))
        state = root / "home"
        host = f"bench{os.getpid()}"
        b = cls(opts=opts, root=root, state=state, host_id=host)
        b._env = {
            k: os.environ.get(k)
            for k in ("SENDENSE_HOME", "SENDENSE_HOST_ID", "SENDENSE_TEMPORAL", "SENDENSE_POLICY", "TMPDIR")
        }
        # the worker's temp dirs (qemu-nbd sockets) land in `root` too: a SIGKILLed worker leaks them
        (root / "tmp").mkdir()
        os.environ.update(
            SENDENSE_HOME=str(state),
            SENDENSE_HOST_ID=host,
            SENDENSE_POLICY=str(write_policy(state, root)),
            TMPDIR=str(root / "tmp"),
        )
        os.environ.pop("SENDENSE_TEMPORAL", None)
        try:
            stack.up(state, port=free_port(), ui_port=free_port())
            yield b
        finally:
            try:
                stack.down(state)
            finally:
                for k, v in b._env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                shutil.rmtree(root, ignore_errors=True)

    # ------------------------------------------------------------------ worker

    def worker_pid(self) -> int | None:
        pid = stack.status(self.state).get("worker_pid")
        return int(pid) if pid else None

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ------------------------------------------------------------------ jobs

    async def client(self) -> Jobs:
        if self.jobs is None:
            self.jobs = await Jobs.connect()
        return self.jobs

    def spec(self, name: str, disks: list[Path], target: Path, **tuning: Any) -> JobSpec:
        return JobSpec(
            name=name,
            job_id=job_id(name),
            source=KvmSource(platform="kvm", disks=disks),
            target=KvmTarget(platform="kvm", path=target),
            schedule=Schedule(interval="1h"),  # type: ignore[arg-type]
            tuning=Tuning(**tuning),
        )

    async def create(self, spec: JobSpec) -> None:
        jobs = await self.client()
        await jobs.create(spec)

    async def wait_syncs(
        self, name: str, count: int = 1, timeout: float = 600, poll: float = 0.2
    ) -> SyncResult:
        """Wait until the job has committed `count` syncs; return its last SyncResult."""
        jobs = await self.client()
        deadline = time.monotonic() + timeout
        while True:
            st = await jobs.status(name)
            if st.syncs >= count and st.state != "syncing" and st.last_sync is not None:
                return st.last_sync
            if st.failures:
                raise RuntimeError(f"job {name}: sync failed: {st.last_error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {name}: {count} syncs not done within {timeout:.0f}s ({st.state})")
            await asyncio.sleep(poll)

    async def wait_point(self, name: str, target: Path, count: int = 1, timeout: float = 600) -> SyncResult:
        """Like wait_syncs, but watches the target's point manifests instead of querying the job.

        A status query runs in the worker (a workflow task in its sandbox): polled at 10 Hz during a
        2 GiB full sync it made the copy ~20% slower. The manifests cost the worker nothing.
        """
        points = target / name / "points"
        deadline = time.monotonic() + timeout
        while len(list(points.glob("*.json"))) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {name}: {count} points not committed within {timeout:.0f}s")
            await asyncio.sleep(0.02)
        return await self.wait_syncs(name, count, timeout=60, poll=0.05)

    async def delete(self, name: str, purge: bool = True) -> None:
        jobs = await self.client()
        with contextlib.suppress(Exception):
            await jobs.delete(name, purge=purge)

    async def copy_activities(self, name: str) -> list[dict[str, Any]]:
        """Every completed copy_disk of the job's current run: result, attempt and own duration.

        The duration is the last attempt's ActivityTaskStarted -> ActivityTaskCompleted event times.
        """
        jobs = await self.client()
        h = jobs.handle(name)
        scheduled: dict[int, str] = {}
        started: dict[int, tuple[float, int]] = {}
        out: list[dict[str, Any]] = []
        async for ev in h.fetch_history_events():
            t = ev.event_time.ToDatetime().timestamp()
            if ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                scheduled[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
            elif ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                a = ev.activity_task_started_event_attributes
                started[a.scheduled_event_id] = (t, a.attempt)
            elif ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                attrs = ev.activity_task_completed_event_attributes
                if scheduled.get(attrs.scheduled_event_id) != "copy_disk":
                    continue
                vals = await jobs.client.data_converter.decode(list(attrs.result.payloads))
                t0, attempt = started.get(attrs.scheduled_event_id, (t, 1))
                out.append(
                    {"result": vals[0], "attempt": attempt, "seconds": t - t0, "started": t0, "completed": t}
                )
        return out


def remove_job_bitmaps(image: Path, job: str) -> None:
    """Drop the bitmaps a deleted job left on a source image (a deleted job never releases them)."""
    from bench.images import bitmaps, run

    for name in bitmaps(image):
        if name.startswith(f"sendense.{job}."):
            run("qemu-img", "bitmap", "--remove", image, name)
