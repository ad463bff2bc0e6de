"""What the job's and the recovery operations' workflows share: search attributes, and the one-line
message of a failed activity. Deterministic: workflow code only."""

from __future__ import annotations

from typing import Literal

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from sendense.config import CONTROL_QUEUE  # an end reached by API (no host) runs its steps there

SA_JOB = SearchAttributeKey.for_keyword("SendenseJob")
SA_SOURCE = SearchAttributeKey.for_keyword("SendenseSource")
SA_TARGET = SearchAttributeKey.for_keyword("SendenseTarget")
SA_VM = SearchAttributeKey.for_keyword("SendenseVm")
SA_STATE = SearchAttributeKey.for_keyword("SendenseState")
SA_OPERATION = SearchAttributeKey.for_keyword("SendenseOperation")  # drill, failback, plan-drill

Placement = Literal["one", "link", "source", "target"]


def placement(source_queue: str, target_queue: str) -> Placement:
    """Where a job's copies run, from its ends' queues:

    - "one": one queue serves both ends (one agent; or the control queue, both ends reached by API);
    - "link": two agents: the source's serves its snapshot, the target's reads it across the link;
    - "source": the target is reached by API (control queue): the source's agent copies, writing by API;
    - "target": the source is reached by API: the target's agent copies, reading the source by API.
    A copy never runs on the control queue when an agent holds one end: the bytes go from that agent
    straight to the platform's API, never through the control plane."""
    if source_queue == target_queue:
        return "one"
    if target_queue == CONTROL_QUEUE:
        return "source"
    if source_queue == CONTROL_QUEUE:
        return "target"
    return "link"


def failure_type(e: BaseException) -> str | None:
    """The root cause's ApplicationError type (the connector error's kind), if any."""
    cause: BaseException | None = e
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    return cause.type if isinstance(cause, ApplicationError) else None


def failure_message(e: BaseException) -> str:
    """The root cause's one-line message (activity failures wrap it)."""
    cause: BaseException | None = e
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, FailureError):
        return cause.message
    return str(cause)
