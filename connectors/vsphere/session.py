"""Sessions with a vCenter or ESXi host through pyvmomi: credentials from the agent, the server pinned
by its certificate's thumbprint, one session per (server, user) kept and renewed, VMs found by name,
inventory path, instance UUID or moref, tasks waited for, faults said in one line.

- Credentials: `login` names a set the agent holds (VSPHERE_CREDENTIALS in spec.py); they are never in
  a spec, an error, a log line or a handle.
- The certificate is fetched first and its SHA-1 or SHA-256 digest compared with the spec's
  thumbprint; pyvmomi checks the same thumbprint again on its own connection (no window between the
  two). The SHA-1 thumbprint of the pinned certificate is what VDDK is given. `insecure` skips the
  comparison with a warning on every connect.
- A session that expired (vCenter drops idle sessions after 30 minutes) is replaced on next use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from connectors.vsphere.spec import VspherePlace, normal_thumbprint, vm_form
from connectors.vsphere.vddk import VddkTarget, agent_libdir, plugin_words
from sendense import config
from sendense.errors import (
    InvalidSpec,
    NotAllowed,
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    ServerUnreachable,
    TargetError,
)
from sendense.models import SourceSpec

log = logging.getLogger(__name__)

TASK_TIMEOUT = 6 * 3600.0  # a snapshot removal that consolidates a large delta takes hours
CONNECT_TIMEOUT = 20.0


def env_prefix(login: str) -> str:
    return "SENDENSE_VSPHERE_" if login == "default" else f"SENDENSE_VSPHERE_{login.upper()}_"


def endpoint(spec: VspherePlace) -> str:
    """The server as the agent's policy and a lab's registration name it: vsphere:<host>:<port>."""
    h, port = spec.address()
    return f"vsphere:{h}:{port}"


def agent_env(spec: VspherePlace) -> dict[str, str]:
    """The agent's environment for this server: its own, over what a lab this agent's user started on
    this machine registered for it (`sendense lab up`: the lab's login and its VDDK stand-in)."""
    return {**(config.lab_env(endpoint(spec)) or {}), **os.environ}


def credentials(spec: VspherePlace, end: str = "source") -> tuple[str, str]:
    """(user, password) of the spec's login; a one-line error naming the variables if unset."""
    login, env = spec.login, agent_env(spec)
    p = env_prefix(login)
    path = env.get(p + "FILE")
    if path:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()  # noqa: SIM115 (read at once)
        except OSError as e:
            raise InvalidSpec(f"{end}.login {login}: cannot read {p}FILE: {e.strerror}") from None
        if len(lines) < 2 or not lines[0]:
            raise InvalidSpec(f"{end}.login {login}: {p}FILE must hold two lines: the user, the password")
        return lines[0], lines[1]
    user, password = env.get(p + "USER"), env.get(p + "PASSWORD")
    if not user or password is None:
        raise InvalidSpec(
            f"{end}.login {login}: the agent has no vSphere credentials for it "
            f"(set {p}USER and {p}PASSWORD, or {p}FILE)"
        )
    return user, password


@dataclass(frozen=True)
class Certificate:
    sha1: str  # lowercase hex, no colons
    sha256: str

    def vddk_thumbprint(self) -> str:
        """SHA-1 as VDDK takes it: uppercase, colon separated."""
        return ":".join(self.sha1[i : i + 2] for i in range(0, 40, 2)).upper()


def server_certificate(host: str, port: int, where: str, timeout: float = CONNECT_TIMEOUT) -> Certificate:
    """The server's certificate digests (fetched without trusting it: it is compared next)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as e:
        raise ServerUnreachable(f"{where}: cannot connect: {getattr(e, 'strerror', None) or e}") from None
    if not der:
        raise ServerUnreachable(f"{where}: the server sent no certificate")
    return Certificate(hashlib.sha1(der).hexdigest(), hashlib.sha256(der).hexdigest())


def config_options(config: Any) -> dict[str, str]:
    """A configuration's extraConfig (a VM's or a snapshot's) as a dict: the last value of a key wins;
    an empty value is no value."""
    out: dict[str, str] = {}
    for o in (config.extraConfig if config is not None else None) or []:
        out[o.key] = str(o.value) if o.value is not None else ""
    return {k: v for k, v in out.items() if v != ""}


def snapshot_nodes(vm: Any) -> list[Any]:
    """Every node of the VM's snapshot tree (parents before their children)."""
    todo = list(vm.snapshot.rootSnapshotList) if vm.snapshot is not None else []
    out = []
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(n.childSnapshotList or [])
    return out


def extra_config(vm: Any) -> dict[str, str]:
    """The VM's extraConfig as a dict (config_options of its configuration)."""
    return config_options(vm.config)


def fault_text(e: BaseException) -> str:
    """One line from a vSphere fault (its message, else its type)."""
    msg = getattr(e, "msg", None) or ""
    if not msg:
        faults = getattr(e, "faultMessage", None) or []
        msg = "; ".join(m.message for m in faults if getattr(m, "message", None))
    kind = type(e).__name__.rpartition(".")[2]
    text = f"{kind}: {msg}" if msg else kind
    return " ".join(text.split())


def is_fault(e: BaseException, *names: str) -> bool:
    """Whether `e` is a vSphere fault of one of these types (or a subtype): vim.fault.FileFault..."""
    from pyVmomi import vim, vmodl

    for n in names:
        t = getattr(vim.fault, n, None) or getattr(vmodl.fault, n, None)
        if t is not None and isinstance(e, t):
            return True
    return False


class Session:
    """A logged-in vSphere session (pyvmomi ServiceInstance) and what the connectors ask of it."""

    def __init__(self, spec: VspherePlace, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.spec = spec
        self.connect_timeout = connect_timeout
        self.host, self.port = spec.address()
        self.where = f"vSphere {spec.server}"
        self.end = "source" if isinstance(spec, SourceSpec) else "target"
        self._si: Any = None
        self.cert: Certificate | None = None

    # ---------------------------------------------------------------- connect

    def _connect(self) -> Any:
        from pyVim.connect import SmartConnect
        from pyVmomi import vim

        cert = server_certificate(self.host, self.port, self.where, self.connect_timeout)
        pinned = None
        if self.spec.thumbprint is not None:
            pinned = normal_thumbprint(self.spec.thumbprint)
            if pinned not in (cert.sha1, cert.sha256):
                raise NotAllowed(
                    f"{self.where}: the server's certificate does not match {self.end}.thumbprint "
                    f"(it has SHA-1 {cert.vddk_thumbprint()})"
                )
        else:
            log.warning("%s: certificate not checked (%s.insecure)", self.where, self.end)
        user, password = credentials(self.spec, self.end)
        try:
            si = SmartConnect(
                host=self.host,
                port=self.port,
                user=user,
                pwd=password,
                disableSslCertValidation=True,  # pinned by thumbprint instead (checked on this connection)
                thumbprint=pinned or cert.sha1,
                connectionPoolTimeout=-1,
            )
        except vim.fault.InvalidLogin:
            raise NotAllowed(
                f"{self.where}: login {self.spec.login!r} refused: wrong user or password"
            ) from None
        except Exception as e:  # noqa: BLE001 (sockets, TLS, SOAP: each said in one line)
            if "thumbprint" in str(e).lower():
                raise NotAllowed(f"{self.where}: the certificate changed while connecting") from None
            raise ServerUnreachable(f"{self.where}: cannot log in: {fault_text(e)}") from None
        self.cert = cert
        return si

    @property
    def si(self) -> Any:
        """The session's ServiceInstance: one per (server, login, thumbprint) in this process, kept,
        and replaced when vCenter has dropped it."""
        user, password = credentials(self.spec, self.end)
        who = hashlib.sha256(
            f"{user}\0{password}".encode()
        ).hexdigest()  # (changed credentials: a new session)
        key = (self.host, self.port, who, self.spec.thumbprint or "", self.spec.insecure)
        with _lock:
            cached = _sessions.get(key)
            if cached is not None and _alive(cached[0]):
                self._si, self.cert = cached
                return self._si
            si = self._connect()
            assert self.cert is not None
            _sessions[key] = (si, self.cert)
            self._si = si
            return si

    @property
    def content(self) -> Any:
        return self.si.RetrieveContent()

    # ---------------------------------------------------------------- inventory

    def find_vm(
        self, vm: str, datacenter: str | None, instance_uuid: str | None = None, field: str = "source.vm"
    ) -> Any:
        """The VM the spec names (`field`); a one-line error if there is none or the name is ambiguous."""
        from pyVmomi import vim, vmodl

        content = self.content
        form = vm_form(vm)
        found: Any = None
        try:
            if form == "moref":
                found = vim.VirtualMachine(vm, self.si._stub)
                found.name  # noqa: B018 (resolves it: ManagedObjectNotFound if there is none)
            elif form == "uuid":
                dc = self._datacenter(datacenter)
                found = content.searchIndex.FindByUuid(dc, vm, True, True) or content.searchIndex.FindByUuid(
                    dc, vm, True, False
                )
            elif form == "path":
                found = content.searchIndex.FindByInventoryPath(vm.lstrip("/"))
                if found is not None and not isinstance(found, vim.VirtualMachine):
                    raise InvalidSpec(f"{field} {vm}: that inventory path is not a VM")
            else:
                root = self._datacenter(datacenter) or content.rootFolder
                matches = [v for v, name in self._names(root) if name == vm]
                if len(matches) > 1:
                    raise InvalidSpec(
                        f"{field} {vm}: {len(matches)} VMs have that name on {self.spec.server}; "
                        "give its inventory path or instance UUID"
                    )
                found = matches[0] if matches else None
        except vmodl.fault.ManagedObjectNotFound:
            found = None
        if found is None:
            raise ResourceNotFound(f"{field} {vm}: no such VM on {self.spec.server}")
        if instance_uuid is not None:
            got = found.config.instanceUuid if found.config is not None else ""
            if got.lower() != instance_uuid.lower():
                raise ResourceNotFound(
                    f"{field} {vm}: the VM of that name now is another VM (instance UUID {got}, "
                    f"the job was made for {instance_uuid})"
                )
        return found

    def _datacenter(self, name: str | None) -> Any:
        if name is None:
            return None
        from pyVmomi import vim

        for dc in self.content.rootFolder.childEntity:
            if isinstance(dc, vim.Datacenter) and dc.name == name:
                return dc
        raise ResourceNotFound(f"{self.end}.datacenter {name}: no such datacenter on {self.spec.server}")

    def _names(self, root: Any) -> Iterator[tuple[Any, str]]:
        """(VM, name) of every VM under `root`, in one property collector round trip."""
        from pyVmomi import vim, vmodl

        content = self.content
        view = content.viewManager.CreateContainerView(root, [vim.VirtualMachine], True)
        try:
            spec = vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[
                    vmodl.query.PropertyCollector.ObjectSpec(
                        obj=view,
                        skip=True,
                        selectSet=[
                            vmodl.query.PropertyCollector.TraversalSpec(
                                name="v", path="view", skip=False, type=vim.view.ContainerView
                            )
                        ],
                    )
                ],
                propSet=[
                    vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])
                ],
            )
            pc = content.propertyCollector
            result = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
            while result is not None:
                for o in result.objects:
                    yield o.obj, next((p.val for p in o.propSet if p.name == "name"), "")
                token = result.token
                result = pc.ContinueRetrievePropertiesEx(token) if token else None
        finally:
            view.Destroy()

    # ---------------------------------------------------------------- disk bytes

    def vddk(self, vm: str, file: str, snapshot: str | None) -> VddkTarget:
        """What nbdkit's vddk plugin opens for disk `file` of VM `vm` (moref) at `snapshot` (None: the
        VM's current disk): this session's server, login and pinned certificate, the spec's transports
        and libdir, the agent's plugin."""
        user, password = credentials(self.spec, self.end)
        env = agent_env(self.spec)
        self.si  # noqa: B018 (logs in and pins the certificate)
        assert self.cert is not None
        return VddkTarget(
            host=self.host,
            port=self.port,
            user=user,
            password=password,
            thumbprint=self.cert.vddk_thumbprint(),
            vm=vm,
            file=file,
            snapshot=snapshot,
            transports=tuple(self.spec.vddk.transports),
            libdir=agent_libdir(self.spec.vddk.libdir, env),
            plugin=plugin_words(env),
        )

    # ---------------------------------------------------------------- datastore files

    def datastore_file(self, datacenter: str, path: str, limit: int = 4 << 20) -> bytes:
        """The last `limit` bytes of a datastore file (`[ds] dir/file`), through the server's `/folder`
        URL with this session's cookie, on a connection whose certificate is the pinned one. A file
        that does not exist (yet) is empty."""
        import http.client
        from urllib.parse import quote, urlencode

        ds, _, rel = path.partition("]")
        ds, rel = ds.lstrip("["), rel.strip()
        si = self.si
        cert = self.cert
        assert cert is not None
        cookie = si._stub.cookie  # vmware_soap_session="..."; Path=/; ...
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # pinned below instead
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.connect_timeout, context=ctx)
        what = f"{self.where}: reading {path}"
        try:
            conn.connect()
            der = conn.sock.getpeercert(binary_form=True) if conn.sock is not None else None
            if not der or hashlib.sha1(der).hexdigest() != cert.sha1:
                raise NotAllowed(f"{what}: the server's certificate changed")
            query = urlencode({"dcPath": datacenter, "dsName": ds})
            conn.request(
                "GET",
                f"/folder/{quote(rel)}?{query}",
                headers={"Cookie": cookie.split(";", 1)[0], "Range": f"bytes=-{limit}"},
            )
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ServerUnreachable(f"{what}: {getattr(e, 'strerror', None) or e}") from None
        finally:
            conn.close()
        if resp.status == 404:
            return b""
        if resp.status == 416:  # an empty file has no last bytes
            return b""
        if resp.status not in (200, 206):
            raise TargetError(f"{what}: HTTP {resp.status} {resp.reason}")
        return body[-limit:]

    # ---------------------------------------------------------------- tasks

    def wait(self, task: Any, what: str, timeout: float = TASK_TIMEOUT) -> Any:
        """Wait for a task; its result, or a one-line error naming `what`."""
        deadline, delay = time.monotonic() + timeout, 0.05
        while True:
            info = task.info
            if info.state == "success":
                return info.result
            if info.state == "error":
                raise task_error(what, info.error)
            if time.monotonic() > deadline:
                raise SendenseError(
                    f"{what}: not done in {timeout:.0f} s (task {task._moId})", retryable=True
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def task_error(what: str, fault: Any) -> SendenseError:
    """A task's or call's fault as the error class that says what to do about it."""
    text = f"{what}: {fault_text(fault)}"
    if is_fault(fault, "NoDiskSpace", "InsufficientDiskSpace", "OutOfBounds"):
        return TargetError(text)
    if is_fault(fault, "TaskInProgress", "InvalidPowerState", "InvalidState", "ConcurrentAccess"):
        return ResourceUnavailable(text)
    if is_fault(fault, "NoPermission", "NotAuthenticated"):
        return NotAllowed(text)
    return SendenseError(text)


@contextmanager
def calling(what: str) -> Iterator[None]:
    """Around a SOAP call: a vSphere fault becomes a one-line error naming `what`."""
    from pyVmomi import vmodl

    try:
        yield
    except vmodl.MethodFault as e:
        raise task_error(what, e) from None


def _alive(si: Any) -> bool:
    try:
        return si.content.sessionManager.currentSession is not None
    except Exception:  # noqa: BLE001 (a dropped connection or session: log in again)
        return False


_sessions: dict[tuple[Any, ...], tuple[Any, Certificate]] = {}
_lock = threading.Lock()
