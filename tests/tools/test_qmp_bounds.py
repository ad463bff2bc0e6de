"""Whatever listens on a QMP socket the user named is not trusted: a reply without end, a reply nested
too deep, an event of megabytes each fail in one line naming the socket, with bounded memory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sendense.errors import SendenseError
from tools.qmp import MAX_EVENT, QmpClient

GREETING = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}\n'
Peer = Callable[[socket.socket], None]


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Callable[[Peer], Path]]:
    """Serve a QMP-looking peer on a unix socket: it greets, then `peer(conn)` answers the client."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(peer: Peer) -> Path:
        path = tmp_path / f"qmp{len(servers)}.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(1)
        servers.append(srv)

        def serve() -> None:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(GREETING)
                    conn.recv(4096)  # qmp_capabilities
                    peer(conn)
                except OSError:
                    pass  # the client hung up: what a bounded client does

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for s in servers:
        s.close()
    for t in threads:
        t.join(timeout=30)


def endless(conn: socket.socket) -> None:
    """A reply that never ends (up to 2 GiB: a client that reads it all fails the test on memory)."""
    conn.sendall(b'{"return": "')
    chunk = b"x" * (1 << 20)
    for _ in range(2048):
        conn.sendall(chunk)


_CLIENT = """
import json, resource, sys
from tools.qmp import QmpClient
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    QmpClient(sys.argv[1], timeout=60).connect()
    msg = "connected"
except Exception as e:
    msg = f"{type(e).__name__}: {e}"
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": msg, "grew_kib": grew}))
"""


def test_an_endless_reply_fails_in_one_line_naming_the_socket_with_bounded_memory(
    hostile: Callable[[Peer], Path],
) -> None:
    sock = hostile(endless)
    out = subprocess.run(
        [sys.executable, "-c", _CLIENT, str(sock)], capture_output=True, text=True, timeout=600, check=True
    )
    r = json.loads(out.stdout)
    assert r["error"] == (
        f"SendenseError: QMP socket {sock}: reply to qmp_capabilities is longer than 4 MiB: not a QEMU "
        "monitor, or a reply too large to trust"
    )
    assert r["grew_kib"] < 200 * 1024, r


def test_a_reply_nested_too_deep_is_malformed_not_a_crash(hostile: Callable[[Peer], Path]) -> None:
    sock = hostile(lambda c: c.sendall(b'{"return": ' + b"[" * 1_000_000 + b"\n"))
    with pytest.raises(SendenseError) as ei:
        QmpClient(sock, timeout=30).connect()
    assert str(ei.value).startswith(f"QMP socket {sock}: malformed reply ")
    assert "\n" not in str(ei.value)


def test_a_reply_that_is_not_an_object_is_malformed(hostile: Callable[[Peer], Path]) -> None:
    sock = hostile(lambda c: c.sendall(b"[1, 2]\n"))
    with pytest.raises(SendenseError, match=r"malformed reply b'\[1, 2\]'"):
        QmpClient(sock, timeout=30).connect()


def test_a_huge_event_is_refused_and_small_ones_are_kept(hostile: Callable[[Peer], Path]) -> None:
    def events(conn: socket.socket) -> None:
        conn.sendall(b'{"event": "SMALL", "data": {}}\n{"return": {}}\n')
        conn.recv(4096)  # the next command
        big = json.dumps({"event": "BIG", "data": {"x": "y" * MAX_EVENT}}).encode()
        conn.sendall(big + b"\n" + b'{"return": {}}\n')

    sock = hostile(events)
    c = QmpClient(sock, timeout=30).connect()
    assert [e["event"] for e in c.events] == ["SMALL"]
    with pytest.raises(SendenseError) as ei:
        c.execute("query-status")
    assert str(ei.value) == (
        f"QMP socket {sock}: an event of {MAX_EVENT + 35} bytes (max {MAX_EVENT}): not a QEMU monitor"
    )


def test_replies_split_across_reads_and_several_in_one_read(hostile: Callable[[Peer], Path]) -> None:
    def answers(conn: socket.socket) -> None:
        conn.sendall(b'{"return"')  # the capabilities reply in two reads
        conn.sendall(b": {}}\n")
        conn.recv(4096)
        conn.sendall(b'{"event": "E", "data": {}}\n{"return": {"status": "running"}}\n')

    c = QmpClient(hostile(answers), timeout=30).connect()
    assert c.execute("query-status") == {"status": "running"}
    assert [e["event"] for e in c.events] == ["E"]
