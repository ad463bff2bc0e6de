"""Two sites, as users deploy the product (labs.sites.deploy): KVM in site A -> KVM in site B across a
shaped link with a round trip, agents in each site reaching Temporal only through a TLS front, every
disk byte across the link inside mutual TLS. Real processes, real sockets, namespaces made here."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers_kvm import MiB, make_qcow2, qemu_io, to_raw

from labs.sites.deploy import Deployment
from labs.sites.netns import TwoSites

pytestmark = pytest.mark.root


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True).returncode == 0


def write_spec(path: Path, name: str, disk: Path, target: Path, **tuning: object) -> Path:
    spec = {
        "name": name,
        "source": {"platform": "kvm", "disks": [str(disk)], "host": "site-a"},
        "target": {"platform": "kvm", "path": str(target), "host": "site-b"},
        "schedule": {"interval": "1h"},
        "retention": {"points": 5},
        "tuning": {"heartbeat_timeout": "5s", **tuning},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def export_raw(d: Deployment, job: str, point: str, out: Path) -> Path:
    res = d.json("point", "export", job, "--point", point, "--format", "raw", "--output", str(out))
    return Path(res["files"][0]["path"])


def packet_socket(sites: TwoSites) -> socket.socket:
    """Every frame on site A's end of the link, both ways (AF_PACKET, ETH_P_ALL, in A's namespace)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE: no frame dropped
        s.bind((sites.dev["a"], 0))
        s.settimeout(0.2)
        return s

    return sites.call("a", make)


class Capture:
    """Every frame on site A's end of the link (AF_PACKET, in A's namespace), kept in memory."""

    def __init__(self, sites: TwoSites) -> None:
        self.frames: list[bytes] = []
        self.stop = threading.Event()

        self.sock = packet_socket(sites)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.frames.append(self.sock.recv(1 << 17))
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> bytes:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        return b"".join(self.frames)


def needles(raw: Path, start: int, length: int, step: int = 4096, size: int = 48) -> list[bytes]:
    """48-byte pieces of the disk's data every `step` bytes in [start, start+length)."""
    with raw.open("rb") as f:
        out = []
        for off in range(start, start + length, step):
            f.seek(off)
            out.append(f.read(size))
    return out


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[TwoSites, Deployment]]:
    base = tmp_path / "dep"
    with TwoSites(rate="1gbit") as s:
        d = Deployment(
            s,
            base,
            rtt_ms=20,
            roots={"source_roots": [str(tmp_path)], "target_roots": [str(tmp_path)]},
        )
        d.start()
        try:
            yield s, d
        finally:
            for site in list(d.agents):
                d.kill(site)


def test_kvm_across_the_link_full_then_incremental_bit_exact_and_never_in_plaintext(
    sites: tuple[TwoSites, Deployment], tmp_path: Path
) -> None:
    s, d = sites
    disk = make_qcow2(tmp_path / "vm.qcow2", 256 * MiB)
    random = tmp_path / "random.bin"
    random.write_bytes(os.urandom(16 * MiB))
    qemu_io(disk, "write -P 0x11 0 8M")  # compressible
    subprocess.run(  # 16 MiB of random data at 64 MiB: what the capture looks for
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {random} 64M 16M", str(disk)],
        check=True,
        capture_output=True,
    )
    ref0 = to_raw(disk, tmp_path / "ref0.raw")
    spec = write_spec(tmp_path / "job.yaml", "twosites", disk, tmp_path / "replicas")
    cap = Capture(s)
    try:
        d.cli("job", "create", "-f", str(spec))
        st = d.wait_point("twosites", 1)
    finally:
        wire = cap.close()
    ls = st["last_sync"]
    assert ls["kind"] == "full" and ls["bytes_read"] == 24 * MiB
    # zstd on the link: the 8 MiB of one pattern cross in a few KiB, the random data as it is
    assert 16 * MiB <= ls["bytes_on_wire"] < 17 * MiB, ls
    assert len(wire) > ls["bytes_on_wire"], "the capture saw the whole copy"
    found = [n for n in needles(ref0, 64 * MiB, 16 * MiB) if n in wire]
    assert found == [], f"{len(found)} pieces of the disk's data crossed the link in plaintext"
    p1 = st["last_point"]
    assert same(export_raw(d, "twosites", p1, tmp_path / "x1"), ref0)

    # incremental: a few writes, across the link, bit-exact; the first point unchanged
    qemu_io(disk, "write -P 0x22 1M 128k", "write -z 64M 1M", "write -P 0x33 200M 64k")
    ref1 = to_raw(disk, tmp_path / "ref1.raw")
    r = d.json("job", "sync-now", "twosites", "--wait", timeout=300)
    assert r["kind"] == "incremental" and r["bytes_read"] <= 2 * MiB, r
    assert same(export_raw(d, "twosites", r["point_id"], tmp_path / "x2"), ref1)
    assert same(export_raw(d, "twosites", p1, tmp_path / "x1b"), ref0)
    # the source's agent serves nothing once the syncs are done (each export ends with its sync)
    assert list((d.home("a") / "work" / "twosites" / "exports").glob("*.json")) == []


