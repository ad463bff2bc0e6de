"""The one adapter from connector/core errors to Temporal failures."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from temporalio.exceptions import ApplicationError, CancelledError

from sendense.errors import SendenseError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def to_application_error(e: BaseException) -> BaseException:
    if isinstance(e, ApplicationError | CancelledError):
        return e
    if isinstance(e, SendenseError):
        return ApplicationError(e.message, type=e.kind, non_retryable=not e.retryable)
    if isinstance(e, OSError):
        # paths may appear, secrets never do: connectors keep credentials out of OSError text
        return ApplicationError(f"{type(e).__name__}: {e}", type="OSError", non_retryable=False)
    return ApplicationError(f"internal error: {type(e).__name__}: {e}", type="InternalError")


def mapped(fn: F) -> F:
    """Wrap a sync activity so its errors reach Temporal as typed ApplicationErrors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            mapped_err = to_application_error(e)
            if mapped_err is e:
                raise
            log.warning("%s failed: %s", fn.__name__, mapped_err)
            raise mapped_err from None

    return wrapper  # type: ignore[return-value]
