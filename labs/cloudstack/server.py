"""The lab's HTTP server: CloudStack's API at /client/api and the lab's control at /_lab (loopback only).

/client/api takes GET (query string) or POST (form body), as the management server does: the
parameters' first values are verified (signing.py), then the command runs (cloud.py). Answers are
JSON only (`response=json`; the lab has no XML). The control endpoints need no signature:

    GET    /_lab/health                 {"ok": true, "pid": N}
    GET    /_lab/hosts                  [{"id", "name", "uri": libvirt URI or null, "domains": [...]}]
    GET    /_lab/vms/{id}               {"instancename", "state", "hostid", "host", "running", "console",
                                         "volumes": [{"id", "deviceid", "file"}]}
    GET    /_lab/vms/{id}/console       the VM's serial console text (its current or last boot)
    POST   /_lab/faults                 {"command", "errorcode", "count"?, "after"?, "job"?, "text"?,
                                         "cserrorcode"?} (faults.py); DELETE clears
    GET    /_lab/stats                  {"listVolumes": 3, ...}; DELETE resets
    POST   /_lab/settings               {"job_delay"?, "enforce_timestamps"?, "stop_timeout"?}
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from werkzeug.http import HTTP_STATUS_CODES

from labs.cloudstack import signing, wire
from labs.cloudstack.cloud import Cloud
from labs.cloudstack.state import LabConfig
from labs.cloudstack.wire import ApiError

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_BODY = 1 << 20
_VM = re.compile(r"^/_lab/vms/(?P<id>[0-9a-f-]+)(?P<console>/console)?/?$")


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str = wire.CONTENT_TYPE


def _json(status: int, value: Any) -> Answer:
    return Answer(status, json.dumps(value).encode(), "application/json")


def make_credentials() -> dict[str, str]:
    """An API key and secret key shaped like CloudStack's (86 url-safe base64 characters each)."""
    return {"api_key": secrets.token_urlsafe(64)[:86], "secret_key": secrets.token_urlsafe(64)[:86]}


class LabApp:
    def __init__(self, cloud: Cloud, creds: dict[str, str]) -> None:
        self.cloud = cloud
        self.creds = creds
        self.secrets = {creds["api_key"]: creds["secret_key"]}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        try:
            answer = self.handle(environ)
        except Exception:
            log.exception("request %s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            err = ApiError(
                wire.INTERNAL_ERROR, "internal error in the CloudStack lab (see its log)", wire.CS_SERVER_API
            )
            answer = Answer(530, wire.render("errorresponse", err.body()))
        status = f"{answer.status} {HTTP_STATUS_CODES.get(answer.status, 'Error')}"
        start_response(
            status, [("Content-Type", answer.content_type), ("Content-Length", str(len(answer.body)))]
        )
        return [answer.body]

    def handle(self, environ: dict[str, Any]) -> Answer:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "/")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _json(400, {"error": "Content-Length is not a number"})
        if length > MAX_BODY:
            return _json(413, {"error": f"a request body of {length} bytes is too large for the lab"})
        body = environ["wsgi.input"].read(length) if length else b""
        if path.startswith("/_lab/"):
            return self.control(method, path, body)
        if path.rstrip("/") != "/client/api":
            return _json(404, {"error": f"no such path {path}: the API is at /client/api"})
        if method not in ("GET", "POST"):
            return Answer(
                405,
                wire.render(
                    "errorresponse", ApiError(wire.METHOD_NOT_ALLOWED, f"{method} is not allowed").body()
                ),
            )
        params: dict[str, str] = {}
        pairs = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if method == "POST":
            pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        for k, v in pairs:
            params.setdefault(k, v)  # the first value, as the servlet's params map gives it
        return self.api(params)

    def api(self, params: dict[str, str]) -> Answer:
        command = params.get("command")
        known = command is not None and self.cloud.known(command)
        name = wire.response_name(command, known)
        if not known or command is None:
            return Answer(401, wire.render(name, ApiError(wire.UNAUTHORIZED, wire.UNVERIFIED).body()))
        if params.get("response", "xml").lower() != "json":
            err = ApiError(
                wire.PARAM_ERROR, "the CloudStack lab answers response=json only", wire.CS_SERVER_API
            )
            return Answer(431, wire.render(name, err.body()))
        try:
            signing.verify(params, self.secrets, enforce_timestamps=self.cloud.config.enforce_timestamps)
        except signing.SignatureRefused as e:
            log.info("refused %s: %s", command, e)
            return Answer(401, wire.render(name, ApiError(wire.UNAUTHORIZED, wire.UNVERIFIED).body()))
        injected = self.cloud.faults.call(command)
        if injected is not None:
            return Answer(injected.errorcode, wire.render(name, injected.body()))
        try:
            payload = self.cloud.call(command, params)
        except ApiError as e:
            return Answer(e.errorcode, wire.render(name, e.body()))
        return Answer(200, wire.render(name, payload))

    # ------------------------------------------------------------------ /_lab

    def control(self, method: str, path: str, body: bytes) -> Answer:
        c = self.cloud
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return _json(400, {"error": "the body is not JSON"})
        if path == "/_lab/health":
            return _json(200, {"ok": True, "pid": os.getpid()})
        if path == "/_lab/hosts":
            return _json(
                200,
                [
                    {
                        "id": h.id,
                        "name": h.name,
                        "uri": h.libvirtd.uri if h.up else None,
                        "domains": h.domains(),
                    }
                    for h in c.hosts.values()
                ],
            )
        if path == "/_lab/faults":
            if method == "DELETE":
                c.faults.clear()
                return _json(200, {"ok": True})
            try:
                c.faults.inject(
                    str(data["command"]),
                    int(data["errorcode"]),
                    int(data.get("count", 1)),
                    after=int(data.get("after", 0)),
                    job=bool(data.get("job", False)),
                    text=str(data.get("text", "")),
                    cserrorcode=data.get("cserrorcode"),
                )
            except (KeyError, ValueError, TypeError) as e:
                return _json(400, {"error": f"a fault needs command and errorcode: {e}"})
            return _json(200, {"ok": True})
        if path == "/_lab/stats":
            if method == "DELETE":
                c.faults.reset_stats()
            return _json(200, c.faults.stats())
        if path == "/_lab/settings":
            for key in ("job_delay", "stop_timeout"):
                if key in data:
                    setattr(c.config, key, float(data[key]))
            if "enforce_timestamps" in data:
                c.config.enforce_timestamps = bool(data["enforce_timestamps"])
            return _json(200, {"ok": True})
        m = _VM.match(path)
        if m:
            with c.state.lock:
                vm = c.state.vms.get(m["id"])
                if vm is None:
                    return _json(404, {"error": f"no VM {m['id']}"})
                host = c.hosts.get(vm.host or vm.last_host or "")
                console = host.console(vm.instancename) if host is not None else None
                if m["console"]:
                    text = console.read_text(errors="replace") if console and console.exists() else ""
                    return Answer(200, text.encode(), "text/plain; charset=utf-8")
                from labs.cloudstack.vms import vm_volumes

                info = {
                    "instancename": vm.instancename,
                    "state": vm.state,
                    "hostid": vm.host,
                    "host": host.name if host is not None and vm.host else None,
                    "running": bool(host is not None and vm.host and host.running(vm.instancename)),
                    "console": str(console) if console else None,
                    "volumes": [
                        {"id": v.id, "deviceid": v.deviceid, "file": str(v.file) if v.file else None}
                        for v in vm_volumes(c, vm)
                    ],
                }
            return _json(200, info)
        return _json(404, {"error": f"no lab endpoint {method} {path}"})


