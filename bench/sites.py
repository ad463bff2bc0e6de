"""Cross-site full sync throughput, through the product deployed on two sites (labs.sites.deploy). Root.

    python -m bench.sites [--rate 1gbit] [--rtts 0,20,50] [--mib 1024] [--runs 2] [--out FILE]

Per RTT, on the same shaped link in the same run: the product's full sync of a disk of random data
from site A's agent to site B's (mutual TLS, zstd on: random data goes raw; the copy engine's
requests in flight across the link) against `nbdcopy --connections 4 --requests 64` in B reading the
same image over plain NBD/TCP from qemu-nbd in A (no TLS, no writes: a ceiling, not a peer). Then, at
the middle RTT, a disk of compressible data (text-like), where zstd should carry more than the link
rate. CPU seconds per GiB read, per agent (its process's user+system time over the sync).
Figures: MB/s (10^6 B/s) of the copy (the engine's time, `point list`) and of the whole sync (the
job's sync, with its snapshot, export and commit), and % of the shaped rate. Medians of `--runs`.
Results as JSON (default bench/results/sites.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

from labs.sites import TwoSites, rate_bits
from labs.sites.deploy import Deployment

MiB = 1 << 20


def _image(path: Path, mib: int, kind: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{mib}M"], check=True)
    blob = path.with_suffix(".bin")
    corpus = b""
    if kind == "text":  # real text: this Python's own library sources, repeated (zstd -1 sees ~4x)
        lib = Path(os.__file__).parent
        corpus = b"".join(p.read_bytes() for p in sorted(lib.glob("*.py")))
    with blob.open("wb") as f:
        for i in range(mib):
            if kind == "random":
                f.write(os.urandom(MiB))
            else:
                at = (i * MiB) % max(1, len(corpus) - MiB)
                f.write(corpus[at : at + MiB])
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {blob} 0 {mib}M", str(path)],
        check=True,
        capture_output=True,
    )
    blob.unlink()
    return path


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def _product(d: Deployment, tmp: Path, name: str, disk: Path, compression: str = "auto") -> dict[str, Any]:
    spec = {
        "name": name,
        "source": {"platform": "kvm", "disks": [str(disk)], "host": "site-a"},
        "target": {"platform": "kvm", "path": str(tmp / f"rep-{name}"), "host": "site-b"},
        "schedule": {"interval": "24h"},
        "tuning": {"compression": compression},
    }
    f = tmp / f"{name}.yaml"
    f.write_text(yaml.safe_dump(spec))
    cpu0 = {s: _cpu(p.pid) for s, p in d.agents.items()}
    d.cli("job", "create", "-f", str(f))
    st = d.wait_point(name, 1, timeout=900)
    cpu = {s: _cpu(p.pid) - cpu0[s] for s, p in d.agents.items()}
    ls = st["last_sync"]
    point = d.json("point", "list", name)[0]
    copy_s = float(point["stats"]["seconds"]) or float(ls["seconds"])
    gib = ls["bytes_read"] / (1 << 30)
    d.cli("job", "delete", name, "--purge")
    shutil.rmtree(tmp / f"rep-{name}", ignore_errors=True)
    return {
        "bytes_read": ls["bytes_read"],
        "bytes_on_wire": ls["bytes_on_wire"],
        "copy_mbs": ls["bytes_read"] / copy_s / 1e6,
        "sync_mbs": ls["bytes_read"] / float(ls["seconds"]) / 1e6,
        "cpu_s_per_gib": {s: round(c / gib, 2) for s, c in cpu.items()},
    }


def _nbdcopy(s: TwoSites, disk: Path, rtt: float, nbytes: int) -> float:
    server = s.popen("a", ["qemu-nbd", "-f", "qcow2", "-r", "-t", "-e", "16", "-x", "disk", "--bind",
                           s.addr["a"], "--port", "10809", str(disk)])  # fmt: skip
    s.wait_port("b", s.addr["a"], 10809)
    relay, port = s.relay("b", (s.addr["a"], 10809), rtt_ms=rtt) if rtt else (None, 10809)
    host = "127.0.0.1" if rtt else s.addr["a"]
    t0 = time.monotonic()
    r = s.run(
        "b", ["nbdcopy", "--connections", "4", "--requests", "64", f"nbd://{host}:{port}/disk", "null:"]
    )
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"nbdcopy: {r.stderr.strip()}")
    if relay is not None:
        relay.kill()
    server.kill()
    server.wait()
    return nbytes / dt / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sites", description=__doc__.splitlines()[0])
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--rtts", default="0,20,50")
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sites.json"))
    a = p.parse_args(argv)
    link = rate_bits(a.rate) / 8 / 1e6
    rtts = [float(x) for x in a.rtts.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-sites-"))  # (not /dev/shm: an agent's policy refuses /dev)
    rows: list[dict[str, Any]] = []
    try:
        random = _image(tmp / "random.qcow2", a.mib, "random")
        text = _image(tmp / "text.qcow2", a.mib, "text")
        for rtt in rtts:
            with TwoSites(rate=a.rate) as s:
                d = Deployment(s, tmp / f"dep-{int(rtt)}", rtt_ms=rtt, roots={"source_roots": [str(tmp)],
                               "target_roots": [str(tmp)]}).start()  # fmt: skip
                try:
                    ref = [_nbdcopy(s, random, rtt, a.mib * MiB) for _ in range(a.runs)]
                    runs = [_product(d, tmp, f"r{int(rtt)}-{i}", random) for i in range(a.runs)]
                    row: dict[str, Any] = {
                        "rtt_ms": rtt,
                        "data": "random",
                        "copy_mbs": statistics.median(r["copy_mbs"] for r in runs),
                        "sync_mbs": statistics.median(r["sync_mbs"] for r in runs),
                        "nbdcopy_plain_mbs": statistics.median(ref),
                        "cpu_s_per_gib": runs[-1]["cpu_s_per_gib"],
                        "bytes_on_wire_ratio": runs[-1]["bytes_on_wire"] / runs[-1]["bytes_read"],
                        "runs": runs,
                    }
                    rows.append(row)
                    if rtt == rtts[len(rtts) // 2]:
                        for comp in ("auto", "off"):
                            runs = [
                                _product(d, tmp, f"t{int(rtt)}{comp}-{i}", text, comp) for i in range(a.runs)
                            ]
                            rows.append(
                                {
                                    "rtt_ms": rtt,
                                    "data": f"text, compression {comp}",
                                    "copy_mbs": statistics.median(r["copy_mbs"] for r in runs),
                                    "sync_mbs": statistics.median(r["sync_mbs"] for r in runs),
                                    "cpu_s_per_gib": runs[-1]["cpu_s_per_gib"],
                                    "bytes_on_wire_ratio": runs[-1]["bytes_on_wire"] / runs[-1]["bytes_read"],
                                    "runs": runs,
                                }
                            )
                finally:
                    for site in list(d.agents):
                        d.kill(site)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"link {a.rate} = {link:.0f} MB/s, {a.mib} MiB per disk, median of {a.runs}")
    print(f"{'rtt':>4} {'data':<26} {'copy MB/s':>9} {'% link':>6} {'sync MB/s':>9} {'nbdcopy':>8} "
          f"{'wire/read':>9}  cpu s/GiB a, b")  # fmt: skip
    for r in rows:
        ref = f"{r['nbdcopy_plain_mbs']:8.1f}" if "nbdcopy_plain_mbs" in r else f"{'-':>8}"
        cpu = r["cpu_s_per_gib"]
        print(
            f"{r['rtt_ms']:>4.0f} {r['data']:<26} {r['copy_mbs']:9.1f} {100 * r['copy_mbs'] / link:5.0f}% "
            f"{r['sync_mbs']:9.1f} {ref} {r['bytes_on_wire_ratio']:9.3f}  {cpu.get('a')}, {cpu.get('b')}"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "rate": a.rate,
                "link_mbs": link,
                "mib": a.mib,
                "runs": a.runs,
                "argv": sys.argv,
                "rows": rows,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
