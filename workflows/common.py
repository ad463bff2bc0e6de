"""What the job's and the recovery operations' workflows share: search attributes, and the one-line
message of a failed activity. Deterministic: workflow code only."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

SA_JOB = SearchAttributeKey.for_keyword("SendenseJob")
SA_SOURCE = SearchAttributeKey.for_keyword("SendenseSource")
SA_TARGET = SearchAttributeKey.for_keyword("SendenseTarget")
SA_VM = SearchAttributeKey.for_keyword("SendenseVm")
SA_STATE = SearchAttributeKey.for_keyword("SendenseState")
SA_OPERATION = SearchAttributeKey.for_keyword("SendenseOperation")  # drill, failback, plan-drill


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
