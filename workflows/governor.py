"""LinkGovernorWorkflow: one per site link (`link-<name>`), the one budget every copy crossing the
link takes its share of, whichever agent runs it.

A copy leases its share (update `lease`) when it starts and renews it every LEASE_PERIOD, reporting
the bytes it moved since; each lease is answered with the copy's rate now: the link's budget at
this instant (its time-of-day windows, in its time zone) shared among the copies that hold a live
lease, by class and cap (sendense.links.allocate). A copy that ends releases its lease; one whose
agent died stops renewing and its lease lapses after LEASE_VALID seconds: either way its share goes
to the others at their next renewal. `set` changes the link (rate, windows, weights, time zone),
`job_priority` (a signal from the job's workflow) moves a job's running copies to another class;
both reach the copies at their next renewal, within LEASE_PERIOD.

Deterministic: workflow.now() is the only clock; continues-as-new after `max_updates` leases.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from sendense.links import (
        PRIORITIES,
        ClassChange,
        Demand,
        GovernorInput,
        HolderStatus,
        JobPriority,
        LeaseGrant,
        LeaseRelease,
        LeaseRequest,
        LinkChange,
        LinkSpec,
        LinkStatus,
        allocate,
        budget_at,
        demand_of,
        lower_cap,
        window_at,
    )
    from sendense.models import JOB_NAME
    from sendense.spec import format_validation_error

LEASE_PERIOD = 1.0  # seconds between a copy's renewals (activities.leases)
LEASE_VALID = 4.0  # a lease not renewed for this long lapses (about three missed renewals)
SAMPLES = 5  # renewals the measured rate is averaged over (about LEASE_PERIOD each)
# A job's priority change counts for its copies that started before it (their spec says the old one)
# this long: a copy runs at most 48 h an attempt, and its retries get the same spec.
PRIORITY_KEPT = timedelta(days=7)
DEMAND_AFTER = 2.0  # seconds after its first lease a copy's demand is judged by what it moves


@workflow.defn(name="LinkGovernorWorkflow")
class LinkGovernorWorkflow:
    @workflow.init
    def __init__(self, inp: GovernorInput) -> None:
        # (here, not in run: a lease may be the first thing the new run handles)
        self.spec = LinkSpec.model_validate(inp.spec)
        self.holders = {h.holder: h for h in inp.holders}
        self.samples = {k: list(v) for k, v in inp.samples.items()}
        self.priorities = dict(inp.priorities)  # job id (or name) -> its class since a change
        self.updates = 0
        self.deleting = False

    # ------------------------------------------------------------------ handlers

    @workflow.update
    def lease(self, req: LeaseRequest) -> LeaseGrant:
        now = workflow.now()
        self.updates += 1
        self._expire(now)
        changed = self.priorities.get(req.job_id or req.job)
        priority = changed.priority if changed is not None else req.priority
        h = self.holders.get(req.holder)
        if h is None:
            h = self.holders[req.holder] = HolderStatus(
                holder=req.holder, job=req.job, priority=priority, since=now, last_seen=now
            )
        h.priority, h.cap, h.last_seen = priority, req.cap, now
        self._measured(h, req.bytes, req.seconds)
        # a copy moving less than its grant (and past its start: connecting takes a moment) leaves the
        # rest to the others, work-conserving
        budget = budget_at(self.spec, now)
        started = now - h.since >= timedelta(seconds=DEMAND_AFTER)
        limited = started and budget is not None  # (an unlimited link has nothing to hand on)
        h.demand = demand_of(req.bytes, req.seconds, req.waited) if limited else None
        grants = allocate(
            budget,
            [
                Demand(x.holder, x.priority, lower_cap(x.cap, x.demand))  # type: ignore[arg-type]
                for x in self.holders.values()
            ],
            self.spec.weights,
        )
        g = grants[req.holder]
        h.rate, h.share = g.rate, g.share
        return LeaseGrant(rate=g.rate, share=g.share, budget=budget, priority=priority, valid_for=LEASE_VALID)

    @lease.validator
    def _validate_lease(self, req: LeaseRequest) -> None:
        if self.deleting:
            raise ApplicationError("the link is being deleted", type="LinkDeleted")
        if req.priority not in PRIORITIES:
            raise ApplicationError(f"priority: one of {', '.join(PRIORITIES)}", type="InvalidSpec")
        if not JOB_NAME.match(req.job) or not req.holder or len(req.holder) > 256:
            raise ApplicationError("lease: not a job name or holder id", type="InvalidSpec")

    @workflow.update
    def release(self, req: LeaseRelease) -> None:
        self.updates += 1
        h = self.holders.pop(req.holder, None)
        self.samples.pop(req.holder, None)
        if h is not None:
            h.bytes += req.bytes

    @workflow.signal
    def job_priority(self, req: JobPriority) -> None:
        """The job's priority changed: its copies count in that class from their next renewal."""
        if req.priority not in PRIORITIES:
            workflow.logger.warning("job %s: priority %r ignored (not a class)", req.job, req.priority)
            return
        self.priorities[req.job_id or req.job] = ClassChange(priority=req.priority, at=workflow.now())
        for h in self.holders.values():
            if h.job == req.job:
                h.priority = req.priority

    @workflow.update(name="set")
    def set_link(self, change: LinkChange) -> LinkStatus:
        self.spec = LinkSpec.model_validate(change.spec)
        return self.status()

    @set_link.validator
    def _validate_set(self, change: LinkChange) -> None:
        try:
            spec = LinkSpec.model_validate(change.spec)
        except ValidationError as e:
            raise ApplicationError(format_validation_error(e, "link."), type="InvalidSpec") from None
        if spec.name != self.spec.name:
            raise ApplicationError(f"link.name: this is link {self.spec.name}", type="InvalidSpec")

    @workflow.update
    def delete(self) -> LinkStatus:
        self.deleting = True
        return self.status()

    @delete.validator
    def _validate_delete(self) -> None:
        live = sorted({h.job for h in self._live(workflow.now())})
        if live:
            raise ApplicationError(
                f"link {self.spec.name}: copies of {', '.join(live)} cross it now; "
                "delete it when they are done",
                type="LinkBusy",
            )

    @workflow.query
    def status(self) -> LinkStatus:
        now = workflow.now()
        w = window_at(self.spec, now)
        return LinkStatus(
            spec=self.spec.model_dump(mode="json"),
            at=now,
            budget=budget_at(self.spec, now),
            window=w.describe() if w is not None else None,
            holders=sorted(self._live(now), key=lambda h: (PRIORITIES.index(h.priority), h.job, h.holder)),  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ run

    @workflow.run
    async def run(self, inp: GovernorInput) -> LinkStatus:
        workflow.set_current_details(f"link **{self.spec.name}**")
        await workflow.wait_condition(
            lambda: (
                self.deleting
                or self.updates >= inp.max_updates
                or workflow.info().is_continue_as_new_suggested()
            )
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self.deleting:
            return self.status()
        now = workflow.now()
        self._expire(now)
        for k in [k for k, c in self.priorities.items() if now - c.at > PRIORITY_KEPT]:
            del self.priorities[k]  # every copy started before such a change has long ended
        workflow.continue_as_new(
            GovernorInput(
                spec=self.spec.model_dump(mode="json"),
                holders=list(self.holders.values()),
                samples=self.samples,
                priorities=self.priorities,
                max_updates=inp.max_updates,
            )
        )

    # ------------------------------------------------------------------ helpers

    def _live(self, now: datetime) -> list[HolderStatus]:
        return [h for h in self.holders.values() if now - h.last_seen <= timedelta(seconds=LEASE_VALID)]

    def _expire(self, now: datetime) -> None:
        """Leases not renewed in time lapse: their shares go to the others."""
        live = {h.holder for h in self._live(now)}
        for k in [k for k in self.holders if k not in live]:
            workflow.logger.info("link %s: lease of %s lapsed", self.spec.name, k)
            del self.holders[k]
            self.samples.pop(k, None)

    def _measured(self, h: HolderStatus, moved: int, seconds: float) -> None:
        """The holder's rate over its last few reports, by its own clock."""
        h.bytes += moved
        if seconds <= 0:
            return
        s = self.samples.setdefault(h.holder, [])
        s.append((float(moved), seconds))
        del s[:-SAMPLES]
        h.measured_rate = sum(b for b, _ in s) / sum(t for _, t in s)
