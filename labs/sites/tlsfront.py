"""A TLS front for Temporal's dev server (which speaks only plaintext gRPC), run in a site.

    certs = tools.certs.make(tmp / "pki", server_names=["temporal", sites.addr["b"]], clients=["agent-a"]).dir
    front = TlsFront(sites, "b", accept=(sites.addr["b"], 7233), connect=("127.0.0.1", port),
                     certs=certs, mtls=True).start()

    python -m labs.sites.tlsfront --accept IP:PORT --connect IP:PORT --cert S.pem --key S-key.pem \\
        [--ca CA.pem]

The dev server listens on its site's loopback only, so the other site reaches it through the front or
not at all. `--ca` (mtls=True): a client certificate signed by that CA is required.

Why not stunnel: Debian 12's stunnel4 (5.68) does not negotiate ALPN, and temporalio's gRPC client
(Rust tonic over rustls) refuses a TLS server that does not select "h2":
`tonic::transport::Error(Transport, ConnectError(H2NotNegotiated))` (tried, 2026). This front is
asyncio + ssl with ALPN h2, TLS 1.2+; it prints "READY <port>" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from labs.sites.netns import LabError, TwoSites


def context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    if ca is not None:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(256 * 1024):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except (ConnectionError, OSError):
        w.close()


async def _serve(r1: asyncio.StreamReader, w1: asyncio.StreamWriter, to: tuple[str, int]) -> None:
    try:
        r2, w2 = await asyncio.open_connection(*to)
    except OSError:
        w1.close()
        return
    try:
        await asyncio.gather(_pump(r1, w2), _pump(r2, w1))
    finally:
        for w in (w1, w2):
            with contextlib.suppress(Exception):
                w.close()


async def main(accept: tuple[str, int], to: tuple[str, int], ctx: ssl.SSLContext) -> None:
    server = await asyncio.start_server(lambda r, w: _serve(r, w, to), accept[0], accept[1], ssl=ctx)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def cli() -> None:
    p = argparse.ArgumentParser(description="TLS front (ALPN h2) for a plaintext gRPC server")
    p.add_argument("--accept", required=True, type=_hostport)
    p.add_argument("--connect", required=True, type=_hostport)
    p.add_argument("--cert", required=True, type=Path)
    p.add_argument("--key", required=True, type=Path)
    p.add_argument("--ca", type=Path, help="require a client certificate signed by this CA (mTLS)")
    a = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(a.accept, a.connect, context(a.cert, a.key, a.ca)))


@dataclass
class TlsFront:
    sites: TwoSites
    site: str
    accept: tuple[str, int]
    connect: tuple[str, int]
    certs: Path  # tools.certs layout: ca.pem server.pem server-key.pem
    mtls: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> TlsFront:
        c = self.certs
        argv = [
            sys.executable, "-m", "labs.sites.tlsfront",
            "--accept", f"{self.accept[0]}:{self.accept[1]}",
            "--connect", f"{self.connect[0]}:{self.connect[1]}",
            "--cert", str(c / "server.pem"), "--key", str(c / "server-key.pem"),
        ]  # fmt: skip
        if self.mtls:
            argv += ["--ca", str(c / "ca.pem")]
        self.proc = self.sites.popen(self.site, argv, stdout=subprocess.PIPE, env=self.sites.env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY "):
            raise LabError(f"TLS front in site {self.site} did not start: {line!r}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    cli()
