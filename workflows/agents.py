"""AgentRegistryWorkflow (id sendense.agents.REGISTRY_ID): which agents run, and the VMs each runs now.

Host agents announce themselves every ANNOUNCE_EVERY with signal-with-start (workers.worker), so the
registry exists as soon as one agent runs, and a restarted one is back within one announcement. The
`agents` query answers with what each agent last said and when it was heard (the registry's clock):
activities.placement.locate_source reads it before each sync of a job whose source can move.

Deterministic: workflow.now() is the only clock; continues-as-new after MAX_SIGNALS announcements,
carrying the table.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sendense.agents import Announcement, heard

MAX_SIGNALS = 2000  # announcements per run (about 8 h of 4 agents every 15 s), then continue-as-new


@workflow.defn(name="AgentRegistryWorkflow")
class AgentRegistryWorkflow:
    def __init__(self) -> None:
        self.table: dict[str, Announcement] = {}
        self.signals = 0

    @workflow.run
    async def run(self, table: list[Announcement] | None = None) -> None:
        for a in table or []:
            self.table[a.host_id] = a
        await workflow.wait_condition(
            lambda: self.signals >= MAX_SIGNALS or workflow.info().is_continue_as_new_suggested()
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(list(self.table.values()))

    @workflow.signal
    def announce(self, a: Announcement) -> None:
        self.signals += 1
        self.table = heard(self.table, a, workflow.now())
        workflow.set_current_details(
            "agents: " + ", ".join(f"{h} ({len(x.vms)} VMs)" for h, x in sorted(self.table.items()))
        )

    @workflow.query
    def agents(self) -> list[Announcement]:
        return sorted(self.table.values(), key=lambda a: a.host_id)
