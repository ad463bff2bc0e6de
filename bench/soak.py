"""`python -m bench --soak [--seed N] [--steps N] [--target kvm|aws|all]`: the scenario runner
(tests/scenarios) for as long as asked.

Rounds of hypothesis runs of the scenario state machine, round r seeded with seed + r, the stopped
and the running VM form by turns, until the step budget is spent. A failing round is shrunk by
hypothesis to a minimal step sequence, which is printed (with the seed that found it) and kept in
bench/results/soak.json; the next round goes on, so one run can find several faults. A failure
seen again (same message, ids and offsets aside) is counted, not repeated. Every failure found
belongs in tests/scenarios/test_regressions.py.
Exit status: 0, or 1 if any scenario failed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parents[1] / "tests"


def _signature(what: str) -> str:
    """A failure's message without what differs between two runs of the same fault."""
    what = re.sub(r"/tmp/\S+", "PATH", what)
    what = re.sub(r"\bs\d{4}\b|\bsc[0-9a-f]{8}\b|snap-[0-9a-f]+|0x[0-9a-f]{2}", "ID", what)
    return re.sub(r"\d+", "N", what)


def _failure(exc: BaseException, log: list[Any]) -> dict[str, Any]:
    from scenarios.rig import ScenarioFailure

    chain: list[BaseException] = []
    c: BaseException | None = exc
    while c is not None and len(chain) < 10:
        chain.append(c)
        chain += list(getattr(c, "exceptions", []) or [])
        c = c.__cause__ or c.__context__
    found = next((e for e in chain if isinstance(e, ScenarioFailure)), None)
    if found is not None:  # hypothesis re-raises the minimal example's failure last
        minimal = found is exc
        return {"what": found.what, "steps": found.steps, "minimal": minimal, "error": type(exc).__name__}
    return {
        "what": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        "steps": log,
        "minimal": False,
        "error": type(exc).__name__,
    }


def soak(seed: int, steps: int, targets: list[str], out: Path) -> int:
    sys.path[:0] = [str(_TESTS)]
    from hypothesis import HealthCheck, Verbosity, settings
    from hypothesis import seed as hyp_seed
    from hypothesis.stateful import run_state_machine_as_test
    from scenarios.machine import Counters, make_machine

    from labs.aws import AwsLab

    logging.basicConfig(level=logging.ERROR)
    for noisy in ("temporalio", "activities", "connectors", "sendense"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    how = settings(
        max_examples=10,
        stateful_step_count=40,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    print(f"soak: seed {seed}, step budget {steps}, targets {', '.join(targets)}", flush=True)
    t0 = time.monotonic()
    failures: dict[str, dict[str, Any]] = {}
    per_target: dict[str, dict[str, Any]] = {}
    lab: AwsLab | None = None
    rounds = 0
    try:
        for target in targets:
            if target == "aws":
                import os

                lab = AwsLab(Path(tempfile.mkdtemp(prefix="soak-awslab-")), snapshot_delay=0.0).start()
                os.environ.update(lab.env())
            before, t1 = (Counters.scenarios, Counters.steps), time.monotonic()
            budget = steps // len(targets)
            r = 0
            while Counters.steps - before[1] < budget:
                source = "qmp" if r % 2 else "disks"  # stopped and running VM forms by turns
                machine = make_machine(target, lab, source=source)
                hyp_seed(seed + r)(machine)
                rounds += 1
                try:
                    run_state_machine_as_test(machine, settings=how)
                except BaseException as e:  # noqa: BLE001 - a failure to report; the soak goes on
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    f = _failure(e, list(machine.last_log))
                    key = f"{source} -> {target}: {_signature(f['what'])}"
                    if key in failures:
                        failures[key]["seen"] += 1
                    else:
                        failures[key] = {"target": target, "source": source, "seed": seed + r, "seen": 1, **f}
                        print(
                            f"\nsoak: FAILURE ({source} -> {target}, seed {seed + r}): {f['what']}",
                            flush=True,
                        )
                        print(f"  {'minimal' if f['minimal'] else 'not shrunk'} steps ({len(f['steps'])}):")
                        for s in f["steps"]:
                            print(f"    {json.dumps(s)}")
                r += 1
                print(
                    f"soak: {target}: {Counters.steps - before[1]} steps, "
                    f"{Counters.scenarios - before[0]} scenarios",
                    flush=True,
                )
            per_target[target] = {
                "scenarios": Counters.scenarios - before[0],
                "steps": Counters.steps - before[1],
                "seconds": round(time.monotonic() - t1, 1),
            }
            if lab is not None:
                lab.stop()
                lab = None
    finally:
        if lab is not None:
            lab.stop()
    summary = {
        "command": "python -m bench --soak",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "step_budget": steps,
        "rounds": rounds,
        "scenarios": Counters.scenarios,
        "steps": Counters.steps,
        "seconds": round(time.monotonic() - t0, 1),
        "targets": per_target,
        "failures": list(failures.values()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\nsoak: seed {seed}: {Counters.scenarios} scenarios, {Counters.steps} steps in "
        f"{summary['seconds']} s; {len(failures)} distinct failure(s)"
    )
    print(json.dumps({k: summary[k] for k in ("seed", "scenarios", "steps", "seconds", "targets")}))
    print(f"results: {out}")
    return 1 if failures else 0
