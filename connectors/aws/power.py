"""The power of an AWS source instance (sendense.protocols.SourcePower), for failover and failback.

EC2 has no pause: `pause_vm` is `StopInstances` (`pause_stops`), and so is `power_off_vm`.
- StopInstances without Force first: EC2 shuts the guest OS down (it flushes its caches, so a final
  sync after it reads a cleanly stopped guest); after `force_after` seconds still `stopping`, the stop
  is repeated with Force=True (EC2's forced stop, as for a hung guest). Both wait until
  DescribeInstances says `stopped`: a `stopping` instance may still write its volumes, so a pause that
  returned earlier would let writes land after the final sync.
- `resume_vm` and `power_on_vm` are StartInstances, waited for until `running` (the guest boots
  afresh: a resume on EC2 is a restart). An instance stopping is waited for until stopped first.
- `power_state`: one DescribeInstances in bounded time (one attempt, connect and read within
  `state_seconds`): pending, running or stopping: running (it may write); stopped: stopped;
  shutting-down, terminated or unknown: gone; no answer, throttled or failing: unreachable. Bad
  credentials or a missing permission raise (AccessDenied): a configuration fault, not a source down.
Needs `ec2:DescribeInstances`, `ec2:StopInstances`, `ec2:StartInstances`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from connectors.aws.client import Aws, aws_call
from connectors.aws.spec import AwsSource
from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError
from sendense.protocols import PowerState

log = logging.getLogger(__name__)

STATES: dict[str, PowerState] = {
    "pending": "running",
    "running": "running",
    "stopping": "running",
    "stopped": "stopped",
    "shutting-down": "gone",
    "terminated": "gone",
}


class AwsSourcePower:
    platform = "aws"
    can_power_on = True
    pause_stops = True
    state_seconds = 5.0  # power_state answers within about this
    poll_seconds = 1.0  # between looks at the instance's state
    force_after = 120.0  # a stop still under way after this is forced
    wait_seconds = 900.0  # for a stop or a start to end

    def __init__(self, job: str, spec: AwsSource) -> None:
        self.job, self.spec = job, spec
        self.iid = spec.instance_id
        self.aws = Aws(spec.region, spec.endpoint_url)
        self._ec2: Any = None

    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = self.aws.client("ec2")
        return self._ec2

    def _instance(self, ec2: Any = None) -> dict[str, Any] | None:
        """The instance, None when EC2 does not know it (or no longer: terminated)."""
        try:
            with aws_call(self.aws, f"ec2 DescribeInstances {self.iid}"):
                res = (ec2 or self.ec2).describe_instances(InstanceIds=[self.iid])
        except ResourceNotFound:
            return None
        insts = [i for r in res.get("Reservations", []) for i in r.get("Instances", [])]
        return dict(insts[0]) if insts else None

    @staticmethod
    def _state(inst: dict[str, Any] | None) -> str:
        return "terminated" if inst is None else str(inst["State"]["Name"])

    def power_state(self) -> PowerState:
        try:
            inst = self._instance(self.aws.client("ec2", timeout=self.state_seconds))
        except ResourceUnavailable as e:
            log.warning("source instance %s: no answer: %s", self.iid, e)
            return "unreachable"
        return STATES.get(self._state(inst), "running")  # (a state EC2 adds later: not proven off)

    # ------------------------------------------------------------------ stop

    def _stop(self, force: bool) -> None:
        with aws_call(self.aws, f"ec2 StopInstances {self.iid}" + (" (forced)" if force else "")):
            self.ec2.stop_instances(InstanceIds=[self.iid], Force=force)

    def _stopped(self, verb: str) -> None:
        """Stop the instance and wait until EC2 says stopped (gone: nothing to do)."""
        t0 = time.monotonic()
        asked = forced = False
        while True:
            state = self._state(self._instance())
            if state == "stopped" or STATES.get(state) == "gone":
                if asked:
                    log.info("source instance %s: stopped (%s) in %.1f s", self.iid, verb,
                             time.monotonic() - t0)  # fmt: skip
                return
            waited = time.monotonic() - t0
            if state == "running" and not asked:
                self._stop(force=False)
                asked = True
            elif state == "stopping" and not forced and waited > self.force_after:
                log.warning("source instance %s: still stopping after %.0f s: forcing the stop", self.iid,
                            waited)  # fmt: skip
                self._stop(force=True)
                asked = forced = True
            elif waited > self.wait_seconds:
                raise ResourceUnavailable(
                    f"source instance {self.iid}: still {state} after {self.wait_seconds:.0f}s ({verb})"
                )
            time.sleep(self.poll_seconds)

    def pause_vm(self) -> None:
        """StopInstances, waited for (EC2 has no pause: see the module)."""
        self._stopped("pause")

    def power_off_vm(self) -> None:
        self._stopped("power off")

    # ------------------------------------------------------------------ start

    def _started(self, verb: str, inst: dict[str, Any]) -> None:
        t0 = time.monotonic()
        asked = moved = False  # StartInstances sent; the instance was seen starting since
        launched = inst.get("LaunchTime")  # a start sets a new one
        while True:
            state = self._state(inst)
            if state == "running":
                if asked:
                    log.info("source instance %s: running (%s) in %.1f s", self.iid, verb,
                             time.monotonic() - t0)  # fmt: skip
                return
            if STATES.get(state) == "gone":
                raise ResourceNotFound(f"source instance {self.iid}: {state} ({verb})")
            moved = moved or (asked and (state == "pending" or inst.get("LaunchTime") != launched))
            if state == "stopped" and moved:  # it started and stopped again: its guest shut down
                reason = inst.get("StateReason", {}).get("Message", "")
                why = f" ({reason})" if reason else ""
                raise SendenseError(f"source instance {self.iid}: stopped again after its start{why}")
            if state == "stopped" and not asked:
                with aws_call(self.aws, f"ec2 StartInstances {self.iid}"):
                    self.ec2.start_instances(InstanceIds=[self.iid])
                asked = True
            elif time.monotonic() - t0 > self.wait_seconds:
                raise ResourceUnavailable(
                    f"source instance {self.iid}: still {state} after {self.wait_seconds:.0f}s ({verb})"
                )
            time.sleep(self.poll_seconds)
            inst = self._instance() or {"State": {"Name": "terminated"}}

    def resume_vm(self) -> None:
        """StartInstances of the stopped instance, waited for until running; gone: nothing to do."""
        inst = self._instance()
        if inst is not None and STATES.get(self._state(inst)) != "gone":
            self._started("resume", inst)

    def power_on_vm(self) -> None:
        inst = self._instance()
        if inst is None or STATES.get(self._state(inst)) == "gone":
            raise ResourceNotFound(
                f"source.instance_id: instance {self.iid} is {self._state(inst)} in {self.aws.where()}: "
                "nothing to start"
            )
        self._started("power on", inst)