def write_private_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def guest_image(config: LabConfig) -> Path:
    if config.guest_image:
        return Path(config.guest_image)
    from labs.guest.build import build

    return build()


def private_netns() -> bool:
    """Whether this process runs in a named network namespace (`ip netns`, /run/netns), not the
    machine's own: its addresses reach only the namespaces a test linked to it (labs.sites), never
    another machine."""
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
        named = Path("/run/netns")
        return any(os.stat(p).st_ino == mine for p in named.iterdir()) if named.is_dir() else False
    except OSError:
        return False


class LabServer:
    """The lab in this process: its hosts started on the calling thread (keep it alive: the daemons die
    with it), the HTTP server on a thread of its own. `info` is what lab.json holds."""

    def __init__(self, root: Path, config: LabConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        from werkzeug.serving import make_server

        if host not in LOOPBACK and not private_netns():
            raise ValueError(
                f"the CloudStack lab binds loopback only, not {host} (or any address of a private network "
                "namespace, as labs.sites makes)"
            )
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # its request lines hold the apiKey
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.cloud = Cloud(root, config, guest_image(config))
        try:
            self.cloud.start_hosts()
            self.app = LabApp(self.cloud, make_credentials())
            self.server = make_server(host, port, self.app, threaded=True)
        except BaseException:
            self.cloud.close()
            raise
        netloc = f"[{host}]" if ":" in host else host
        self.url = f"http://{netloc}:{self.server.server_port}/client/api"
        self.info = {
            "url": self.url,
            "zone": self.cloud.state.zone.name,
            "zoneid": self.cloud.state.zone.id,
            **self.app.creds,
            "pid": os.getpid(),
        }
        self._thread: threading.Thread | None = None

    def start(self) -> LabServer:
        self._thread = threading.Thread(target=self.server.serve_forever, name="cs-lab-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.cloud.close()


def serve(root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run the lab in the foreground until SIGTERM/SIGINT; DIR/lab.json (0600) once it listens."""
    config_path = root / "config.json"
    config = LabConfig.load(config_path) if config_path.exists() else LabConfig()
    lab = LabServer(root, config, host, port)
    lab_json = root / "lab.json"
    write_private_json(lab_json, lab.info)
    stopped = threading.Event()

    def stop(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    lab.start()
    log.info("CloudStack lab serving %s on %s", root, lab.url)
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        lab.close()
        try:
            if json.loads(lab_json.read_text()).get("pid") == os.getpid():
                lab_json.unlink()
        except (OSError, ValueError):
            pass
        log.info("CloudStack lab stopped")
