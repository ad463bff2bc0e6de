"""`AwsLab`: start, find, use and stop a lab server process (`python -m labs.aws serve`)."""

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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tools.qemu import die_with_parent

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[2]


class AwsLabError(RuntimeError):
    """The lab could not be started, reached or used."""


@dataclass(frozen=True)
class LabInstance:
    instance_id: str
    volumes: list[tuple[str, str, int]]  # (device, volume_id, size_gib), root first


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _is_lab_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"labs.aws" in cmdline and b"serve" in cmdline


class AwsLab:
    def __init__(
        self, root: Path, *, port: int = 0, snapshot_delay: float = 0.3, host: str = "127.0.0.1"
    ) -> None:
        self.root = Path(root)
        self.port = port
        self.snapshot_delay = snapshot_delay
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None
        self._info: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def lab_json(self) -> Path:
        return self.root / "lab.json"

    @property
    def log_path(self) -> Path:
        return self.root / "lab.log"

    def start(self, detached: bool = False) -> AwsLab:
        """Spawn the server and wait (< 10 s) until it answers. Not detached, it gets SIGKILL when the
        thread that started it dies (PDEATHSIG); detached, it runs in its own session and outlives us."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.lab_json.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "labs.aws", "serve", "--dir", str(self.root), "--host", self.host]
        cmd += ["--port", str(self.port), "--snapshot-delay", str(self.snapshot_delay)]
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
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise AwsLabError(f"the AWS lab exited at start: {self._last_log_line()}")
            if self._load_info() and self._healthy():
                log.info("AWS lab up at %s (pid %d)", self.endpoint_url, self.proc.pid)
                return self
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                raise AwsLabError(f"the AWS lab did not answer within 10 s: {self._last_log_line()}")
            time.sleep(0.05)

    @classmethod
    def attach(cls, root: Path) -> AwsLab:
        """The lab already running from `root` (e.g. started detached by another process)."""
        lab = cls(root)
        if not lab._load_info() or not _alive(int(lab._info["pid"])) or not lab._healthy():
            raise AwsLabError(f"no AWS lab is running from {root}")
        return lab

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after `timeout`; also stops a detached lab known only by DIR/lab.json."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        elif self._load_info():
            pid = int(self._info["pid"])
            if _alive(pid) and _is_lab_server(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        self.lab_json.unlink(missing_ok=True)
        self._info = {}

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self._load_info() and _alive(int(self._info["pid"])) and _is_lab_server(int(self._info["pid"]))

    def __enter__(self) -> AwsLab:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _load_info(self) -> bool:
        try:
            self._info = json.loads(self.lab_json.read_text())
        except (OSError, ValueError):
            return False
        return self.proc is None or self._info.get("pid") == self.proc.pid

    def _healthy(self) -> bool:
        try:
            return bool(self._call("GET", "/_lab/health", timeout=2).get("ok"))
        except (OSError, AwsLabError):
            return False

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"

    # ------------------------------------------------------------------ connection

    def _get(self, key: str) -> Any:
        if not self._info:
            self._load_info()
        if key not in self._info:
            raise AwsLabError(f"the AWS lab in {self.root} is not running")
        return self._info[key]

    @property
    def endpoint_url(self) -> str:
        return str(self._get("endpoint_url"))

    @property
    def region(self) -> str:
        return str(self._get("region"))

    @property
    def access_key_id(self) -> str:
        return str(self._get("access_key_id"))

    @property
    def secret_access_key(self) -> str:
        return str(self._get("secret_access_key"))

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, service: str, **kwargs: Any) -> Any:
        """A boto3 client for "ec2" or "ebs" on the lab, with the lab's credentials (kwargs go to boto3)."""
        import boto3

        kwargs.setdefault("endpoint_url", self.endpoint_url)
        kwargs.setdefault("region_name", self.region)
        kwargs.setdefault("aws_access_key_id", self.access_key_id)
        kwargs.setdefault("aws_secret_access_key", self.secret_access_key)
        return boto3.session.Session().client(service, **kwargs)

    def _call(self, method: str, path: str, body: bytes | None = None, timeout: float = 600) -> Any:
        raw = self._request(method, path, body, timeout)
        return json.loads(raw) if raw else {}

    def _request(self, method: str, path: str, body: bytes | None = None, timeout: float = 600) -> bytes:
        req = urllib.request.Request(self.endpoint_url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                message = e.reason
            raise AwsLabError(f"{method} {path.split('?')[0]}: {e.code} {message}") from None

    # ------------------------------------------------------------------ the guest and the lab's helpers

    def make_instance(self, name: str, disks_gib: list[int], image: Path | None = None) -> LabInstance:
        """A running instance with a root volume and data volumes of these sizes: all zeros, or the root
        holding the disk image file `image` (the root volume grows to fit it)."""
        req: dict[str, Any] = {"name": name, "disks_gib": disks_gib}
        if image is not None:
            req["image"] = str(Path(image).resolve())
        made = self._call("POST", "/_lab/instances", json.dumps(req).encode())
        vols = [(v["device"], v["volume_id"], int(v["size_gib"])) for v in made["volumes"]]
        return LabInstance(made["instance_id"], vols)

    def make_guest_instance(self, name: str, data_disks_gib: list[int] | None = None) -> LabInstance:
        """A running instance whose root volume holds the bootable guest (`labs.guest`, built once and
        cached): its console shows SENDENSE-GUEST-READY a few seconds after the start."""
        from labs.guest.build import build

        return self.make_instance(name, [1, *(data_disks_gib or [])], image=build())

    def vm(self, instance_id: str) -> dict[str, Any]:
        """The instance's VM as the lab runs it: {"running", "pid", "disks" (volume ids), "console"}."""
        return dict(self._call("GET", f"/_lab/instances/{instance_id}"))

    def write(self, volume_id: str, offset: int, data: bytes) -> None:
        self._call("POST", f"/_lab/volumes/{volume_id}/write?offset={offset}", bytes(data))

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        return self._request("GET", f"/_lab/volumes/{volume_id}/read?offset={offset}&length={length}")

    def written_blocks(self, volume_id: str) -> list[int]:
        """Indexes of the volume's 512 KiB blocks ever written (or inherited from its snapshot)."""
        return list(self._call("GET", f"/_lab/volumes/{volume_id}")["written_blocks"])

    def inject(
        self,
        operation: str,
        error: str,
        count: int = 1,
        status: int | None = None,
        after: int = 0,
        lost: bool = False,
    ) -> None:
        """Fail the next `count` calls of `operation` (after `after` more pass) with `error`; `lost`: the
        call is carried out and only its answer is the error (an answer lost on the way back)."""
        fault: dict[str, Any] = {"operation": operation, "error": error, "count": count, "after": after}
        fault["lost"] = lost
        if status is not None:
            fault["status"] = status
        self._call("POST", "/_lab/faults", json.dumps(fault).encode())

    def fail_snapshot(self, snapshot_id: str, message: str = "") -> None:
        """A pending snapshot of a volume ends in the error state (with `message` as StateMessage)."""
        self._call("POST", f"/_lab/snapshots/{snapshot_id}/fail", json.dumps({"message": message}).encode())

    def clear_faults(self) -> None:
        self._call("DELETE", "/_lab/faults")

    def stats(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._call("GET", "/_lab/stats").items()}

    def reset_stats(self) -> None:
        self._call("DELETE", "/_lab/stats")

    def set_capture_pause(self, seconds: float) -> None:
        """Make each volume capture of CreateSnapshot(s) take `seconds` (0 = instant): widens the window
        between an instance's volumes, which CreateSnapshots must close (no write lands in between)."""
        self._call("POST", "/_lab/settings", json.dumps({"capture_pause_seconds": seconds}).encode())

    def set_snapshot_delay(self, seconds: float) -> None:
        """How long snapshots stay pending (from their start, or their CompleteSnapshot), from now on."""
        self._call("POST", "/_lab/settings", json.dumps({"snapshot_delay_seconds": seconds}).encode())

    def set_instance_state_delay(self, seconds: float) -> None:
        """How long a stopped instance stays `stopping` (its VM still running) and a started one
        `pending`, from now on (0 = at once, the default)."""
        self._call("POST", "/_lab/settings", json.dumps({"instance_state_delay_seconds": seconds}).encode())

    def advance_clock(self, seconds: float) -> None:
        """Move the lab's clock forward: snapshot delays, StartSnapshot timeouts, token expiry."""
        self._call("POST", "/_lab/clock", json.dumps({"advance_seconds": seconds}).encode())
