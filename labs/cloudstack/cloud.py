"""The lab's management server core: the state, the hosts, the async jobs and the command table.

A command is sync (its answer now) or async (`jobid` now, its result through queryAsyncJobResult).
An async command checks its parameters before it answers, as CloudStack's dispatcher does (a missing
or unknown id is a 431 at once); what the job then finds (a wrong state, no capacity, a host that
fails) ends the job with `jobstatus` 2 and the error in `jobresult`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labs.cloudstack import wire
from labs.cloudstack.faults import Faults
from labs.cloudstack.hosts import HostError, LabHost
from labs.cloudstack.state import Job, LabConfig, LabState, new_id, now_text
from labs.cloudstack.wire import ApiError

log = logging.getLogger(__name__)


class Params:
    """A request's parameters, names matched case-insensitively; `command` names the API command."""

    def __init__(self, command: str, raw: dict[str, str]) -> None:
        self.command = command
        self._p = {k.lower(): v for k, v in raw.items()}

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._p.get(name.lower(), default)

    def need(self, name: str) -> str:
        v = self._p.get(name.lower())
        if v is None or v == "":
            raise wire.missing(self.command, name)
        return v

    def flag(self, name: str, default: bool = False) -> bool:
        v = self.get(name)
        return default if v is None else v.lower() == "true"

    def integer(self, name: str, *, required: bool = False) -> int | None:
        v = self.need(name) if required else self.get(name)
        if v is None:
            return None
        try:
            return int(v)
        except ValueError:
            raise wire.ApiError(
                wire.PARAM_ERROR,
                f"Unable to execute API command {self.command.lower()} due to invalid value {v} for "
                f"parameter {name}",
                wire.CS_SERVER_API,
            ) from None

    def entity(self, name: str, table: dict[str, Any], *, required: bool = True) -> Any:
        v = self.need(name) if required else self.get(name)
        if v is None:
            return None
        if v not in table:
            raise wire.bad_value(self.command, name, v)
        return table[v]


@dataclass
class AsyncWork:
    """What an async command does once its job runs; `answer` is what the call returns beside jobid."""

    cmd: str
    run: Callable[[], dict[str, Any]]
    instancetype: str | None = None
    instanceid: str | None = None
    answer: dict[str, Any] | None = None


SyncHandler = Callable[["Cloud", Params], dict[str, Any]]
AsyncHandler = Callable[["Cloud", Params], AsyncWork]


class Cloud:
    def __init__(self, root: Path, config: LabConfig, guest_image: Path) -> None:
        self.root = root
        self.config = config
        self.state = LabState(root, config, guest_image)
        self.faults = Faults()
        self.hosts: dict[str, LabHost] = {}
        for n, name in enumerate(config.hosts, 1):  # short directories: libvirt's socket paths
            hid = new_id()
            self.hosts[hid] = LabHost(hid, name, root / f"h{n}", config.host_cpus, config.host_memory_mib)
        self._jobs = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cs-lab-job")
        from labs.cloudstack import commands

        self.sync: dict[str, SyncHandler] = dict(commands.SYNC)
        self.asynchronous: dict[str, AsyncHandler] = dict(commands.ASYNC)

    def start_hosts(self) -> None:
        """Start each host's libvirtd (root), one after the other, on the calling (long-lived) thread:
        the daemons die with the thread that started them."""
        if not self.config.libvirt:
            return
        cache = Path(self.config.libvirt_cache) if self.config.libvirt_cache else None
        for host in self.hosts.values():
            host.start(cache)

    def close(self) -> None:
        self._jobs.shutdown(wait=True, cancel_futures=True)
        for host in self.hosts.values():
            try:
                host.stop()
            except Exception:  # noqa: BLE001 - stop every host
                log.exception("stopping lab host %s", host.name)

    def known(self, command: str) -> bool:
        return command in self.sync or command in self.asynchronous

    def call(self, command: str, raw: dict[str, str]) -> dict[str, Any]:
        """Run a verified command: its answer (a sync command's payload, or {jobid, ...})."""
        params = Params(command, raw)
        if command in self.sync:
            with self.state.lock:
                return _paged(self.sync[command](self, params), params)
        with self.state.lock:
            work = self.asynchronous[command](self, params)
            job = Job(new_id(), command, work.cmd, work.instancetype, work.instanceid)
            self.state.jobs[job.id] = job
        self._jobs.submit(self._run, job, work)
        return {**(work.answer or {}), "jobid": job.id}

    def _run(self, job: Job, work: AsyncWork) -> None:
        started = time.monotonic()
        failure = self.faults.job_failure(job.command)
        try:
            if failure is not None:
                raise failure
            result = work.run()
            status, code = 1, 0
        except ApiError as e:
            result, status, code = e.body(), 2, e.errorcode
        except HostError as e:
            err = ApiError(wire.RESOURCE_UNAVAILABLE_ERROR, str(e), wire.CS_RESOURCE_UNAVAILABLE)
            result, status, code = err.body(), 2, err.errorcode
        except Exception as e:  # noqa: BLE001 - a job's failure is its result
            log.exception("job %s (%s) failed", job.id, job.command)
            err = ApiError(wire.INTERNAL_ERROR, f"{job.command} failed: {e}", wire.CS_CLOUD_RUNTIME)
            result, status, code = err.body(), 2, err.errorcode
        left = self.config.job_delay - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)
        with self.state.lock:
            job.result, job.resultcode, job.completed = result, code, now_text()
            job.status = status
        log.info("job %s %s: %s", job.id, job.command, "done" if status == 1 else f"failed {code}")

    def job_view(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {
            "accountid": ACCOUNT_ID,
            "userid": USER_ID,
            "cmd": job.cmd,
            "jobstatus": job.status,
            "jobprocstatus": 0,
            "jobresultcode": job.resultcode,
            "jobresulttype": "object",
            "created": job.created,
            "jobid": job.id,
        }
        if job.instancetype:
            out["jobinstancetype"] = job.instancetype
        if job.instanceid:
            out["jobinstanceid"] = job.instanceid
        if job.status != 0:
            out["jobresult"] = job.result
            out["completed"] = job.completed
        return out


def _paged(payload: dict[str, Any], p: Params) -> dict[str, Any]:
    """A list answer narrowed to `page` (from 1) of `pagesize` items; `count` stays the total."""
    size, page = p.integer("pagesize"), p.integer("page") or 1
    items = [k for k in payload if k != "count"]
    if size is None or "count" not in payload or len(items) != 1:
        return payload
    if size < 1 or page < 1:
        raise ApiError(
            wire.PARAM_ERROR, "page and pagesize must be positive", wire.CS_INVALID_PARAMETER_VALUE
        )
    [key] = items
    return {"count": payload["count"], key: payload[key][(page - 1) * size : page * size]}


ACCOUNT_ID = new_id()
USER_ID = new_id()
