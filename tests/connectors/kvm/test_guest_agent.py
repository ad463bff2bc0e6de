"""The guest agent client (connectors.kvm.guest_agent) against fake agents on a unix socket: only an
answer with this call's own id counts; stale and malformed output is passed over."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectors.kvm.guest_agent import answered, sync_request, sync_unix

Reply = Callable[[int], bytes]  # the fake agent's answer to guest-sync with an id


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qga-") as d:  # short: unix socket paths
        yield Path(d)


def fake_agent(path: Path, reply: Reply, greeting: bytes = b"") -> threading.Thread:
    """Serves one connection: sends `greeting` (stale output of an earlier client), then answers each
    guest-sync line with reply(id)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(greeting)
                buf = b""
                while chunk := conn.recv(4096):
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        req = json.loads(line.lstrip(b"\xff"))
                        assert req["execute"] == "guest-sync"
                        try:
                            conn.sendall(reply(req["arguments"]["id"]))
                        except OSError:
                            return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_the_request_starts_with_the_delimiter_byte_and_is_one_json_line() -> None:
    req = sync_request(42)
    assert req[:1] == b"\xff" and req.endswith(b"\n") and req.count(b"\n") == 1
    assert json.loads(req[1:]) == {"execute": "guest-sync", "arguments": {"id": 42}}


def test_only_a_return_of_one_of_our_ids_answers() -> None:
    assert answered(b'{"return": 7}', {7})
    assert answered(b'\xff{"return": 7}\r', {7})  # guest-sync-delimited's 0xFF
    assert not answered(b'{"return": 8}', {7})
    assert not answered(b'{"return": true}', {1})  # a bool is not an id
    assert not answered(b'{"return": {}}', {7})  # guest-ping's answer
    assert not answered(b'{"error": {"class": "GenericError"}}', {7})
    assert not answered(b"garbage", {7}) and not answered(b"[7]", {7})


def test_an_agent_that_echoes_the_id_after_stale_output_answers(sock_dir: Path) -> None:
    path = sock_dir / "qga.sock"
    stale = b'{"return": 12345}\n\xff{"return": 1}\nnot json\n'
    t = fake_agent(path, lambda i: b'{"return": %d}\n' % i, greeting=stale)
    assert sync_unix(path, 5.0)
    t.join(5)


def test_an_agent_that_answers_another_id_does_not_answer(sock_dir: Path) -> None:
    path = sock_dir / "qga.sock"
    fake_agent(path, lambda i: b'{"return": %d}\n' % (i + 1))
    assert not sync_unix(path, 2.5)


def test_no_socket_or_an_endless_line_is_no_answer_within_the_timeout(sock_dir: Path) -> None:
    assert not sync_unix(sock_dir / "none.sock", 0.5)
    path = sock_dir / "qga.sock"
    fake_agent(path, lambda i: b"x" * (100 << 10) + b'{"return": %d}\n' % i)  # one line, too long
    assert not sync_unix(path, 2.5)
