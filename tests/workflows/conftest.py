"""The workflow tests' environment: one time-skipping test server per module (the installed binary:
the SDK's own download fails without internet)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment


@pytest_asyncio.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    server = shutil.which("temporal-test-server") or ".venv/bin/temporal-test-server"
    e = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=server
    )
    try:
        yield e
    finally:
        await e.shutdown()
