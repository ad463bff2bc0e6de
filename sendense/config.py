"""Configuration from the environment (and the embedded stack's state file).

SENDENSE_HOME        state directory of the embedded stack (default ~/.sendense)
SENDENSE_TEMPORAL    Temporal frontend address (default 127.0.0.1:7233, or what `sendense up` recorded)
SENDENSE_NAMESPACE   Temporal namespace (default `default`)
SENDENSE_TLS_CERT / SENDENSE_TLS_KEY / SENDENSE_TLS_CA   client TLS for a real deployment
SENDENSE_HOST_ID     stable id of this host; its agent serves task queue host-<id>
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
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


def workflow_id(job: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{job}"


@dataclass
class TemporalConfig:
    address: str
    namespace: str
    ui_url: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None


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
    )
