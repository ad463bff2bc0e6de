"""Worker process: serves the control queue and this host's own queue.

Run in the foreground with `sendense worker` (or `python -m workers.worker`). The Temporal address,
namespace, TLS and the payload key come from the environment (see sendense.config); without a
payload key (SENDENSE_CODEC_KEY, default SENDENSE_HOME/codec.key) it refuses to start, in one line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import signal
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client, TLSConfig
from temporalio.converter import PayloadCodec
from temporalio.worker import Worker

from activities import exports, leases
from activities.failback import FAILBACK_ACTIVITIES
from activities.placement import Placement, announce_forever
from activities.plans import PLAN_ACTIVITIES, JobOperations
from activities.recovery import RECOVERY_ACTIVITIES
from activities.replication import HOST_ACTIVITIES
from sendense import config, policy
from sendense.errors import NotAllowed, ServerUnreachable
from workers.codec import CodecError, data_converter, load_codec
from workflows.agents import AgentRegistryWorkflow
from workflows.drill import DrillWorkflow
from workflows.failback import FailbackWorkflow
from workflows.failover import FailoverWorkflow
from workflows.governor import LinkGovernorWorkflow
from workflows.plan import PlanDrillWorkflow, PlanFailbackWorkflow, PlanFailoverWorkflow, PlanWorkflow
from workflows.replication import ReplicationWorkflow

log = logging.getLogger(__name__)


def tls_config(cfg: config.TemporalConfig) -> TLSConfig | bool:
    """Client TLS from SENDENSE_TLS_*: the CA that signed the server's certificate, this agent's
    certificate and key (mTLS), and the name the server's certificate must carry."""
    if not (cfg.tls_cert or cfg.tls_ca or cfg.tls_key):
        return False
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ServerUnreachable("SENDENSE_TLS_CERT and SENDENSE_TLS_KEY go together: set both or neither")

    def read(var: str, path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ServerUnreachable(f"{var} {path}: {e.strerror}") from None

    return TLSConfig(
        server_root_ca_cert=read("SENDENSE_TLS_CA", cfg.tls_ca),
        client_cert=read("SENDENSE_TLS_CERT", cfg.tls_cert),
        client_private_key=read("SENDENSE_TLS_KEY", cfg.tls_key),
        domain=cfg.tls_server_name,
    )


async def connect(cfg: config.TemporalConfig | None = None, codec: PayloadCodec | None = None) -> Client:
    """A client of the configured server whose payloads are encrypted (workers.codec) with the
    configured key. No key: refused in one line (after the server's reachability, which is the more
    useful thing to hear first)."""
    cfg = cfg or config.temporal_config()
    tls = tls_config(cfg)
    missing: CodecError | None = None
    if codec is None:
        try:
            codec = load_codec()
        except CodecError as e:
            missing = e
    try:
        client = await Client.connect(
            cfg.address, namespace=cfg.namespace, tls=tls, data_converter=data_converter(codec)
        )
    except Exception as e:
        if tls:
            raise ServerUnreachable(
                f"Temporal server at {cfg.address} is not reachable over TLS ({_tls_reason(e)}); "
                "check SENDENSE_TEMPORAL and SENDENSE_TLS_CA/CERT/KEY/SERVER_NAME"
            ) from None
        raise ServerUnreachable(
            f"Temporal server at {cfg.address} is not reachable; start the embedded stack with "
            "'sendense up' (or set SENDENSE_TEMPORAL)"
        ) from None
    if missing is not None:
        raise missing
    return client


def _tls_reason(e: Exception) -> str:
    """What the TLS layer said, in a few words (the client's error is a multi-line chain)."""
    text = " ".join(str(e).split()).lower()
    for needle, reason in (
        ("certificaterequired", "the server requires a client certificate"),
        ("certificate required", "the server requires a client certificate"),
        ("unknownca", "the server does not trust this client certificate"),
        ("unknown ca", "the server does not trust this client certificate"),
        ("badcertificate", "the server refused the client certificate"),
        ("bad certificate", "the server refused the client certificate"),
        ("notvalidforname", "the server's certificate is not for this name (SENDENSE_TLS_SERVER_NAME)"),
        ("invalidcertificate", "the server's certificate is not trusted (SENDENSE_TLS_CA)"),
        ("certificate verify failed", "the server's certificate is not trusted (SENDENSE_TLS_CA)"),
        ("unknownissuer", "the server's certificate is not trusted (SENDENSE_TLS_CA)"),
    ):
        if needle in text:
            return reason
    return "handshake or connection failed"


ROLES = ("all", "host", "control")


def build_workers(
    client: Client, host: str | None = None, max_activities: int = 32, role: str = "all"
) -> list[Worker]:
    """The workers of an agent: `control` runs the workflows (and the plan's job operations) on the
    control queue; `host` runs the activities that touch this host's disks and platforms on its own
    queue (host-<id>); `all` both (one machine, or a small site)."""
    try:  # copies of jobs on a link lease their share from its governor through this client
        leases.attach(leases.Governors(client, asyncio.get_running_loop()))
    except RuntimeError:  # (no event loop runs here: such copies run at leases.FLOOR_RATE, said once)
        pass
    workers: list[Worker] = []
    if role in ("all", "control"):
        workers.append(_control_worker(client, max_activities))
    if role in ("all", "host"):
        workers.append(_host_worker(client, host, max_activities))
    return workers


def _control_worker(client: Client, max_activities: int) -> Worker:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_activities, thread_name_prefix="control")
    ops = JobOperations(client)
    return Worker(
        client,
        task_queue=config.CONTROL_QUEUE,
        workflows=[
            ReplicationWorkflow,
            DrillWorkflow,
            FailoverWorkflow,
            FailbackWorkflow,
            PlanWorkflow,
            PlanDrillWorkflow,
            PlanFailoverWorkflow,
            PlanFailbackWorkflow,
            LinkGovernorWorkflow,
            AgentRegistryWorkflow,
        ],
        # a plan's failover and failback act on its jobs through their workflows (async); the steps of
        # ends reached by API (AWS, vSphere with no `host`: platforms.queue_of) run here too
        activities=[
            ops.failover_job,
            ops.failback_job,
            Placement(client).locate_source,
            *HOST_ACTIVITIES,
            *RECOVERY_ACTIVITIES,
            *FAILBACK_ACTIVITIES,
        ],
        activity_executor=pool,
        max_concurrent_activities=max_activities,
        max_heartbeat_throttle_interval=timedelta(seconds=1),
        default_heartbeat_throttle_interval=timedelta(seconds=1),
        max_concurrent_workflow_tasks=100,
        # after a worker restart, its workflows move to the new worker in 3 s instead of the default 10 s
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=3),
    )


