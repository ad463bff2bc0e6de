"""Configuration from the environment (and the embedded stack's state file).

SENDENSE_HOME        state directory of the embedded stack (default ~/.sendense)
SENDENSE_TEMPORAL    Temporal frontend address (default 127.0.0.1:7233, or what `sendense up` recorded)
SENDENSE_NAMESPACE   Temporal namespace (default `default`)
SENDENSE_TLS_CERT / SENDENSE_TLS_KEY / SENDENSE_TLS_CA   client TLS (mTLS) for a real deployment
SENDENSE_TLS_SERVER_NAME   the name the server's certificate must carry (default: the address's host)
SENDENSE_CODEC_KEY   file of the payload encryption key (32 bytes; default SENDENSE_HOME/codec.key)
SENDENSE_CODEC_OLD_KEYS    retired key files, separated by ':', still accepted for decryption
SENDENSE_HOST_ID     stable id of this host; its agent serves task queue host-<id>
SENDENSE_DATA_LISTEN     host:port where this host's agent serves source disks to other agents
SENDENSE_DATA_ADVERTISE  host:port other agents reach it at (default: SENDENSE_DATA_LISTEN)
SENDENSE_AGENT_CERT / SENDENSE_AGENT_KEY / SENDENSE_AGENT_CA   this agent's certificate for data
                     connections between agents (default SENDENSE_HOME/agent/agent.pem,
                     agent-key.pem, ca.pem; `sendense certs agent` makes them)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

CONTROL_QUEUE = "sendense-control"
WORKFLOW_ID_PREFIX = "job-"
SEARCH_ATTRIBUTES = {
    "SendenseJob": "Keyword",
    "SendenseSource": "Keyword",
    "SendenseTarget": "Keyword",
    "SendenseVm": "Keyword",
    "SendenseState": "Keyword",
    "SendenseOperation": "Keyword",  # a disaster-recovery operation's kind: drill (workflows.drill)
}


def home() -> Path:
    return Path(os.environ.get("SENDENSE_HOME") or Path.home() / ".sendense").expanduser()


def host_id() -> str:
    """A stable id for this host: SENDENSE_HOST_ID, else derived from /etc/machine-id, else hostname."""
    explicit = os.environ.get("SENDENSE_HOST_ID")
    if explicit:
        return explicit
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            mid = Path(p).read_text().strip()
        except OSError:
            continue
        if mid:
            return hashlib.sha256(mid.encode()).hexdigest()[:12]
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


def host_queue(host: str | None = None) -> str:
    return f"host-{host or host_id()}"


def host_of_queue(queue: str) -> str:
    """The host id a host queue belongs to (host-<id>)."""
    return queue.removeprefix("host-")


def data_listen() -> tuple[str, int] | None:
    """Where this agent serves source disks to other agents (SENDENSE_DATA_LISTEN), or None."""
    raw = os.environ.get("SENDENSE_DATA_LISTEN", "").strip()
    return _host_port(raw, "SENDENSE_DATA_LISTEN") if raw else None


def data_advertise(bound: tuple[str, int]) -> str:
    """host:port other agents reach this one's data server at."""
    raw = os.environ.get("SENDENSE_DATA_ADVERTISE", "").strip()
    if raw:
        _host_port(raw, "SENDENSE_DATA_ADVERTISE")
        return raw
    return f"{bound[0]}:{bound[1]}" if ":" not in bound[0] else f"[{bound[0]}]:{bound[1]}"