def test_the_capture_would_see_plaintext(sites: tuple[TwoSites, Deployment], tmp_path: Path) -> None:
    """The plaintext check above can fail: the same needles sent in the clear across the link are found."""
    s, d = sites
    data = os.urandom(1 * MiB)
    blob = tmp_path / "blob.raw"
    blob.write_bytes(data)
    cap = Capture(s)
    try:
        listener = s.call("b", lambda: socket.create_server((s.addr["b"], 9999)))

        def recv() -> None:
            c, _ = listener.accept()
            while c.recv(1 << 16):
                pass
            c.close()

        t = threading.Thread(target=recv, daemon=True)
        t.start()
        c = s.call("a", lambda: socket.create_connection((s.addr["b"], 9999)))
        c.sendall(data)
        c.close()
        t.join(timeout=10)
        listener.close()
        time.sleep(0.3)
    finally:
        wire = cap.close()
    found = [n for n in needles(blob, 0, 1 * MiB) if n in wire]
    assert len(found) > 200, len(found)  # nearly all of the 256 (a few straddle two segments)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill-source-agent", "kill-target-agent", "link-cut"])
def test_a_copy_survives_a_killed_agent_or_a_cut_link_resending_at_most_a_window(
    sites: tuple[TwoSites, Deployment], tmp_path: Path, fault: str
) -> None:
    """Mid-copy, SIGKILL of the source's agent (its data server goes with it), of the target's (the
    copy runs there), or the link down for 4 s: the sync completes bit-exact, and what crossed the link
    (A's veth tx counter) is the data plus framing plus at most one checkpoint window and the requests
    in flight."""
    s, d = sites
    data = 96 * MiB
    disk = make_qcow2(tmp_path / "vm.qcow2", 128 * MiB)
    random = tmp_path / "random.bin"
    random.write_bytes(os.urandom(data))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {random} 0 {data}", str(disk)],
        check=True,
        capture_output=True,
    )
    ref = to_raw(disk, tmp_path / "ref.raw")
    tuning = {
        "bandwidth_limit": 16 * MiB,  # ~6 s: the fault lands mid-copy
        "checkpoint_bytes": 8 * MiB,
        "connections": 2,
        "in_flight": 2,
        "chunk_size": 512 << 10,
    }
    window = 8 * MiB + 2 * 2 * (512 << 10)
    spec = write_spec(tmp_path / "job.yaml", "faults", disk, tmp_path / "replicas", **tuning)
    sent0 = d.link_bytes("a")
    d.cli("job", "create", "-f", str(spec))
    deadline = time.monotonic() + 120
    while not any(t["offset"] >= 24 * MiB for t in d.tokens("faults")):
        assert time.monotonic() < deadline, f"no progress: {d.log_tail('b')}"
        time.sleep(0.1)
    if fault == "link-cut":
        with s.cut(4):
            time.sleep(4.5)
    else:
        site = "a" if fault == "kill-source-agent" else "b"
        d.kill(site)
        time.sleep(1)
        d.start_agent(site)
    st = d.wait_point("faults", 1, timeout=240)
    sent = d.link_bytes("a") - sent0
    ls = st["last_sync"]
    assert ls["kind"] == "full" and ls["bytes_read"] == data, ls
    assert same(export_raw(d, "faults", st["last_point"], tmp_path / "x"), ref)
    framing = data * 6 // 100  # TCP/IP and TLS records (measured ~4.5%), the control traffic
    print(f"{fault}: {sent / MiB:.1f} MiB crossed for {data / MiB:.0f} MiB (window {window / MiB:.0f} MiB)")
    assert sent <= data + framing + window, (sent, data, window)


class ClassMeter:
    """Bytes sent from site A on the link per DSCP class per 0.5 s (AF_PACKET on A's veth end; the
    data server marks each job's data with its priority's DSCP)."""

    def __init__(self, sites: TwoSites) -> None:
        self.samples: list[tuple[float, int, int]] = []  # (time, dscp, bytes)
        self.stop = threading.Event()
        self.sock = packet_socket(sites)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":  # sent, IPv4
                continue
            self.samples.append((time.monotonic(), frame[15] >> 2, len(frame)))

    def rates(self, t0: float, t1: float) -> dict[int, float]:
        """Bytes/s per DSCP between t0 and t1."""
        out: dict[int, float] = {}
        for t, dscp, n in self.samples:
            if t0 <= t < t1:
                out[dscp] = out.get(dscp, 0) + n / (t1 - t0)
        return out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.slow