def _host_worker(client: Client, host: str | None, max_activities: int) -> Worker:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_activities, thread_name_prefix="activity")
    return Worker(
        client,
        task_queue=config.host_queue(host),
        activities=[*HOST_ACTIVITIES, *RECOVERY_ACTIVITIES, *FAILBACK_ACTIVITIES, *PLAN_ACTIVITIES],
        activity_executor=pool,
        max_concurrent_activities=max_activities,
        # resume tokens reach the server within a second, so a killed worker re-copies little
        max_heartbeat_throttle_interval=timedelta(seconds=1),
        default_heartbeat_throttle_interval=timedelta(seconds=1),
    )


async def serve(role: str = "all") -> None:
    if role not in ROLES:
        raise NotAllowed(f"--role {role}: one of {', '.join(ROLES)}")
    if role != "control":
        pol = policy.current()  # an agent without a (valid) policy does not start: it would refuse every job
        log.info(
            "agent policy %s: platforms %s; source roots %s; target roots %s",
            policy.path(),
            ", ".join(pol.platforms),
            ", ".join(map(str, pol.source_roots)),
            ", ".join(map(str, pol.target_roots)),
        )
    client = await connect()
    data = exports.start_server() if role != "control" else None  # (SENDENSE_DATA_LISTEN: other agents read)
    try:
        workers = build_workers(client, role=role)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        queues = [w.task_queue for w in workers]
        log.info(
            "worker (role %s) serving %s%s",
            role,
            " and ".join(queues),
            f"; source disks to other agents at {exports.advertised()}" if data else "",
        )
        async with contextlib.AsyncExitStack() as stack:
            for w in workers:
                await stack.enter_async_context(w)
            # a host agent tells the registry it runs, and which VMs (a job follows its VM here)
            announcing = (
                asyncio.create_task(announce_forever(client, exports.advertised() if data else None))
                if role != "control"
                else None
            )
            await stop.wait()
            if announcing is not None:
                announcing.cancel()
    finally:
        exports.stop_server()
    log.info("worker stopped")


def _steady_heap() -> None:
    """Keep freed copy buffers in the heap (glibc): fresh mmaps would page-fault every chunk again."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(role: str = "all") -> None:
    _steady_heap()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(role))
    except (ServerUnreachable, NotAllowed, CodecError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    except ValueError as e:  # a malformed SENDENSE_DATA_LISTEN / _ADVERTISE
        log.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
