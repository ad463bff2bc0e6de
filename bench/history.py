"""Where a sync's time goes, from the job's workflow history: queue waits and run times.

For every activity and workflow task since a given instant: the wait (scheduled -> started, i.e. for
a free slot on a worker) and the run (started -> completed), plus timeouts. Event times of a started
activity with a retry policy are the real start of its last attempt.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle

from app.cli.client import Jobs
from bench.harness import median, percentile

E = EventType
_DONE = {
    E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
    E.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
    E.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
}


async def breakdown(jobs: Jobs, name: str, since: float) -> dict[str, Any]:
    """Wait/run seconds per activity type and for workflow tasks, for events at or after `since`."""
    sched: dict[int, tuple[str, float]] = {}
    started: dict[int, float] = {}
    wft_sched: dict[int, float] = {}
    wft_started: dict[int, float] = {}
    out: dict[str, Any] = {"activities": defaultdict(lambda: {"wait": [], "run": []}), "timeouts": []}
    out["workflow_task"] = {"wait": [], "run": []}
    async for ev in jobs.handle(name).fetch_history_events():
        t = ev.event_time.ToDatetime().timestamp()
        if t < since:
            continue
        et = ev.event_type
        if et == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            sched[ev.event_id] = (ev.activity_task_scheduled_event_attributes.activity_type.name, t)
        elif et == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started[ev.activity_task_started_event_attributes.scheduled_event_id] = t
        elif et in _DONE:
            sid = getattr(ev, _DONE[et]).scheduled_event_id
            if sid in sched and sid in started:
                kind, ts = sched[sid]
                out["activities"][kind]["wait"].append(started[sid] - ts)
                out["activities"][kind]["run"].append(t - started[sid])
            if et != E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                out["timeouts"].append(E.Name(et))
        elif et == E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            wft_sched[ev.event_id] = t
        elif et == E.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            sid = ev.workflow_task_started_event_attributes.scheduled_event_id
            wft_started[ev.event_id] = t
            if sid in wft_sched:
                out["workflow_task"]["wait"].append(t - wft_sched[sid])
        elif et == E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            st = ev.workflow_task_completed_event_attributes.started_event_id
            if st in wft_started:
                out["workflow_task"]["run"].append(t - wft_started[st])
        elif et == E.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
            out["timeouts"].append("WORKFLOW_TASK_TIMED_OUT")
    return out


def summarize(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge breakdowns of many jobs into p50/p95/max seconds per step, and the timeouts seen."""
    merged: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"wait": [], "run": []})
    timeouts: dict[str, int] = defaultdict(int)
    for p in parts:
        for kind, d in [*p["activities"].items(), ("workflow_task", p["workflow_task"])]:
            merged[kind]["wait"] += d["wait"]
            merged[kind]["run"] += d["run"]
        for t in p["timeouts"]:
            timeouts[t] += 1

    def stats(xs: list[float]) -> dict[str, float]:
        return {
            "p50": round(median(xs), 3),
            "p95": round(percentile(xs, 95), 3),
            "max": round(max(xs, default=0.0), 3),
        }

    return {
        "steps": {
            k: {"count": len(v["run"]), "wait": stats(v["wait"]), "run": stats(v["run"])}
            for k, v in merged.items()
        },
        "timeouts": dict(timeouts),
    }


async def activity_times(h: WorkflowHandle[Any, Any]) -> list[dict[str, Any]]:
    """Every activity of one workflow run in the order scheduled, with its event times (epoch seconds):
    `scheduled`, `started` (its last attempt's: a retried activity's started event is written when it
    ends) and `ended`; `attempt`, and how it ended (`completed`, `failed`, `timed_out`; None: still on)."""
    out: dict[int, dict[str, Any]] = {}
    async for ev in h.fetch_history_events():
        t = ev.event_time.ToDatetime().timestamp()
        et = ev.event_type
        if et == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            kind = ev.activity_task_scheduled_event_attributes.activity_type.name
            out[ev.event_id] = {"type": kind, "scheduled": t, "started": None, "ended": None, "outcome": None}
        elif et == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            a = ev.activity_task_started_event_attributes
            if a.scheduled_event_id in out:
                out[a.scheduled_event_id].update(started=t, attempt=a.attempt)
        elif et in _DONE:
            sid = getattr(ev, _DONE[et]).scheduled_event_id
            if sid in out:
                outcome = E.Name(et).removeprefix("EVENT_TYPE_ACTIVITY_TASK_").lower()
                out[sid].update(ended=t, outcome=outcome)
    return list(out.values())
