"""What the CLI prints and how it fails: plain text (never markup), JSON, and one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.text import Text

from sendense.errors import SendenseError

# Never markup: messages, paths and names are printed as they are (QEMU's "Is another process using
# the image [/path]?" is not a closing tag). Styles are applied with Text, never parsed from strings.
out = Console(markup=False, highlight=False, emoji=False)
err = Console(stderr=True, markup=False, highlight=False, emoji=False)
T = TypeVar("T")

JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _dump(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list):
        return [_dump(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _dump(v) for k, v in obj.items()}
    return obj


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_dump(obj), indent=2, default=str) + "\n")


def one_line(msg: str) -> str:
    """Every error is one line: a multi-line message (QEMU's, a server's) is joined."""
    return " ".join(msg.split())


def error_line(msg: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", one_line(msg)), soft_wrap=True)


def warn(msg: str) -> None:
    err.print(Text.assemble(("warning:", "yellow"), " ", one_line(msg)), soft_wrap=True)


def fail(msg: str, code: int = 1) -> NoReturn:
    error_line(msg)
    raise typer.Exit(code)


def describe_error(e: BaseException) -> str:
    """One line for any exception the CLI did not expect: what went wrong, not where in the code."""
    from pydantic import ValidationError
    from temporalio.client import WorkflowQueryFailedError, WorkflowUpdateFailedError
    from temporalio.service import RPCError

    from sendense.spec import format_validation_error

    if isinstance(e, SendenseError):
        return e.message
    if isinstance(e, WorkflowUpdateFailedError):
        cause = e.cause
        return getattr(cause, "message", None) or str(cause)
    if isinstance(e, WorkflowQueryFailedError):
        return f"the job did not answer: {e.message}"
    if isinstance(e, RPCError):
        return f"Temporal: {e.message}"
    if isinstance(e, ValidationError):
        return format_validation_error(e, f"{e.title}: ")
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return f"{type(e).__name__}: {e}"


def debugging() -> bool:
    """SENDENSE_DEBUG=1: let unexpected exceptions through with their traceback."""
    return bool(os.environ.get("SENDENSE_DEBUG"))


def run(coro: Callable[[], Awaitable[T]]) -> T:
    """Run an async CLI action; every error becomes a one-line message and exit 1."""
    return guarded(lambda: asyncio.run(coro()))  # type: ignore[arg-type]


def guarded(action: Callable[[], T]) -> T:
    """`run` for plain (not async) actions: connectors' calls on this host."""
    try:
        return action()
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except SendenseError as e:
        fail(e.message)
    except Exception as e:  # noqa: BLE001 - the CLI prints one line, not a traceback
        if debugging():
            raise
        fail(describe_error(e))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
