"""The two-site network lab (labs/sites): namespaces come and go, bytes cross the shaped link at the
configured rate, the relay adds the configured round trip, a link cut fails a connect and heals, and
Temporal behind the TLS front answers a client in the other site with the right CA only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from labs.sites import TwoSites, namespaces
from labs.sites.tlsfront import TlsFront

pytestmark = pytest.mark.root  # ip netns, tc: fails (never skips) without root, as the suite's rule says


def _sink(sites: TwoSites, site: str, port: int) -> tuple[socket.socket, list[int], threading.Thread]:
    """A server in `site` that counts what it receives on its first connection."""
    srv = sites.call(site, lambda: socket.create_server((sites.addr[site], port)))
    got: list[int] = []

    def run() -> None:
        c, _ = srv.accept()
        n = 0
        while d := c.recv(1 << 20):
            n += len(d)
        got.append(n)
        c.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, got, t


def _echo(sites: TwoSites, site: str, port: int) -> socket.socket:
    srv = sites.call(site, lambda: socket.create_server((sites.addr[site], port)))

    def run() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(65536), b"")], daemon=True
            ).start()

    threading.Thread(target=run, daemon=True).start()
    return srv


def _reaches(sites: TwoSites, site: str, host: str, port: int) -> bool:
    def go() -> bool:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            return False

    return sites.call(site, go)


def test_namespaces_exist_inside_and_are_gone_after_exit() -> None:
    with TwoSites(rate=None) as s:
        names = set(namespaces())
        assert s.ns["a"] in names and s.ns["b"] in names
        p = s.popen("b", ["sleep", "60"])
        echo = _echo(s, "b", 5000)
        assert _reaches(s, "a", s.addr["b"], 5000)
        assert not _reaches(s, "a", "127.0.0.1", 5000)  # site A's loopback is its own
        echo.close()
    assert s.ns["a"] not in namespaces() and s.ns["b"] not in namespaces()
    assert p.poll() is not None  # processes in a site end with it


def test_a_dead_runs_namespaces_are_swept_by_the_next_run() -> None:
    # a child makes two sites and is SIGKILLed: its namespaces stay until the next TwoSites sweeps them
    code = (
        "from labs.sites import TwoSites; import os; s = TwoSites(rate=None).__enter__(); "
        "print(s.tag, flush=True); os.kill(os.getpid(), 9)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=TwoSites.env())
    tag = r.stdout.strip()
    assert tag and any(tag in n for n in namespaces())
    with TwoSites(rate=None):
        assert not any(tag in n for n in namespaces())


def test_a_byte_stream_crosses_the_link_at_the_shaped_rate() -> None:
    with TwoSites(rate="100mbit") as s:
        port = 5001
        srv, got, t = _sink(s, "b", port)
        c = s.call("a", lambda: socket.create_connection((s.addr["b"], port)))
        buf = os.urandom(1 << 20)
        t0 = time.monotonic()
        for _ in range(24):
            c.sendall(buf)
        c.close()
        t.join(30)
        dt = time.monotonic() - t0
        srv.close()
    assert got == [24 << 20]
    mbit = got[0] * 8 / dt / 1e6
    print(f"100mbit tbf: {mbit:.1f} Mbit/s")
    assert 70 <= mbit <= 105, mbit


def test_the_relay_adds_the_configured_round_trip() -> None:
    with TwoSites(rate="1gbit") as s:
        echo = _echo(s, "b", 5002)
        for rtt in (0, 20):
            _, port = s.relay("a", (s.addr["b"], 5002), rtt_ms=rtt)
            c = s.call("a", lambda port=port: socket.create_connection(("127.0.0.1", port)))
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(10):
                t0 = time.monotonic()
                c.sendall(b"p")
                assert c.recv(1) == b"p"
                rtts.append((time.monotonic() - t0) * 1000)
            c.close()
            print(f"relay rtt {rtt} ms: min {min(rtts):.1f} max {max(rtts):.1f} ms")
            assert min(rtts) >= rtt and max(rtts) < rtt + 15, (rtt, rtts)
        echo.close()


def test_the_relay_keeps_a_stream_full_at_20ms() -> None:
    """Not one chunk per round trip: a 20 ms relay on an unshaped link carries >= 300 Mbit/s."""
    with TwoSites(rate=None) as s:
        srv, got, t = _sink(s, "b", 5003)
        _, port = s.relay("a", (s.addr["b"], 5003), rtt_ms=20)
        c = s.call("a", lambda: socket.create_connection(("127.0.0.1", port)))
        buf = os.urandom(1 << 20)
        t0 = time.monotonic()
        for _ in range(64):
            c.sendall(buf)
        c.close()
        t.join(30)
        dt = time.monotonic() - t0
        srv.close()
    assert got == [64 << 20]
    mbit = got[0] * 8 / dt / 1e6
    print(f"relay 20 ms, unshaped: {mbit:.0f} Mbit/s")
    assert mbit >= 300, mbit


def test_a_link_cut_fails_a_connect_and_then_heals() -> None:
    with TwoSites(rate="1gbit") as s:
        echo_b, echo_a = _echo(s, "b", 5004), _echo(s, "a", 5004)
        assert _reaches(s, "a", s.addr["b"], 5004) and _reaches(s, "b", s.addr["a"], 5004)
        t0 = time.monotonic()
        with s.cut(seconds=3):
            assert not _reaches(s, "a", s.addr["b"], 5004)  # no route: fails at once
            assert not _reaches(s, "b", s.addr["a"], 5004)  # no carrier: times out
        while time.monotonic() - t0 < 3.5:
            time.sleep(0.1)
        assert _reaches(s, "a", s.addr["b"], 5004) and _reaches(s, "b", s.addr["a"], 5004)
        echo_a.close()
        echo_b.close()


def test_temporal_behind_the_tls_front_answers_site_a_with_the_right_ca_only(tmp_path: Path) -> None:
    from app.stack import temporal_binary
    from tools.certs import make

    with TwoSites(rate="1gbit") as s:
        good = make(tmp_path / "pki", server_names=["temporal", s.addr["b"]], clients=["agent-a"]).dir
        other = make(tmp_path / "other", server_names=["temporal"], clients=["agent-x"]).dir
        s.popen(
            "b",
            [temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", "7233", "--headless",
             "--db-filename", str(tmp_path / "t.db"), "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        s.wait_port("b", "127.0.0.1", 7233, timeout=60)
        TlsFront(s, "b", (s.addr["b"], 7233), ("127.0.0.1", 7233), good, mtls=True).start()

        def probe(ca: Path, client: Path, name: str, port: int = 7233) -> tuple[int, str]:
            r = s.run(
                "a",
                [sys.executable, "-m", "labs.sites.temporal_probe", f"{s.addr['b']}:{port}",
                 "--ca", str(ca / "ca.pem"), "--cert", str(client / f"{name}.pem"),
                 "--key", str(client / f"{name}-key.pem")],
                env=TwoSites.env(), timeout=60,
            )  # fmt: skip
            return r.returncode, r.stdout.strip()

        deadline = time.monotonic() + 90  # the dev server accepts before it serves (slower under load)
        while (got := probe(good, good, "agent-a")) != (0, "OK default"):
            assert time.monotonic() < deadline, got
            time.sleep(1)
        rc, out = probe(other, good, "agent-a")  # a CA that did not sign the server
        assert rc == 1 and "\n" not in out and "InvalidCertificate" in out, out
        rc, out = probe(good, other, "agent-x")  # a client certificate of another CA (mTLS)
        assert rc == 1 and "\n" not in out, out
        # the plaintext server is on site B's loopback: site A cannot reach it but through the front
        assert s.run("a", ["bash", "-c", f"exec 3<>/dev/tcp/{s.addr['b']}/7233"]).returncode == 0
        assert s.run("a", ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7233"]).returncode != 0
