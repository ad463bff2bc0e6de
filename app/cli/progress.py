"""Copy progress bars, fed by the resume tokens that copy activities heartbeat."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from sendense.models import CopyToken, SyncResult

T = TypeVar("T")


async def watch_copy(jobs: Any, name: str, console: Console, done: Callable[[], Awaitable[T | None]]) -> T:
    """Show one bar per disk being copied by job `name` until `done()` returns a value."""
    h = jobs.handle(name)
    # the description (job and disk names) is text, never markup
    columns = (
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        DownloadColumn(binary_units=True),
    )
    with Progress(*columns, TransferSpeedColumn(), console=console) as bar:
        tasks: dict[str, Any] = {}
        while True:
            result = await done()
            toks: dict[str, CopyToken] = await jobs.copy_progress(h)
            for disk, tok in toks.items():
                if disk not in tasks:
                    tasks[disk] = bar.add_task(f"{name}/{disk}", total=max(tok.total, 1))
                bar.update(tasks[disk], completed=tok.done, total=max(tok.total, 1))
            if result is not None:
                for t in tasks.values():
                    bar.update(t, completed=bar.tasks[t].total)
                return result
            await asyncio.sleep(0.4)


async def sync_now_with_progress(jobs: Any, name: str, console: Console) -> SyncResult:
    """Request a sync, show its copy progress, return its result."""
    task = asyncio.ensure_future(jobs.sync_now(name, wait=True))

    async def finished() -> SyncResult | None:
        return task.result() if task.done() else None

    return await watch_copy(jobs, name, console, finished)
