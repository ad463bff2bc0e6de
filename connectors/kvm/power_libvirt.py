"""The power of a KVM source VM that is a libvirt domain (sendense.protocols.SourcePower).

- power_state: the domain's state (`virDomainGetState`), asked in a thread given a few seconds: a
  libvirt that does not answer (a remote host over ssh that is down) is "unreachable", never a hang.
  running, blocked or shutting down: running; paused or PM-suspended: paused; shut off or crashed:
  stopped; no such domain (or another VM under the name: the job's UUID is not its): gone.
- pause_vm: `virDomainSuspend` (QMP `stop` underneath: returns once in-flight I/O is drained); undo
  `resume_vm` (`virDomainResume` of a paused domain).
- power_off_vm: `virDomainDestroy`: libvirt sends QEMU SIGTERM, on which QEMU exits cleanly (I/O
  drained, persistent dirty bitmaps stored), and SIGKILL only if it has not exited after libvirt's
  grace period. Not a guest shutdown (`virDomainShutdown`), for the reasons `connectors.kvm.power`
  gives for QMP `quit`: at power-off the VM is paused after the final sync, and a shutdown would run
  the guest again and land writes after that point. A persistent domain stays defined (shut off).
- power_on_vm: `virDomainCreate` of a shut-off domain (a paused one is resumed). A transient domain
  is forgotten by libvirt when it stops: it is gone then, and power-on says so (ResourceNotFound).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

import libvirt

from connectors.kvm.libvirt_job import error_code, error_text, safe_uri
from sendense.errors import ResourceNotFound, ResourceUnavailable
from sendense.protocols import PowerState

log = logging.getLogger(__name__)

T = TypeVar("T")

STATE_SECONDS = 5.0

RUNNING = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_SHUTDOWN,
           libvirt.VIR_DOMAIN_NOSTATE)  # fmt: skip
PAUSED = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED)
OFF = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)


def domain_state(code: int) -> PowerState:
    if code in PAUSED:
        return "paused"
    return "stopped" if code in OFF else "running"


def bounded(fn: Callable[[], T], seconds: float) -> T:
    """fn() in a daemon thread; TimeoutError if it has not returned within `seconds` (it is left to
    finish on its own: a libvirt call cannot be interrupted)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="bounded-call", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:g}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


class LibvirtPower:
    platform = "kvm"
    can_power_on = True
    pause_stops = False
    state_seconds = STATE_SECONDS

    def __init__(self, uri: str, domain: str, *, uuid: str | None = None) -> None:
        self.uri, self.domain, self.uuid = uri, domain, uuid

    def _where(self) -> str:
        return f"libvirt domain {self.domain} on {safe_uri(self.uri)}"

    @contextmanager
    def _dom(self) -> Iterator[libvirt.virDomain | None]:
        """The job's domain, None when it is gone (no such domain, or another VM under the name).
        Raises ResourceUnavailable when libvirt cannot be reached."""
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            where = safe_uri(self.uri)
            raise ResourceUnavailable(f"libvirt {where} is unreachable: {error_text(e)}") from None
        try:
            try:
                dom = conn.lookupByName(self.domain)
            except libvirt.libvirtError as e:
                if error_code(e) != libvirt.VIR_ERR_NO_DOMAIN:
                    raise ResourceUnavailable(f"{self._where()}: lookup failed: {error_text(e)}") from None
                dom = None
            if dom is not None and self.uuid is not None and dom.UUIDString() != self.uuid:
                log.warning("%s is another VM now (UUID %s, the job's %s)", self._where(), dom.UUIDString(),
                            self.uuid)  # fmt: skip
                dom = None
            yield dom
        finally:
            with suppress(libvirt.libvirtError):
                conn.close()

    def _call(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except libvirt.libvirtError as e:
            raise ResourceUnavailable(f"{self._where()}: {what} failed: {error_text(e)}") from None

    @staticmethod
    def _code(dom: libvirt.virDomain) -> int:
        return int(dom.state()[0])

    def power_state(self) -> PowerState:
        def ask() -> PowerState:
            with self._dom() as dom:
                return "gone" if dom is None else domain_state(self._code(dom))

        try:
            return bounded(ask, self.state_seconds)
        except (TimeoutError, ResourceUnavailable, libvirt.libvirtError) as e:
            log.warning("%s: no answer: %s", self._where(), e)
            return "unreachable"

    def pause_vm(self) -> None:
        with self._dom() as dom:
            if dom is None or domain_state(self._code(dom)) != "running":
                return
            self._call("suspend", dom.suspend)
        log.info("%s: suspended", self._where())

    def resume_vm(self) -> None:
        with self._dom() as dom:
            if dom is None or self._code(dom) != libvirt.VIR_DOMAIN_PAUSED:
                return
            self._call("resume", dom.resume)
        log.info("%s: resumed", self._where())

    def power_off_vm(self) -> None:
        with self._dom() as dom:
            if dom is None or not dom.isActive():
                return
            try:
                dom.destroy()
            except libvirt.libvirtError as e:
                if error_code(e) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return  # it stopped meanwhile
                raise ResourceUnavailable(f"{self._where()}: destroy failed: {error_text(e)}") from None
        log.info("%s: powered off", self._where())

    def power_on_vm(self) -> None:
        with self._dom() as dom:
            if dom is None:
                raise ResourceNotFound(
                    f"{self._where()} is not defined (or is another VM now): nothing to start "
                    "(libvirt forgets a transient domain when it stops; the disks are current)"
                )
            code = self._code(dom)
            if code == libvirt.VIR_DOMAIN_PAUSED:
                self._call("resume", dom.resume)
            elif code in OFF:
                self._call("start", dom.create)
            else:
                return
        log.info("%s: started", self._where())
