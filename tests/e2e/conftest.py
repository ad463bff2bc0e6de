"""End to end: the real Temporal dev server and a real worker process, driven through the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app import stack

SENDENSE = str(Path(sys.executable).with_name("sendense"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cli:
    env: dict[str, str]
    state: Path

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([SENDENSE, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"sendense {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def json(self, *args: str, timeout: float = 300) -> Any:
        return json.loads(self.run(*args, "--json", timeout=timeout).stdout)

    def wait_point(self, job: str, count: int = 1, timeout: float = 120) -> dict[str, Any]:
        """Wait until the job has committed at least `count` syncs; return its status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.json("job", "status", job)
            if st["syncs"] >= count and st["state"] != "syncing":
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} did not reach {count} syncs: {st}")
            time.sleep(0.5)


@pytest.fixture(scope="package")
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    state = Path(tmp_path_factory.mktemp("sd"))
    port = free_port()
    env = dict(os.environ, SENDENSE_HOME=str(state), SENDENSE_HOST_ID=f"e2e{port}")
    env.pop("SENDENSE_TEMPORAL", None)
    old = {k: os.environ.get(k) for k in ("SENDENSE_HOME", "SENDENSE_HOST_ID")}
    os.environ.update(SENDENSE_HOME=env["SENDENSE_HOME"], SENDENSE_HOST_ID=env["SENDENSE_HOST_ID"])
    try:
        stack.up(state, port=port, ui_port=free_port())
        yield Cli(env=env, state=state)
    finally:
        stack.down(state)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
