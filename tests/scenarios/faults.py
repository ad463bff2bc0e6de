"""Faults the scenario runner injects into a real copy: an exception at the copy's k-th checkpoint
(after its data up to there is written and flushed, as when a worker fails mid-copy), and a copy
worker process killed with SIGKILL at its k-th checkpoint (after its resume token was written).

Both hook the copy engine's checkpoint callback through the activities module's `run_copy_disk`
(the name both begin_and_copy and copy_disk call): everything else (qemu-nbd, the engine, the
target) runs for real.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from activities import replication
from sendense.errors import DataPathError

INJECTED = "injected fault: the copy failed at checkpoint"


@contextmanager
def at_checkpoint(k: int, act: Callable[[], None]) -> Iterator[list[int]]:
    """Run `act` at the k-th checkpoint of each copy inside the block (after the activity's own
    checkpoint work: the token is on disk); yields a one-item list: how often `act` ran."""
    real = replication.run_copy_disk
    fired = [0]

    def hooked(*args: Any, **kw: Any) -> Any:
        inner = kw.get("on_checkpoint")
        seen = [0]

        def ck(offset: int, done: int, total: int, stats: Any) -> None:
            if inner is not None:
                inner(offset, done, total, stats)
            seen[0] += 1
            if seen[0] == k:
                fired[0] += 1
                act()

        kw["on_checkpoint"] = ck
        return real(*args, **kw)

    replication.run_copy_disk = hooked  # type: ignore[assignment]
    try:
        yield fired
    finally:
        replication.run_copy_disk = real  # type: ignore[assignment]


def raise_at(k: int) -> Any:
    def boom() -> None:
        raise DataPathError(f"{INJECTED} {k}")

    return at_checkpoint(k, boom)


def killed_copy(run: Callable[[], Any], k: int) -> dict[str, Any] | None:
    """Run `run()` (a copy_disk activity) in a forked worker process that SIGKILLs itself at the
    copy's k-th checkpoint. None if it was killed; else {"ok": result as JSON data} or {"error":
    type, "message": ...} (an ApplicationError's type). Its qemu-nbd children die with it
    (PDEATHSIG)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(rfd)
        code = 1
        try:
            with at_checkpoint(k, lambda: os.kill(os.getpid(), signal.SIGKILL)):
                out = run()
            os.write(wfd, json.dumps({"ok": out.model_dump(mode="json")}).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            kind = getattr(e, "type", None) or type(e).__name__
            os.write(wfd, json.dumps({"error": kind, "message": str(e)}).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 1 << 16):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return None
    msg: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    if not msg:
        raise AssertionError(f"the copy worker died without a word (wait status {status})")
    return msg
