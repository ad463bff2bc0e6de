"""Every activity asks this agent's policy first (sendense.policy): whoever reached Temporal and
started the job, the agent reads, writes and calls only what its own policy allows."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sendense import policy
from sendense.errors import NotAllowed
from sendense.models import JobSpec

F = TypeVar("F", bound=Callable[..., Any])


def authorized(fn: F) -> F:
    """Wrap an activity whose first argument is a request with the job's `spec`: the spec is checked
    against the policy before the activity runs (a refusal is NotAllowed: not retried, one line)."""

    @functools.wraps(fn)
    def wrapper(req: Any, *args: Any, **kwargs: Any) -> Any:
        spec = getattr(req, "spec", None)
        if not isinstance(spec, JobSpec):
            raise NotAllowed(f"{fn.__name__}: a request without a job spec is refused")
        policy.authorize(spec)
        return fn(req, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
