"""The lab server: one WSGI app for EC2 (moto), the EBS direct APIs (the lab's) and /_lab control.

Requests are routed by the SigV4 credential scope's service (`.../us-east-1/ec2/aws4_request` or `ebs`);
unsigned requests by path (/snapshots... is EBS, the rest EC2) and refused. Every AWS request must be
signed with the lab's access key and secret (the signature is verified), in the lab's region.
`serve` runs it on werkzeug's threaded server bound to loopback, writes DIR/lab.json (mode 0600) once it
listens and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import signal
import string
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from werkzeug.http import HTTP_STATUS_CODES

from labs.aws.wire import EbsError, Response, content_length, ec2_error, json_response

log = logging.getLogger(__name__)

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_AWS_BODY = 16 << 20


def load_credentials(root: Path) -> dict[str, str]:
    """The lab's key pair, generated into DIR/credentials.json (0600) at first start."""
    path = root / "credentials.json"
    if path.exists():
        creds = json.loads(path.read_text())
        return {"access_key_id": creds["access_key_id"], "secret_access_key": creds["secret_access_key"]}
    key_alphabet = string.ascii_uppercase + "234567"
    secret_alphabet = string.ascii_letters + string.digits + "+/"
    creds = {
        "access_key_id": "AKIA" + "".join(secrets.choice(key_alphabet) for _ in range(16)),
        "secret_access_key": "".join(secrets.choice(secret_alphabet) for _ in range(40)),
    }
    write_private_json(path, creds)
    return creds


def write_private_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    out = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    for key, name in (("CONTENT_TYPE", "content-type"), ("CONTENT_LENGTH", "content-length")):
        if environ.get(key):
            out[name] = environ[key]
    return out


