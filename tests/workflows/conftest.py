"""The workflow tests' environment: one time-skipping test server per test (the installed binary:
the SDK's own download fails without internet).

Per test, not per module: a workflow terminated while one of its activities runs leaks a
time-skipping lock in the test server, and every later `env.sleep` then runs in real time (CI saw a
one-hour sleep time out in three later tests of a module). A server starts in about 0.1 s."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment


@pytest_asyncio.fixture(scope="function")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    server = shutil.which("temporal-test-server") or ".venv/bin/temporal-test-server"
    e = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=server
    )
    try:
        yield e
    finally:
        await e.shutdown()
