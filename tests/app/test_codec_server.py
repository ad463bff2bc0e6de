"""The codec server (app/codec_server.py) over real HTTP: Temporal's remote codec protocol, CORS for
the web UI's origin only, bearer tokens, and only this user's processes on loopback."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.codec_server import CodecHTTPServer, CodecServerError, serve
from workers import codec
from workers.codec import EncryptionCodec

UI = "http://127.0.0.1:8233"
KEY = os.urandom(32)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def payloads(*texts: str) -> dict[str, Any]:
    return {
        "payloads": [{"metadata": {"encoding": b64(b"json/plain")}, "data": b64(t.encode())} for t in texts]
    }


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data, {"Content-Type": "application/json", "X-Namespace": "default", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def server() -> Iterator[CodecHTTPServer]:
    srv = CodecHTTPServer(("127.0.0.1", 0), EncryptionCodec(KEY), [UI, "http://localhost:8233"])
    serve(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_round_trip_with_and_without_namespace_segment(server: CodecHTTPServer) -> None:
    code, headers, body = post(f"{server.url}/encode", payloads('"s3cret-path"', "42"), {"Origin": UI})
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert headers["Access-Control-Allow-Origin"] == UI
    sealed = json.loads(body)["payloads"]
    assert len(sealed) == 2 and b"s3cret" not in body
    for p in sealed:
        assert base64.b64decode(p["metadata"]["encoding"]) == codec.ENCODING
        assert base64.b64decode(p["metadata"][codec.KEY_ID]).decode() == codec.key_id(KEY)
    code, _, body = post(f"{server.url}/default/decode", {"payloads": sealed})
    assert code == 200 and json.loads(body) == payloads('"s3cret-path"', "42")
    # payloads that are not encrypted come back as they are
    assert json.loads(post(f"{server.url}/decode", payloads("1"))[2]) == payloads("1")


def test_a_payload_of_another_key_is_one_line_naming_its_key_id(server: CodecHTTPServer) -> None:
    other = os.urandom(32)
    sealed = EncryptionCodec(other).seal(codec.Payload(metadata={"encoding": b"json/plain"}, data=b"1"))
    body = {
        "payloads": [{"metadata": {k: b64(v) for k, v in sealed.metadata.items()}, "data": b64(sealed.data)}]
    }
    code, _, text = post(f"{server.url}/decode", body)
    msg = text.decode().strip()
    assert code == 400 and "\n" not in msg and f"key id {codec.key_id(other)}" in msg
    assert other.hex() not in msg and KEY.hex() not in msg and b64(KEY) not in msg
    assert post(f"{server.url}/decode", b"{not json")[0] == 400


def test_cors_for_the_ui_origin_only(server: CodecHTTPServer) -> None:
    def preflight(origin: str) -> tuple[int, dict[str, str]]:
        req = urllib.request.Request(
            f"{server.url}/decode",
            method="OPTIONS",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace,authorization",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    for origin in (UI, "http://localhost:8233"):
        code, h = preflight(origin)
        assert code == 204 and h["Access-Control-Allow-Origin"] == origin
        assert {"content-type", "x-namespace", "authorization"} <= {
            x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")
        }
        assert "POST" in h["Access-Control-Allow-Methods"] and h["Access-Control-Allow-Credentials"] == "true"
    code, h = preflight("http://evil.example:8233")
    assert code == 403 and "Access-Control-Allow-Origin" not in h
    # a page elsewhere cannot use it even without a preflight (a "simple" text/plain POST)
    code, h, _ = post(
        f"{server.url}/decode", payloads("1"), {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    )
    assert code == 403 and "Access-Control-Allow-Origin" not in h


def test_routes_and_methods(server: CodecHTTPServer) -> None:
    assert post(f"{server.url}/nope", payloads("1"))[0] == 404
    assert post(f"{server.url}/a/b/decode", payloads("1"))[0] == 404
    try:
        urllib.request.urlopen(f"{server.url}/decode", timeout=10)
        raise AssertionError("GET answered")
    except urllib.error.HTTPError as e:
        assert e.code == 405


def test_bearer_token(tmp_path: Path) -> None:
    token = "t0ken-" + os.urandom(12).hex()
    srv = CodecHTTPServer(("127.0.0.1", 0), EncryptionCodec(KEY), [UI], token=token)
    serve(srv)
    try:
        assert post(f"{srv.url}/encode", payloads("1"))[0] == 401
        assert post(f"{srv.url}/encode", payloads("1"), {"Authorization": "Bearer wrong"})[0] == 401
        assert post(f"{srv.url}/encode", payloads("1"), {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_not_on_other_addresses_without_a_token() -> None:
    with pytest.raises(CodecServerError, match="non-loopback address needs --token-file"):
        CodecHTTPServer(("0.0.0.0", 0), EncryptionCodec(KEY), [UI])


@pytest.mark.root
def test_another_local_user_is_refused(server: CodecHTTPServer) -> None:
    """It decrypts whatever it is sent: a process of another user on this machine (here `nobody`)
    gets 403, though it reaches the port."""
    sealed = EncryptionCodec(KEY).seal(codec.Payload(metadata={"encoding": b"json/plain"}, data=b'"x"'))
    body = json.dumps(
        {
            "payloads": [
                {"metadata": {k: b64(v) for k, v in sealed.metadata.items()}, "data": b64(sealed.data)}
            ]
        }
    )
    script = (
        "import sys, urllib.request, urllib.error\n"
        f"req = urllib.request.Request({server.url + '/decode'!r}, {body.encode()!r}, "
        "{'Content-Type': 'application/json'})\n"
        "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode().strip())\n"
    )
    as_nobody = [
        "setpriv",
        "--reuid",
        "nobody",
        "--regid",
        "nogroup",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
    ]
    out = subprocess.run([*as_nobody, script], capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == "403 only this server's user may use it", out
    # the same request from this user is answered
    code, _, answer = post(f"{server.url}/decode", body.encode())
    assert code == 200 and json.loads(answer)["payloads"][0]["data"] == b64(b'"x"')
