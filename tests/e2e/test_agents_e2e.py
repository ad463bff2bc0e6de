"""The agent registry as an operator sees it: `sendense agent list` names the running agent, heard
from within the announcement period."""

from __future__ import annotations

import time

from conftest import Cli


def test_the_running_agent_is_listed_and_fresh(e2e_stack: Cli) -> None:
    host = e2e_stack.env["SENDENSE_HOST_ID"]
    deadline = time.monotonic() + 60
    while True:
        agents = e2e_stack.json("agent", "list")
        mine = [a for a in agents if a["host_id"] == host]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert mine, agents
    text = e2e_stack.run("agent", "list").stdout
    assert host in text and "s ago" in text and "(stale)" not in text, text
