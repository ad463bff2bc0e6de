"""The product's copy engine across the two-site link (groundwork for issue 14, not wired into `bench`):
the source disk is a qemu-nbd export over TLS in site A, read through the relay (added RTT) from site B
by `sendense.datapath.sync.copy_disk` with its default tuning (8 connections x 512 KiB, one request in
flight per connection), written to a local replica; next to nbdcopy over the same nbds:// URI.

    sudo .venv/bin/python bench/sites_engine_probe.py [--rate 1gbit] [--rtts 0,20,50] [--mib 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from connectors.kvm.target import PendingDisk
from labs.sites import TwoSites, rate_bits
from sendense.datapath.extents import Extent
from sendense.datapath.nbd import NbdConnection
from sendense.datapath.sync import copy_disk
from sendense.models import DiskSnapshot, Tuning
from tools.certs import make
from tools.qemu import qemu_nbd


class RemoteDisk:
    """A source disk read whole over NBD (TLS): every byte is data."""

    tracks_resize = True

    def __init__(self, uri: str, size: int) -> None:
        self.uri, self.size = uri, size

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        yield Extent(start, self.size - start)

    def connect(self) -> NbdConnection:
        return NbdConnection(self.uri, label="site A disk")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--rtts", default="0,20,50")
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--connections", default="8")
    a = p.parse_args()
    link = rate_bits(a.rate) / 8 / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="sites-engine-", dir="/dev/shm"))
    try:
        img = tmp / "disk.raw"
        with img.open("wb") as f:
            for _ in range(a.mib):
                f.write(os.urandom(1 << 20))
        size = a.mib << 20
        pki = make(tmp / "pki", server_names=["127.0.0.1", "localhost"], clients=["client"]).dir
        qd, cd = tmp / "qemu-tls", tmp / "nbd-tls"
        for d, role in ((qd, "server"), (cd, "client")):
            d.mkdir()
            shutil.copy(pki / "ca.pem", d / "ca-cert.pem")
            shutil.copy(pki / f"{role}.pem", d / f"{role}-cert.pem")
            shutil.copy(pki / f"{role}-key.pem", d / f"{role}-key.pem")
        print(f"link {a.rate} = {link:.0f} MB/s, {a.mib} MiB random, engine default chunk 512 KiB")
        for rtt in [float(x) for x in a.rtts.split(",")]:
            with TwoSites(rate=a.rate) as s:
                tls = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={qd},verify-peer=yes",
                       "--tls-creds", "tls0"]  # fmt: skip
                s.popen("a", ["qemu-nbd", "-f", "raw", "-r", "-t", "-e", "16", "-x", "disk",
                              "--bind", s.addr["a"], "--port", "10810", *tls, str(img)])  # fmt: skip
                s.wait_port("b", s.addr["a"], 10810)
                _, port = s.relay("b", (s.addr["a"], 10810), rtt_ms=rtt)
                uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={cd}"
                for conns in [int(c) for c in a.connections.split(",")]:
                    dst = tmp / "replica.raw"
                    dst.write_bytes(b"")
                    os.truncate(dst, size)
                    with qemu_nbd(dst, readonly=False, fmt="raw") as d:
                        disk = DiskSnapshot(key="d0", size=size, change_id="x")
                        tuning = Tuning(connections=conns)

                        def go(uri: str = uri, disk: DiskSnapshot = disk, tuning: Tuning = tuning) -> float:
                            t = time.monotonic()
                            copy_disk(RemoteDisk(uri, size), PendingDisk(d.uri, size, has_base=False), disk,
                                      tuning, on_checkpoint=lambda *_: None)  # fmt: skip
                            return time.monotonic() - t

                        secs = s.call("b", go)
                    same = subprocess.run(["cmp", "-s", str(img), str(dst)]).returncode == 0
                    mbs = size / secs / 1e6
                    print(f"rtt {rtt:>4.0f} ms  engine c={conns:<2} {mbs:7.1f} MB/s {100 * mbs / link:5.0f}%"
                          f"  bit-exact={same}  ({datetime.now(UTC):%H:%M:%S})")  # fmt: skip
                    dst.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