def test_three_priorities_share_a_400mbit_link_50_30_20_measured_at_the_link(tmp_path: Path) -> None:
    """Jobs of class critical, normal and low saturate a 400 Mbit/s link (its governor's budget 380
    Mbit/s, the rest for framing): the bytes each class puts on the link (by the DSCP its data
    carries) are 50/30/20 of what crosses within +-10%; when the critical job's copy ends, the
    others take up its share within 5 s. The copies start on a 1 MiB/s budget, raised to 380 Mbit/s
    once all three run (a live budget change)."""
    # MiB of random data per job: the critical one copies ~16 s at its share, the others on after it
    sizes = {"critical": 384, "normal": 512, "low": 512}
    dscp = {"critical": 34, "normal": 18, "low": 8}
    with TwoSites(rate="400mbit") as s:
        d = Deployment(
            s, tmp_path / "dep", roots={"source_roots": [str(tmp_path)], "target_roots": [str(tmp_path)]}
        )
        d.start()
        try:
            d.cli("link", "create", "wan", "--rate", "1MiB")  # the copies start at a trickle
            for prio, mib in sizes.items():
                disk = make_qcow2(tmp_path / f"{prio}.qcow2", mib * MiB)
                blob = tmp_path / f"{prio}.bin"
                blob.write_bytes(os.urandom(mib * MiB))
                subprocess.run(
                    ["qemu-io", "-f", "qcow2", "-c", f"write -s {blob} 0 {mib}M", str(disk)],
                    check=True,
                    capture_output=True,
                )
                blob.unlink()
                spec = write_spec(tmp_path / f"{prio}.yaml", f"j-{prio}", disk, tmp_path / f"rep-{prio}")
                raw = yaml.safe_load(spec.read_text())
                spec.write_text(yaml.safe_dump({**raw, "link": "wan", "priority": prio}))
            meter = ClassMeter(s)
            try:
                for prio in sizes:
                    d.cli("job", "create", "-f", str(tmp_path / f"{prio}.yaml"))
                deadline = time.monotonic() + 60
                while not all(d.tokens(f"j-{p}") for p in sizes):
                    assert time.monotonic() < deadline, "the three copies did not all start"
                    time.sleep(0.1)
                d.cli("link", "set", "wan", "--rate", "380Mbit")  # all three at once, live
                t0 = time.monotonic() + 3  # the leases settle (the copies ramp up from the trickle)
                time.sleep(13)
                shares = meter.rates(t0, t0 + 10)  # 10 s: a renewal's correction weighs 1/10
                print("bytes/s by DSCP", {k: round(v / 1e6, 2) for k, v in shares.items()})
                total = sum(shares.get(dscp[p], 0) for p in sizes)
                measured = {p: shares.get(dscp[p], 0) / total for p in sizes}
                print(f"link {total / 1e6:.1f} MB/s; shares {measured}")
                for p, want in (("critical", 0.5), ("normal", 0.3), ("low", 0.2)):
                    assert abs(measured[p] - want) <= 0.1 * want, measured
                assert total >= 0.85 * 400e6 / 8, total  # the link is full
                d.wait_point("j-critical", 1, timeout=120)
                done = max(t for t, c, _ in meter.samples if c == dscp["critical"])
                time.sleep(6)
                after = meter.rates(done + 5, done + 6)
                others = after.get(dscp["normal"], 0) + after.get(dscp["low"], 0)
                print(f"after the critical copy: {others / 1e6:.1f} MB/s for normal + low")
                assert others >= 0.85 * 400e6 / 8, after
            finally:
                meter.close()
        finally:
            for site in list(d.agents):
                d.kill(site)


