"""Worker process: serves the control queue and this host's own queue.

Run in the foreground with `sendense worker` (or `python -m workers.worker`). The Temporal address,
namespace and TLS come from the environment (see sendense.config).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import signal
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client, TLSConfig
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities.replication import HOST_ACTIVITIES
from sendense import config, policy
from sendense.errors import NotAllowed, ServerUnreachable
from workflows.replication import ReplicationWorkflow

log = logging.getLogger(__name__)


async def connect(cfg: config.TemporalConfig | None = None) -> Client:
    cfg = cfg or config.temporal_config()
    tls: TLSConfig | bool = False
    if cfg.tls_cert or cfg.tls_ca:
        tls = TLSConfig(
            server_root_ca_cert=Path(cfg.tls_ca).read_bytes() if cfg.tls_ca else None,
            client_cert=Path(cfg.tls_cert).read_bytes() if cfg.tls_cert else None,
            client_private_key=Path(cfg.tls_key).read_bytes() if cfg.tls_key else None,
        )
    try:
        return await Client.connect(
            cfg.address, namespace=cfg.namespace, tls=tls, data_converter=pydantic_data_converter
        )
    except Exception:
        raise ServerUnreachable(
            f"Temporal server at {cfg.address} is not reachable; start the embedded stack with "
            "'sendense up' (or set SENDENSE_TEMPORAL)"
        ) from None


def build_workers(client: Client, host: str | None = None, max_activities: int = 32) -> list[Worker]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_activities, thread_name_prefix="activity")
    control = Worker(
        client,
        task_queue=config.CONTROL_QUEUE,
        workflows=[ReplicationWorkflow],
        max_concurrent_workflow_tasks=100,
        # after a worker restart, its workflows move to the new worker in 3 s instead of the default 10 s
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=3),
    )
    host_worker = Worker(
        client,
        task_queue=config.host_queue(host),
        activities=list(HOST_ACTIVITIES),
        activity_executor=pool,
        max_concurrent_activities=max_activities,
        # resume tokens reach the server within a second, so a killed worker re-copies little
        max_heartbeat_throttle_interval=timedelta(seconds=1),
        default_heartbeat_throttle_interval=timedelta(seconds=1),
    )
    return [control, host_worker]


async def serve() -> None:
    pol = policy.current()  # an agent without a (valid) policy does not start: it would refuse every job
    log.info(
        "agent policy %s: platforms %s; source roots %s; target roots %s",
        policy.path(),
        ", ".join(pol.platforms),
        ", ".join(map(str, pol.source_roots)),
        ", ".join(map(str, pol.target_roots)),
    )
    client = await connect()
    workers = build_workers(client)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker serving %s and %s", config.CONTROL_QUEUE, config.host_queue())
    async with workers[0], workers[1]:
        await stop.wait()
    log.info("worker stopped")


def _steady_heap() -> None:
    """Keep freed copy buffers in the heap (glibc): fresh mmaps would page-fault every chunk again."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def main() -> None:
    _steady_heap()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve())
    except (ServerUnreachable, NotAllowed) as e:
        log.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