def _host_port(raw: str, var: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{var}={raw}: not host:port")
    return host, int(port)


@dataclass(frozen=True)
class AgentTlsFiles:
    cert: Path
    key: Path
    ca: Path


def agent_tls_files() -> AgentTlsFiles:
    """This agent's certificate, key and the deployment's CA for data connections between agents."""
    d = home() / "agent"
    return AgentTlsFiles(
        cert=Path(os.environ.get("SENDENSE_AGENT_CERT") or d / "agent.pem").expanduser(),
        key=Path(os.environ.get("SENDENSE_AGENT_KEY") or d / "agent-key.pem").expanduser(),
        ca=Path(os.environ.get("SENDENSE_AGENT_CA") or d / "ca.pem").expanduser(),
    )


def workflow_id(job: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{job}"


LINK_WORKFLOW_PREFIX = "link-"


def link_workflow_id(link: str) -> str:
    """The governor of a site link's bandwidth (workflows.governor), on the control queue."""
    return f"{LINK_WORKFLOW_PREFIX}{link}"


def drill_schedule_id(job: str) -> str:
    """The Temporal Schedule of a job's drills (`sendense drill schedule`)."""
    return f"drill-schedule-{job}"


@dataclass
class TemporalConfig:
    address: str
    namespace: str
    ui_url: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None


def stack_file(state: Path | None = None) -> Path:
    return (state or home()) / "stack.json"


def temporal_config() -> TemporalConfig:
    """Environment first; otherwise what the embedded stack recorded; otherwise the defaults."""
    recorded: dict[str, object] = {}
    try:
        recorded = json.loads(stack_file().read_text())
    except (OSError, ValueError):
        pass
    address = os.environ.get("SENDENSE_TEMPORAL") or str(recorded.get("address") or "127.0.0.1:7233")
    ui = recorded.get("ui_url") if not os.environ.get("SENDENSE_TEMPORAL") else None
    return TemporalConfig(
        address=address,
        namespace=os.environ.get("SENDENSE_NAMESPACE", "default"),
        ui_url=str(ui) if ui else None,
        tls_cert=os.environ.get("SENDENSE_TLS_CERT"),
        tls_key=os.environ.get("SENDENSE_TLS_KEY"),
        tls_ca=os.environ.get("SENDENSE_TLS_CA"),
        tls_server_name=os.environ.get("SENDENSE_TLS_SERVER_NAME") or None,
    )


def codec_key_path() -> Path:
    """The payload encryption key in use: SENDENSE_CODEC_KEY, else SENDENSE_HOME/codec.key."""
    explicit = os.environ.get("SENDENSE_CODEC_KEY")
    return Path(explicit).expanduser() if explicit else home() / "codec.key"


def codec_old_key_paths() -> list[Path]:
    """Retired payload keys (SENDENSE_CODEC_OLD_KEYS, ':'-separated): decrypt only."""
    raw = os.environ.get("SENDENSE_CODEC_OLD_KEYS", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


# ------------------------------------------------------------------------------ local labs
# A lab started on this machine registers the credentials it hands out for its endpoint, so that an
# agent already running here (the embedded stack's worker) reaches it without a restart with a new
# environment. Only an endpoint a lab registered gets them: a real platform's never does.


def _labs_file() -> Path:
    return home() / "labs" / "endpoints.json"


def _read_labs() -> dict[str, dict[str, str]]:
    try:
        data = json.loads(_labs_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def register_lab(endpoint: str, env: dict[str, str]) -> None:
    labs = _read_labs()
    labs[endpoint] = env
    _write_private(_labs_file(), json.dumps(labs, indent=1) + "\n")


def unregister_lab(endpoint: str) -> None:
    labs = _read_labs()
    if labs.pop(endpoint, None) is not None:
        _write_private(_labs_file(), json.dumps(labs, indent=1) + "\n")


def lab_env(endpoint: str | None) -> dict[str, str] | None:
    """The environment a local lab registered for `endpoint` (its credentials), or None."""
    if not endpoint:
        return None
    return _read_labs().get(endpoint.rstrip("/"))


def _write_private(path: Path, text: str) -> None:
    """`path` (0600, in a 0700 directory) written through a fresh temporary file: the credentials a
    lab hands out never go through a file or symlink someone planted."""
    from sendense.private import private_dir  # (private imports errors only; config is imported first)

    private_dir(path.parent, "labs directory")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
