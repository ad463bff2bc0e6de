"""Throughput across the two-site lab link (labs/sites), for issue 14's anchors. Root only.

    python -m bench.sites_probe [--rate 1gbit] [--rtts 0,20,50] [--mib 256]

Per RTT: (a) one TCP stream (Python sender in A -> delaying relay in A -> shaped veth -> sink in B);
(b) nbdcopy in B from qemu-nbd in A over plain NBD/TCP (B's relay -> A's qemu-nbd), 1 and 4 connections;
(c) the same over NBD with TLS (qemu-nbd tls-creds-x509, nbds:// with tls-certificates=DIR). The image is
random data in /dev/shm (nothing to skip as zero). Prints a table: MB/s (10^6 B/s) and % of the rate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from labs.sites import TwoSites, rate_bits
from tools.certs import make


def _tcp(s: TwoSites, rtt: float, mib: int) -> float:
    srv = s.call("b", lambda: socket.create_server((s.addr["b"], 0)))
    port = srv.getsockname()[1]
    done: list[float] = []

    def sink() -> None:
        c, _ = srv.accept()
        while c.recv(1 << 20):
            pass
        done.append(time.monotonic())

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    relay, rport = s.relay("a", (s.addr["b"], port), rtt_ms=rtt)
    c = s.call("a", lambda: socket.create_connection(("127.0.0.1", rport)))
    buf = os.urandom(1 << 20)
    t0 = time.monotonic()
    for _ in range(mib):
        c.sendall(buf)
    c.close()
    t.join()
    relay.kill()
    srv.close()
    return mib * (1 << 20) / (done[0] - t0) / 1e6


def _nbdcopy(s: TwoSites, uri: str, conns: int, reqs: int, nbytes: int) -> tuple[float, str]:
    argv = ["nbdcopy", "--connections", str(conns), "--requests", str(reqs), uri, "null:"]
    t0 = time.monotonic()
    r = s.run("b", argv)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return nbytes / dt / 1e6, " ".join(argv)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--rtts", default="0,20,50")
    p.add_argument("--mib", type=int, default=256)
    a = p.parse_args()
    link = rate_bits(a.rate) / 8 / 1e6  # MB/s
    tmp = Path(tempfile.mkdtemp(prefix="sites-probe-", dir="/dev/shm"))
    try:
        img = tmp / "disk.raw"
        with img.open("wb") as f:
            for _ in range(a.mib):
                f.write(os.urandom(1 << 20))
        nbytes = a.mib << 20
        pki = make(tmp / "pki", server_names=["127.0.0.1", "localhost"], clients=["client"]).dir
        qd, cd = tmp / "qemu-tls", tmp / "nbd-tls"  # the file names qemu and libnbd (gnutls) expect
        for d, role in ((qd, "server"), (cd, "client")):
            d.mkdir()
            shutil.copy(pki / "ca.pem", d / "ca-cert.pem")
            shutil.copy(pki / f"{role}.pem", d / f"{role}-cert.pem")
            shutil.copy(pki / f"{role}-key.pem", d / f"{role}-key.pem")
        rows: list[tuple[int, str, float, str]] = []
        for rtt in [float(x) for x in a.rtts.split(",")]:
            with TwoSites(rate=a.rate) as s:
                rows.append((int(rtt), "tcp 1 stream (python)", _tcp(s, rtt, a.mib), ""))
                base = ["qemu-nbd", "-f", "raw", "-r", "-t", "-e", "16", "-x", "disk", "--bind", s.addr["a"]]
                s.popen("a", [*base, "--port", "10809", str(img)])
                tls = [
                    "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={qd},verify-peer=yes",
                    "--tls-creds", "tls0",
                ]  # fmt: skip
                s.popen("a", [*base, "--port", "10810", *tls, str(img)])
                s.wait_port("b", s.addr["a"], 10809)
                s.wait_port("b", s.addr["a"], 10810)
                _, plain = s.relay("b", (s.addr["a"], 10809), rtt_ms=rtt)
                _, sec = s.relay("b", (s.addr["a"], 10810), rtt_ms=rtt)
                for scheme, port, q in (("nbd", plain, ""), ("nbds", sec, f"?tls-certificates={cd}")):
                    for conns, reqs in ((1, 4), (1, 64), (4, 64), (8, 64)):
                        mbs, cmd = _nbdcopy(s, f"{scheme}://127.0.0.1:{port}/disk{q}", conns, reqs, nbytes)
                        rows.append((int(rtt), f"nbdcopy {scheme} c={conns} r={reqs}", mbs, cmd))
        print(f"link {a.rate} = {link:.0f} MB/s, {a.mib} MiB random")
        print(f"{'rtt ms':>6}  {'what':<26} {'MB/s':>7} {'% link':>7}")
        for rtt, what, mbs, _ in rows:
            print(f"{rtt:>6}  {what:<26} {mbs:7.1f} {100 * mbs / link:6.0f}%")
        print("\ncommands (in site B; relay per RTT as in labs/sites):")
        for cmd in dict.fromkeys(r[3] for r in rows if r[3]):
            print("  " + cmd.replace(str(tmp), "$TMP"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
