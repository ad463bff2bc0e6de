"""Every recorded ReplicationWorkflow history replays against the current workflow code.

A running job's history was written by an older version of the workflow; a change to the command
sequence that is not guarded by `workflow.patched` breaks those jobs at their next replay (after a
worker restart or a cache eviction) with a non-determinism error. Histories are recorded with
`python tests/workflows/record_histories.py TAG` before each such change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.replication import ReplicationWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_are_present() -> None:
    assert len(HISTORIES) >= 2, "the recorded histories are missing"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(f"replay-{path.stem}", path.read_text())
    replayer = Replayer(workflows=[ReplicationWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"