def test_a_source_agent_with_another_hosts_certificate_is_refused_in_one_line(tmp_path: Path) -> None:
    """Site A's agent presents a valid certificate of this deployment, but for host site-c: site B's
    agent refuses to read from it, the sync fails with one line naming the peer and why, and nothing
    is written (no point, no replica data)."""
    with TwoSites(rate="1gbit") as s:
        roots = {"source_roots": [str(tmp_path)], "target_roots": [str(tmp_path)]}
        d = Deployment(s, tmp_path / "dep", roots=roots, cert_of={"a": "site-c"}).start()
        try:
            disk = make_qcow2(tmp_path / "vm.qcow2", 64 * MiB)
            qemu_io(disk, "write -P 0x11 0 4M")
            d.cli(
                "job",
                "create",
                "-f",
                str(write_spec(tmp_path / "job.yaml", "wrongcert", disk, tmp_path / "rep")),
            )
            deadline = time.monotonic() + 120
            while (st := d.json("job", "status", "wrongcert"))["failures"] < 1:
                assert time.monotonic() < deadline, st
                time.sleep(0.5)
            err = st["last_error"]
            assert "\n" not in err
            assert err.endswith("source agent host-site-a at 10.") is False
            assert (
                "source agent host-site-a at " in err
                and "its certificate is for host site-c, not site-a" in err
            )
            assert st["syncs"] == 0 and d.json("point", "list", "wrongcert") == []
            written = [p for p in (tmp_path / "rep").rglob("*.qcow2")]
            assert written == [], written  # the failed sync's pending replica was removed too
        finally:
            for site in list(d.agents):
                d.kill(site)


