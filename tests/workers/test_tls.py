"""mTLS between an agent and the Temporal server: certificates from `sendense certs make`, and
`workers.worker.connect` through a TLS-terminating proxy (Python ssl, client certificates required,
HTTP/2 bytes forwarded to the real dev server). The right certificates connect; no certificate, a
certificate of another CA, the wrong server name or plain TCP are refused in one line naming the
address."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import stack
from sendense.config import TemporalConfig
from sendense.errors import ServerUnreachable
from tests.app.test_stack import free_ports
from tools import certs
from workers.codec import EncryptionCodec
from workers.worker import connect


class TlsProxy:
    """Accepts TLS (client certificate required, ALPN h2) and pipes the bytes to `upstream`."""

    def __init__(self, cert_dir: Path, upstream: tuple[str, int]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert_dir / "server.pem", cert_dir / "server-key.pem")
        self.ctx.load_verify_locations(cert_dir / "ca.pem")
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.set_alpn_protocols(["h2"])
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes_ok = 0
        self.handshakes_refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshakes_refused += 1
            raw.close()
            return
        self.handshakes_ok += 1
        up = socket.create_connection(self.upstream)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
        pipe(conn, up)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pki")
    mine = certs.make(base / "ours", ("localhost", "127.0.0.1")).dir
    other = certs.make(base / "theirs", ("localhost", "127.0.0.1")).dir
    return mine, other


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pki: tuple[Path, Path]) -> Iterator[TlsProxy]:
    state = tmp_path_factory.mktemp("tls") / "state"
    port, ui = free_ports()
    info = stack.up(state, port=port, ui_port=ui, worker=False, codec_port=None)
    p = TlsProxy(pki[0], ("127.0.0.1", int(info.address.rsplit(":", 1)[1])))
    yield p
    p.close()
    stack.down(state, timeout=5)


def cfg(proxy: TlsProxy, d: Path | None, ca: Path, name: str | None = "localhost") -> TemporalConfig:
    return TemporalConfig(
        address=f"127.0.0.1:{proxy.port}",
        namespace="default",
        tls_cert=str(d / "worker.pem") if d else None,
        tls_key=str(d / "worker-key.pem") if d else None,
        tls_ca=str(ca / "ca.pem"),
        tls_server_name=name,
    )


CODEC = EncryptionCodec(os.urandom(32))


def test_certs_files_are_private_and_chain(pki: tuple[Path, Path]) -> None:
    mine, _ = pki
    assert mine.stat().st_mode & 0o777 == 0o700
    names = {p.name for p in mine.iterdir()}
    assert {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "worker.pem", "worker-key.pem"} <= names
    for p in mine.iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p
    ok = subprocess.run(
        ["openssl", "verify", "-CAfile", mine / "ca.pem", mine / "server.pem", mine / "worker.pem"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with pytest.raises(certs.CertError, match="already exists"):
        certs.make(mine, clients=["worker"])  # never over an existing key
    added = certs.make(mine, clients=["host-b"])
    assert added.ca_reused and {p.name for p in added.files} == {"host-b.pem", "host-b-key.pem"}


async def test_the_right_certificates_connect(proxy: TlsProxy, pki: tuple[Path, Path]) -> None:
    mine, _ = pki
    before = proxy.handshakes_ok
    client = await connect(cfg(proxy, mine, mine), codec=CODEC)
    assert [wf async for wf in client.list_workflows()] == []
    assert proxy.handshakes_ok > before


@pytest.mark.parametrize(
    "case", ["no client certificate", "another CA's certificate", "wrong server name", "another CA's server"]
)
async def test_refused_in_one_line(proxy: TlsProxy, pki: tuple[Path, Path], case: str) -> None:
    mine, other = pki
    c = {
        "no client certificate": cfg(proxy, None, mine),
        "another CA's certificate": cfg(proxy, other, mine),
        "wrong server name": cfg(proxy, mine, mine, name="not-the-server"),
        "another CA's server": cfg(proxy, mine, other),
    }[case]
    with pytest.raises(ServerUnreachable) as exc:
        await asyncio.wait_for(connect(c, codec=CODEC), 60)
    msg = str(exc.value)
    assert "\n" not in msg and f"Temporal server at 127.0.0.1:{proxy.port} is not reachable over TLS" in msg
    assert "-----BEGIN" not in msg
    why = {
        "no client certificate": "the server requires a client certificate",
        "another CA's certificate": "the server does not trust this client certificate",
        "wrong server name": "the server's certificate is not for this name",
        "another CA's server": "the server's certificate is not trusted",
    }[case]
    if case in ("no client certificate", "another CA's certificate"):
        # the server's alert races its closing the connection (TLS 1.3: the client learns after the
        # handshake): either is said, always in one line naming the address
        assert why in msg or "(handshake or connection failed)" in msg, msg
    else:  # the client's own verdict on the server's certificate: always the same
        assert why in msg, msg


async def test_plain_tcp_to_a_tls_server_is_refused(proxy: TlsProxy) -> None:
    plain = TemporalConfig(address=f"127.0.0.1:{proxy.port}", namespace="default")
    with pytest.raises(ServerUnreachable, match=f"127.0.0.1:{proxy.port} is not reachable"):
        await asyncio.wait_for(connect(plain, codec=CODEC), 60)


def test_certs_make_cli(tmp_path: Path) -> None:
    sendense = str(Path(sys.executable).with_name("sendense"))
    d = tmp_path / "c"
    p = subprocess.run([sendense, "certs", "make", str(d)], capture_output=True, text=True, check=True)
    assert "server-key.pem" in p.stdout and (d / "ui.pem").exists()
    again = subprocess.run(
        [sendense, "certs", "make", str(d), "--client", "ui"], capture_output=True, text=True
    )
    assert (
        again.returncode == 1
        and again.stderr.strip()
        == f"error: {d / 'ui-key.pem'}: already exists (certificates and keys are never overwritten)"
    )
