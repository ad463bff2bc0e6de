"""Codec server: Temporal's remote codec HTTP protocol over workers.codec, so that the web UI and
`temporal workflow show --codec-endpoint` show decrypted payloads.

    POST /encode, /decode (also /{namespace}/encode, /{namespace}/decode)
    body and answer: {"payloads": [{"metadata": {"encoding": "<base64>"}, "data": "<base64>"}]}
    (proto3 JSON of temporal.api.common.v1.Payloads)

Who may ask:
- Browsers only from the configured UI origins (CORS; a request whose Origin is another is refused
  with 403, so a web page elsewhere cannot use it).
- On loopback, only processes of this server's own user (or root): the peer's socket owner is looked
  up in /proc/net/tcp{,6}. A browser of that user, or an SSH tunnel that user opened, qualifies;
  another local user does not (this server decrypts everything: it must not serve them).
- With a token file, every request must carry `Authorization: Bearer <token>` (the CLI's
  `--codec-auth`); required when listening on anything but loopback.

Unknown routes answer 404, other methods on a route 405, a payload this server cannot open 400 with
one line naming the key id. Bodies are never logged.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from workers.codec import CodecError, EncryptionCodec, load_codec

log = logging.getLogger(__name__)

MAX_BODY = 16 << 20  # Temporal's payloads are at most 2 MiB each; a request holds a few
ROUTES = ("encode", "decode")


class CodecServerError(CodecError):
    kind = "CodecServerError"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _hex_addr(ip: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} writes it (each 32-bit word in host byte order, then port)."""
    raw = ipaddress.ip_address(ip).packed
    words = "".join(raw[i : i + 4][::-1].hex().upper() for i in range(0, len(raw), 4))
    return f"{words}:{port:04X}"


def socket_owner(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid owning the TCP socket at `peer` connected to `local` (both on this machine), or None."""
    table = "/proc/net/tcp6" if ":" in peer[0] else "/proc/net/tcp"
    want = (_hex_addr(peer[0], peer[1]), _hex_addr(local[0], local[1]))
    try:
        with open(table) as fh:
            next(fh, None)
            for line in fh:
                cols = line.split()
                if len(cols) > 7 and (cols[1], cols[2]) == want:
                    return int(cols[7])
    except OSError:
        pass
    return None


class CodecHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        codec: EncryptionCodec,
        origins: list[str],
        token: str | None = None,
        allowed_uids: set[int] | None = None,
    ) -> None:
        host = address[0]
        if not _is_loopback(host) and not token:
            raise CodecServerError(
                f"codec server on {host}: a non-loopback address needs --token-file (it decrypts every "
                "payload for whoever asks)"
            )
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.codec = codec
        self.origins = {o.rstrip("/") for o in origins}
        self.token = token
        # loopback peers must be these users' processes (None: no check)
        self.allowed_uids = allowed_uids if allowed_uids is not None else {os.getuid(), 0}
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: CodecHTTPServer
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "sendense-codec"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # ---------------------------------------------------------------------------------- answers

    def _cors(self) -> None:
        origin = self.headers.get("Origin")
        if origin and origin.rstrip("/") in self.server.origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Credentials", "true")
            self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Content-Type, X-Namespace, Authorization")
            self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Vary", "Origin")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self._cors()
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._send(code, (message + "\n").encode())

    # ---------------------------------------------------------------------------------- checks

    def _route(self) -> str | None:
        parts = [p for p in self.path.split("?", 1)[0].split("/") if p]
        if len(parts) in (1, 2) and parts[-1] in ROUTES:
            return parts[-1]
        return None

    def _refusal(self) -> tuple[int, str] | None:
        """Why this request is refused (code, one line), or None."""
        origin = self.headers.get("Origin")
        if origin and origin.rstrip("/") not in self.server.origins:
            return 403, f"origin {origin[:200]} is not allowed"
        peer_ip = self.client_address[0]
        if self.server.allowed_uids and _is_loopback(peer_ip):
            uid = socket_owner(self.client_address[:2], self.connection.getsockname()[:2])
            if uid not in self.server.allowed_uids:
                return 403, "only this server's user may use it"
        return None

    def _authorized(self) -> bool:
        if not self.server.token:
            return True
        got = self.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.server.token}".encode())

    # ---------------------------------------------------------------------------------- verbs

    def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's naming
        if self._route() is None:
            return self._error(404, "not found")
        refused = self._refusal()
        if refused:
            return self._error(*refused)
        self._send(204, b"")

    def do_POST(self) -> None:  # noqa: N802
        route = self._route()
        if route is None:
            return self._error(404, "not found")
        refused = self._refusal()
        if refused:
            return self._error(*refused)
        if not self._authorized():
            return self._error(401, "missing or wrong Authorization bearer token")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "Content-Length required")
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            return self._error(413, f"body over {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            payloads = json_format.Parse(raw, Payloads(), ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError, ValueError):
            return self._error(400, 'body is not {"payloads": [...]} (proto3 JSON)')
        try:
            fn = self.server.codec.seal if route == "encode" else self.server.codec.open
            out = Payloads(payloads=[fn(p) for p in payloads.payloads])
        except CodecError as e:
            return self._error(400, e.message)
        body = json.dumps(json_format.MessageToDict(out)).encode()
        self._send(200, body, "application/json")

    def _not_allowed(self) -> None:
        if self._route() is None:
            return self._error(404, "not found")
        self._error(405, "use POST")

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_allowed  # noqa: N815


def serve(server: CodecHTTPServer) -> threading.Thread:
    """Serve in a daemon thread (tests, embedding); stop with server.shutdown()."""
    t = threading.Thread(target=server.serve_forever, name="codec-server", daemon=True)
    t.start()
    return t


def default_origins(ui_url: str | None) -> list[str]:
    """The UI's origin under both names a browser on this machine may use for it."""
    if not ui_url:
        return ["http://127.0.0.1:8233", "http://localhost:8233"]
    url = ui_url.rstrip("/")
    out = [url]
    for a, b in (("127.0.0.1", "localhost"), ("localhost", "127.0.0.1")):
        if f"//{a}:" in url:
            out.append(url.replace(f"//{a}:", f"//{b}:"))
    return out


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise CodecServerError(f"--token-file {path}: {e.strerror}") from None
    if len(token) < 16:
        raise CodecServerError(f"--token-file {path}: a token of at least 16 characters is needed")
    return token


def main(argv: list[str] | None = None) -> None:
    """`python -m app.codec_server`: what the embedded stack runs (the CLI has `sendense codec-server`)."""
    p = argparse.ArgumentParser(prog="codec-server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8234)
    p.add_argument("--ui-origin", action="append", default=[])
    p.add_argument("--token-file", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = CodecHTTPServer(
            (args.host, args.port),
            load_codec(),
            args.ui_origin or default_origins(None),
            token=read_token(args.token_file) if args.token_file else None,
        )
    except (CodecError, OSError) as e:
        log.error("codec server: %s", getattr(e, "message", None) or e)
        raise SystemExit(2) from None
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log.info("codec server at %s (key id %s) for %s", server.url, server.codec.key_id, sorted(server.origins))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