@pytest.mark.slow
def test_failover_at_site_b_then_failback_across_the_link(
    sites: tuple[TwoSites, Deployment], tmp_path: Path
) -> None:
    """The job's VM fails over at site B (the guest runs its filesystem workload there); failback
    pulls its writes across the link into the source's image at site A (B's agent snapshots the VM and
    exports each snapshot, A's agent copies it in): the image then holds the VM's filesystem as of its
    power-off, and the job replicates A -> B again with an incremental."""
    from labs.guest.build import with_mode
    from labs.guest.fscheck import check

    booted = r"SENDENSE-GUEST-BOOTED mode=\w+ seq=\d+"
    s, d = sites
    disk = with_mode(tmp_path / "guest.qcow2", "workload")
    replicas = tmp_path / "replicas"
    spec = {
        "name": "fbsites",
        "source": {"platform": "kvm", "disks": [str(disk)], "host": "site-a"},
        "target": {"platform": "kvm", "path": str(replicas), "host": "site-b"},
        "schedule": {"interval": "1h"},
        "recovery": {"memory_mib": 256, "boot_check": {"console_contains": booted, "timeout": "4m"}},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    d.cli("job", "create", "-f", str(tmp_path / "job.yaml"))
    d.wait_point("fbsites", timeout=300)
    fo = d.json("failover", "fbsites", timeout=600)
    assert fo["error"] is None, fo

    def console() -> str:
        return "".join(p.read_text(errors="replace") for p in replicas.rglob("*console*") if p.is_file())

    deadline = time.monotonic() + 300
    while "SENDENSE-GUEST-SEQ 50" not in console():  # the failed-over VM writes, at site B
        assert time.monotonic() < deadline, console()[-400:]
        time.sleep(1)
    printed = [int(n) for n in re.findall(r"SENDENSE-GUEST-SEQ (\d+)", console())]
    sent0 = d.link_bytes("b")
    r = d.json("failback", "fbsites", timeout=900)
    assert r["error"] is None, r
    assert r["syncs"] >= 2 and r["reverse_syncs"][-1]["cutover"], r
    assert all(x["compared_whole"] == [] for x in r["reverse_syncs"]), r
    # it crossed the link from B (zstd: the guest's filesystem blocks compress; measured 4.4 MB on the
    # link for 16 MB written)
    assert r["bytes_written"] > 0 and d.link_bytes("b") - sent0 > 2 * MiB
    fs = check(disk)
    assert fs.ok, fs.detail
    assert fs.seq is not None and fs.seq >= max(printed), (fs.seq, printed[-3:])
    st = d.wait_point("fbsites", count=2, timeout=300)  # replicating A -> B again
    assert st["failed_over"] is None and st["last_sync"]["kind"] == "incremental", st
    # nothing left served: the reverse exports ended with their snapshots
    assert list((d.home("b") / "work" / "fbsites" / "exports").glob("*.json")) == []


def _shadow_write(raw: Path, offset: int, length: int, pattern: int) -> None:
    with raw.open("r+b") as f:
        f.seek(offset)
        f.write(bytes([pattern]) * length)


def test_a_vm_that_moves_to_another_host_is_followed_at_its_next_sync(tmp_path: Path) -> None:
    """A libvirt domain replicated from site A's host moves to site B's host (shut down there, started
    here on the same images: what a cold migration over shared storage does). The next sync asks the
    agent registry, runs on the agent that runs the VM now, incrementally (the job's bitmaps came with the
    images; that host's libvirt adopts them as checkpoints), says so in status; later syncs are
    incremental there. Every point bit-exact."""
    import libvirt

    from labs.kvm.libvirtd import guest_write, libvirtd, remove_lab_domain

    disk = make_qcow2(tmp_path / "vm.qcow2", 64 * MiB)
    qemu_io(disk, "write -P 0x11 0 4M", "write -P 0x12 32M 1M")
    ref = to_raw(disk, tmp_path / "ref.raw")
    with libvirtd(tmp_path / "lv-a") as lva, libvirtd(tmp_path / "lv-b") as lvb:
        uri = {
            site: f"qemu:///system?socket={lab.base / 'run' / 'libvirt-sock'}"
            for site, lab in (("a", lva), ("b", lvb))
        }
        with TwoSites(rate="1gbit") as s:
            d = Deployment(
                s,
                tmp_path / "dep",
                roots={
                    "source_roots": [str(tmp_path)],
                    "target_roots": [str(tmp_path)],
                    "endpoints": ["qemu:///system?socket=*"],
                },
                site_env={site: {"SENDENSE_KVM_LIBVIRT_URIS": u} for site, u in uri.items()},
            )
            d.start()
            try:
                conn_a, conn_b = lva.connect(), lvb.connect()
                from labs.kvm.libvirtd import lab_domain_xml

                dom = conn_a.defineXML(lab_domain_xml("mover", [disk]))
                dom.create()
                vm_uuid = dom.UUIDString()
                spec = {
                    "name": "mover",
                    "source": {
                        "platform": "kvm",
                        "libvirt": {"uri": uri["a"], "domain": "mover"},
                        "host": "site-a",
                    },
                    "target": {"platform": "kvm", "path": str(tmp_path / "replicas"), "host": "site-b"},
                    "schedule": {"interval": "1h"},
                    "retention": {"points": 5},
                    "tuning": {"heartbeat_timeout": "5s"},
                }
                (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
                d.cli("job", "create", "-f", str(tmp_path / "job.yaml"))
                st = d.wait_point("mover", 1)
                assert st["last_sync"]["kind"] == "full" and st["source_host"] == "site-a", st
                assert st["last_sync"]["bytes_on_wire"] is not None  # read across the link
                assert same(export_raw(d, "mover", st["last_point"], tmp_path / "x1"), ref)

                guest_write(dom, "vda", 1 * MiB, 64 * 1024, 0x21)
                _shadow_write(ref, 1 * MiB, 64 * 1024, 0x21)
                r = d.json("job", "sync-now", "mover", "--wait", timeout=300)
                assert r["kind"] == "incremental" and r["bytes_read"] <= 1 * MiB, r
                assert same(export_raw(d, "mover", r["point_id"], tmp_path / "x2"), ref)

                # the move: off on host A (its libvirt forgets it), on at host B, same UUID and images
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                remove_lab_domain(dom)
                moved = conn_b.defineXML(xml)
                moved.create()
                assert moved.UUIDString() == vm_uuid
                guest_write(moved, "vda", 40 * MiB, 128 * 1024, 0x31)
                _shadow_write(ref, 40 * MiB, 128 * 1024, 0x31)
                time.sleep(20)  # site B's agent announces the VM (every 15 s)
                listed = {a["host_id"]: [v["vm_id"] for v in a["vms"]] for a in d.json("agent", "list")}
                assert listed.get("site-b") == [vm_uuid] and listed.get("site-a") == [], listed
                r = d.json("job", "sync-now", "mover", "--wait", timeout=300)
                st = d.json("job", "status", "mover")
                assert (
                    st["source_host"] == "site-b" and "from host site-a to host site-b" in st["last_move"]
                ), st
                # incremental: the bitmap came with the images (stored as A's QEMU let go of them,
                # loaded by B's) and B's libvirt adopted it as a checkpoint; one agent now: no link
                assert r["kind"] == "incremental" and r["bytes_on_wire"] is None, r
                assert 128 * 1024 <= r["bytes_read"] <= 1 * MiB, r
                assert same(export_raw(d, "mover", r["point_id"], tmp_path / "x3"), ref)

                guest_write(moved, "vda", 2 * MiB, 64 * 1024, 0x41)
                _shadow_write(ref, 2 * MiB, 64 * 1024, 0x41)
                r = d.json("job", "sync-now", "mover", "--wait", timeout=300)
                assert r["kind"] == "incremental" and r["bytes_read"] <= 1 * MiB, r
                assert same(export_raw(d, "mover", r["point_id"], tmp_path / "x4"), ref)
                d.cli("job", "delete", "mover")
            finally:
                for site in list(d.agents):
                    d.kill(site)
