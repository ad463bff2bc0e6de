"""Record ReplicationWorkflow histories for replay tests (`python tests/workflows/record_histories.py TAG`).

Runs a few scenarios against the fake host activities of test_replication_workflow (time-skipping
test server) and writes each history to `tests/workflows/histories/<TAG>-<scenario>.json`. Record a
new set before every change to the workflow's command sequence; the old sets stay, and
test_replication_replay replays every one of them against the current code.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE)]

from temporalio import activity  # noqa: E402
from temporalio.client import WorkflowUpdateStage  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402
from temporalio.exceptions import ApplicationError  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402
from test_replication_workflow import FakeHost, Job, _run, spec  # noqa: E402

from sendense.models import CopyRequest, DeleteRequest, Settings, SyncNowRequest  # noqa: E402
from workflows.replication import ReplicationWorkflow  # noqa: E402

OUT = HERE / "histories"


async def _record(job: Job, tag: str, scenario: str) -> None:
    history = await job.handle.fetch_history()
    path = OUT / f"{tag}-{scenario}.json"
    path.write_text(history.to_json())
    print(f"recorded {path} ({len(history.events)} events)")


async def main(tag: str) -> None:
    OUT.mkdir(exist_ok=True)
    server = shutil.which("temporal-test-server") or ".venv/bin/temporal-test-server"
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=server
    )
    try:
        # one queue: seed, an incremental, a failing sync, a sync after it, new settings, delete
        host = FakeHost()
        host.inline = 1  # begin_and_copy copies the first disk itself, copy_disk the second

        async def fail_third(req: CopyRequest, info: activity.Info) -> None:
            if req.sync_id.endswith("-0003") and req.disk == "disk1":
                raise ApplicationError("replica volume is read-only", type="TargetError", non_retryable=True)

        async def one_queue(job: Job) -> None:
            await job.settled(1)
            await job.sync_now()
            host.copy_hook = fail_third
            failing = await job.handle.start_update(
                ReplicationWorkflow.sync_now, SyncNowRequest(), wait_for_stage=WorkflowUpdateStage.ACCEPTED
            )
            try:
                await asyncio.wait_for(failing.result(), 10)
            except Exception:  # noqa: BLE001 - the failure is the point of this sync
                pass
            await job.settled(2, failures=1)
            host.inline = 2  # from here on the whole sync is begin_and_copy's (it commits too)
            await job.sync_now()
            await job.handle.execute_update(ReplicationWorkflow.update_settings, Settings(retention_points=3))
            await job.sync_now()
            await job.settled(4, failures=1)
            await _delete_and_record(job, tag, "one-queue")

        await _run(env, spec(name="rec1"), one_queue, host=host)

        # the source on a queue of its own: seed, an incremental, delete with purge
        async def two_queues(job: Job) -> None:
            await job.settled(1)
            await job.sync_now()
            await job.settled(2)
            await _delete_and_record(job, tag, "two-queues", purge=True)

        await _run(env, spec(name="rec2"), two_queues, source_queue=True)
    finally:
        await env.shutdown()


async def _delete_and_record(job: Job, tag: str, scenario: str, purge: bool = False) -> None:
    await job.handle.execute_update(ReplicationWorkflow.delete, DeleteRequest(purge=purge))
    await job.handle.result()
    await _record(job, tag, scenario)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "v1"))