class LabApp:
    def __init__(self, root: Path, creds: dict[str, str], snapshot_delay: float) -> None:
        from labs.aws.blockstore import BlockStore
        from labs.aws.control import Control
        from labs.aws.ebs_api import EbsApi
        from labs.aws.ec2_bridge import Ec2Bridge
        from labs.aws.ec2_instances import InstanceHooks
        from labs.aws.faults import Faults
        from labs.aws.machines import Machines
        from labs.aws.nbd import VolumeNbdServer, socket_dir
        from labs.aws.state import LabState

        self.creds = creds
        self.state = LabState(BlockStore(root), snapshot_delay)
        self.ec2 = Ec2Bridge(self.state, REGION, ACCOUNT_ID)
        self.ebs = EbsApi(self.state, self.ec2)
        self.faults = Faults()
        # the instances' VMs read and write the volumes over NBD, on a socket of this process's own
        self._nbd_dir = socket_dir()
        self.nbd = VolumeNbdServer(self.state, self._nbd_dir / "nbd.sock")
        self.instances = InstanceHooks(self.ec2, Machines(root, self.nbd.path, self._guest_stopped))
        self.instances.install()
        self.control = Control(self.state, self.ec2, self.faults, self.instances)

    def _guest_stopped(self, machine: Any) -> None:
        self.instances.guest_stopped(machine)

    def close(self) -> None:
        """Stop every instance's VM and the NBD server."""
        self.instances.machines.close()
        self.nbd.close()
        shutil.rmtree(self._nbd_dir, ignore_errors=True)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        try:
            resp = self.handle(environ)
        except Exception:
            path = environ.get("PATH_INFO", "")
            log.exception("request %s %s failed", environ.get("REQUEST_METHOD"), path)
            message = "internal error in the AWS lab (see its log)"
            if path.startswith("/snapshots"):
                resp = EbsError("InternalServerException", message).response()
            elif path.startswith("/_lab/"):
                resp = json_response(500, {"error": message})
            else:
                resp = ec2_error("InternalError", message, 500)
        headers = list(resp.headers)
        body = [resp.body] if isinstance(resp.body, bytes) else resp.body
        if isinstance(resp.body, bytes):
            headers = [h for h in headers if h[0].lower() != "content-length"]
            headers.append(("Content-Length", str(len(resp.body))))
        start_response(f"{resp.status} {HTTP_STATUS_CODES.get(resp.status, 'Unknown')}", headers)
        return body

    def handle(self, environ: dict[str, Any]) -> Response:
        from labs.aws import ebs_api, sigv4

        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "/")
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or quote(path)
        raw_path = raw.split("?", 1)[0]
        query = environ.get("QUERY_STRING", "")
        if path.startswith("/_lab/"):
            return self.control.handle(method, path, query, environ)
        length = content_length(environ)
        if length is None:
            return json_response(400, {"error": "the request's Content-Length is not a byte count"})
        if length > MAX_AWS_BODY:
            return json_response(413, {"error": f"request body of {length} bytes is too large for the lab"})
        body = environ["wsgi.input"].read(length) if length else b""
        headers = _headers(environ)
        cred = sigv4.parse_authorization(headers.get("authorization"))
        service = cred.service if cred else ("ebs" if path.startswith("/snapshots") else "ec2")
        if service not in ("ec2", "ebs"):
            return ec2_error("InvalidAction", f"the AWS lab serves ec2 and ebs, not {service}", 400)

        def refuse(ebs_code: str, message: str, ec2_code: str = "AuthFailure") -> Response:
            if service == "ebs":
                return EbsError(ebs_code, message, status=403, layer="coral").response()
            return ec2_error(ec2_code, message, 401 if ec2_code == "AuthFailure" else 400)

        if cred is None:
            return refuse("MissingAuthenticationTokenException", "Missing Authentication Token")
        if cred.access_key_id != self.creds["access_key_id"]:
            if service == "ebs":
                return refuse(
                    "UnrecognizedClientException", "The security token included in the request is invalid."
                )
            return refuse("", "AWS was not able to validate the provided access credentials")
        try:
            sigv4.verify(
                cred,
                self.creds["secret_access_key"],
                method=method,
                raw_path=raw_path,
                raw_query=query,
                headers=headers,
                body_sha256_hex=hashlib.sha256(body).hexdigest(),
            )
        except sigv4.SignatureError as e:
            log.info("refused a %s request: %s", service, e)
            if service == "ebs":
                return refuse("InvalidSignatureException", str(e))
            if e.expired:
                return refuse("", str(e), "RequestExpired")
            return refuse("", "AWS was not able to validate the provided access credentials")
        if cred.region != REGION:
            message = f"the AWS lab serves region {REGION} only (the request is signed for {cred.region})"
            if service == "ebs":
                return EbsError("ValidationException", message, reason="INVALID_PARAMETER_VALUE").response()
            return ec2_error("UnsupportedOperation", message)

        if service == "ebs":
            found = ebs_api.route(method, path)
            if found is None:
                return EbsError(
                    "UnknownOperationException", f"no EBS operation {method} {path}", status=404
                ).response()
            operation, params = found
            injected, lost = self.faults.call(operation, "ebs")
            if injected is not None and not lost:
                return injected
            answer = self.ebs.handle(operation, params, query, headers, body)
            return injected or answer

        form = parse_qs(body.decode("utf-8", "replace")) if method == "POST" else parse_qs(query)
        operation = (form.get("Action") or ["?"])[0]
        injected, lost = self.faults.call(operation, "ec2")
        if injected is not None and not lost:
            return injected
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        answer = self.ec2.dispatch(environ)
        return injected or answer


def serve(root: Path, host: str = "127.0.0.1", port: int = 0, snapshot_delay: float = 0.3) -> None:
    from werkzeug.serving import make_server

    if host not in LOOPBACK:
        raise ValueError(f"the AWS lab binds loopback only, not {host}")
    os.environ["MOTO_ACCOUNT_ID"] = ACCOUNT_ID
    os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    root.mkdir(parents=True, exist_ok=True)
    creds = load_credentials(root)
    app = LabApp(root, creds, snapshot_delay)
    server = make_server(host, port, app, threaded=True)
    netloc = f"[{host}]" if ":" in host else host
    info = {
        "endpoint_url": f"http://{netloc}:{server.server_port}",
        "region": REGION,
        "account_id": ACCOUNT_ID,
        **creds,
        "pid": os.getpid(),
    }
    lab_json = root / "lab.json"
    write_private_json(lab_json, info)

    def stop(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("AWS lab serving %s on %s (access key %s)", root, info["endpoint_url"], creds["access_key_id"])
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.close()
        try:
            if json.loads(lab_json.read_text()).get("pid") == os.getpid():
                lab_json.unlink()
        except (OSError, ValueError):
            pass
        log.info("AWS lab stopped")
