"""`CloudStackLab`: start, find, use and stop a lab server process (`python -m labs.cloudstack serve`).

The server writes DIR/lab.json (0600) once it listens: its API URL, zone, API key and secret key, pid.
Started as root, its hosts' libvirtds run inside it (they die with it); not as root, configure
`libvirt=False` (hosts are listed Disconnected and VMs cannot start).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from labs.cloudstack.state import LabConfig
from tools.qemu import die_with_parent

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[2]


class CloudStackLabError(RuntimeError):
    """The lab could not be started, reached or used."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _is_lab_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"labs.cloudstack" in cmdline and b"serve" in cmdline


class CloudStackLab:
    def __init__(self, root: Path, config: LabConfig | None = None, *, port: int = 0) -> None:
        self.root = Path(root)
        self.config = config or LabConfig(libvirt=os.geteuid() == 0)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def lab_json(self) -> Path:
        return self.root / "lab.json"

    @property
    def log_path(self) -> Path:
        return self.root / "lab.log"

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def base(self) -> str:
        return self.url.rsplit("/client/api", 1)[0]

    def start(self, detached: bool = False, timeout: float = 120) -> CloudStackLab:
        """Spawn the server and wait until it answers (its hosts' libvirtds start first: seconds with a
        warm QEMU capabilities cache). Not detached, it dies with the thread that started it."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.lab_json.unlink(missing_ok=True)
        self.config.save(self.root / "config.json")
        cmd = [
            sys.executable,
            "-m",
            "labs.cloudstack",
            "serve",
            "--dir",
            str(self.root),
            "--port",
            str(self.port),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd if detached else die_with_parent(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=detached,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise CloudStackLabError(f"the CloudStack lab exited at start: {self._last_log_line()}")
            if self._load() and self._healthy():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise CloudStackLabError(f"the CloudStack lab did not answer within {timeout:.0f} s")
            time.sleep(0.05)

    @classmethod
    def attach(cls, root: Path) -> CloudStackLab:
        lab = cls(root, LabConfig(libvirt=False))
        if not lab._load() or not _alive(int(lab.info["pid"])) or not lab._healthy():
            raise CloudStackLabError(f"no CloudStack lab is running from {root}")
        return lab

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self._load() and _alive(int(self.info["pid"])) and _is_lab_server(int(self.info["pid"]))

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (the server stops its VMs and libvirtds), then SIGKILL after `timeout`."""
        pid = self.proc.pid if self.proc is not None else int(self.info.get("pid", 0)) if self._load() else 0
        if pid and _alive(pid) and (self.proc is not None or _is_lab_server(pid)):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                if self.proc is not None:
                    self.proc.poll()
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
            self.proc = None
        self.lab_json.unlink(missing_ok=True)

    def __enter__(self) -> CloudStackLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def control(self, method: str, path: str, body: Any = None) -> Any:
        """Call a /_lab endpoint (server.py); JSON answers decoded, text as text."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                ctype = r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raise CloudStackLabError(
                f"lab {method} {path}: {e.code} {e.read().decode(errors='replace')}"
            ) from e
        return json.loads(raw) if ctype.startswith("application/json") else raw.decode(errors="replace")

    def _load(self) -> bool:
        try:
            self.info = json.loads(self.lab_json.read_text())
        except (OSError, ValueError):
            return False
        return "pid" in self.info

    def _healthy(self) -> bool:
        try:
            return bool(self.control("GET", "/_lab/health").get("ok"))
        except (CloudStackLabError, OSError, KeyError):
            return False

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"
