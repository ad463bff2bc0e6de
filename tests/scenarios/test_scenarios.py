"""The scenario runner over each target: a bounded, derandomized run in the default tier (fixed
examples, so CI is reproducible), a larger random one in the slow tier. The soak
(`python -m bench --soak`) runs the same machine for as long as asked."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from scenarios.machine import Counters, make_machine, without_open_defects

BOUNDED = settings(
    max_examples=4,
    stateful_step_count=25,
    derandomize=True,  # the same scenarios every run
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
SLOW = settings(BOUNDED, max_examples=24, stateful_step_count=85, derandomize=False)
SLOW_AWS = settings(SLOW, max_examples=12)  # every point read back through the lab at every step


def _run(target: tuple[str, Any], source: str, how: settings, excluded: frozenset[str]) -> None:
    kind, lab = target
    before, t0 = (Counters.scenarios, Counters.steps), time.monotonic()
    run_state_machine_as_test(make_machine(kind, lab, excluded, source), settings=how)
    print(
        f"scenarios[{source} -> {kind}]: {Counters.scenarios - before[0]} scenarios, "
        f"{Counters.steps - before[1]} steps in {time.monotonic() - t0:.1f} s"
    )


@pytest.mark.parametrize("source", ["disks", "qmp"])
def test_bounded_scenarios(target: tuple[str, Any], source: str) -> None:
    if source == "qmp" and target[0] in ("aws", "vsphere"):
        how = settings(BOUNDED, max_examples=2)  # the lab checks cost most: the stopped form covers it
    else:
        how = BOUNDED
    _run(target, source, how, without_open_defects())


# A vSphere target refuses, by design, a sync of a disk grown past its placeholder disk (vSphere cannot
# extend a disk of a VM with snapshots): the model expects that refusal (rig._placeholder_refuses).
@pytest.mark.slow
@pytest.mark.parametrize("source", ["disks", "qmp"])
def test_random_scenarios(target: tuple[str, Any], source: str) -> None:
    _run(target, source, SLOW_AWS if target[0] in ("aws", "vsphere") else SLOW, without_open_defects())
