"""Two sites on one machine: two network namespaces joined by a veth pair shaped with `tc tbf`.

    with TwoSites(rate="1gbit") as s:            # root only
        s.run("a", ["ip", "addr"])               # a command in site A
        p = s.popen("b", ["sleep", "60"])        # a process in site B; it dies with this process
        with s.cut(seconds=3): ...               # the link down for 3 s (then up again)

Names: namespaces `sd-<pid>-<rand>-a|b`, veth ends `sdv<rand>a|b` (IFNAMSIZ is 16). The pid is the
creating process's: `sweep()` (called by every `TwoSites` on entry) deletes namespaces whose creator is
gone, so a run killed with SIGKILL leaves nothing behind for long. Deleting a namespace removes its
veth end, which removes the pair.

Shaping: `tbf rate R burst B latency 20ms` on the egress of BOTH veth ends, so each direction is shaped
to R independently (full duplex, like a WAN circuit). burst = max(64 KiB, 2 ms of R): big enough for
GSO super-packets on veth (up to 64 KiB) and for timer slack at 1 Gbit/s, small enough that a bulk
transfer's average is R (a 2 ms burst is 0.2% of a 1 s measurement). latency 20 ms bounds the queue
(R x 20 ms + burst bytes): a bulk flow adds at most ~20 ms of queueing on top of the relay's delay,
so latency tests run without a competing bulk flow (see NOTES.md).

Processes in a site are started as `setpriv --pdeathsig KILL ip netns exec NS CMD`: setpriv sets the
parent-death signal and execs ip, which execs CMD (no fork in between), so CMD is SIGKILLed when the
thread that spawned it dies, even if the test process itself is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

NAME = re.compile(r"^sd-(\d+)-([0-9a-f]{6})-([ab])$")
SIDES = ("a", "b")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _tc(*args: str) -> None:
    r = subprocess.run(["tc", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"tc {' '.join(args)}: {r.stderr.strip()}")


def namespaces() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Delete the lab namespaces of dead runs (creator pid gone); returns their names."""
    gone = []
    for ns in namespaces():
        m = NAME.match(ns)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", ns, check=False)
            gone.append(ns)
    return gone


def rate_bits(rate: str) -> int:
    """'1gbit' -> 1_000_000_000 (tc's units: kbit, mbit, gbit; decimal)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.strip().lower())
    if not m:
        raise LabError(f"rate {rate!r}: expected e.g. 100mbit or 1gbit")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)])


def tbf_args(rate: str) -> list[str]:
    burst = max(64 * 1024, rate_bits(rate) // 8 * 2 // 1000)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "20ms"]


@dataclass
class TwoSites:
    """Sites `a` and `b`: `addr['a']`, `addr['b']` are their ends of the link (a /30)."""

    rate: str | None = "1gbit"  # None: unshaped
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    ns: dict[str, str] = field(init=False)
    dev: dict[str, str] = field(init=False)
    addr: dict[str, str] = field(init=False)
    _procs: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        pid = os.getpid()
        self.ns = {s: f"sd-{pid}-{self.tag}-{s}" for s in SIDES}
        self.dev = {s: f"sdv{self.tag}{s}" for s in SIDES}
        n = int(self.tag, 16)
        net = f"10.{100 + n % 100}.{(n >> 8) % 256}"  # 10.100-199.x.0/30
        self.addr = {"a": f"{net}.1", "b": f"{net}.2"}
        rate_bits(self.rate) if self.rate else None

    # --- life cycle --------------------------------------------------------------------------------
    def __enter__(self) -> TwoSites:
        if os.geteuid() != 0:
            raise LabError("two sites need root (ip netns, tc)")
        sweep()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        for s in SIDES:
            _ip("netns", "add", self.ns[s])
            _ip("-n", self.ns[s], "link", "set", "lo", "up")
        a, b = self.dev["a"], self.dev["b"]
        _ip("link", "add", a, "netns", self.ns["a"], "type", "veth", "peer", "name", b, "netns", self.ns["b"])
        for s in SIDES:
            _ip("-n", self.ns[s], "addr", "add", f"{self.addr[s]}/30", "dev", self.dev[s])
            _ip("-n", self.ns[s], "link", "set", self.dev[s], "up")
            if self.rate:
                _tc("-n", self.ns[s], "qdisc", "replace", "dev", self.dev[s], "root", *tbf_args(self.rate))

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self._procs.clear()
        for s in SIDES:
            _ip("netns", "del", self.ns[s], check=False)

    # --- running things in a site ------------------------------------------------------------------
    def cmd(self, site: str, argv: Sequence[str]) -> list[str]:
        return ["setpriv", "--pdeathsig", "KILL", "ip", "netns", "exec", self.ns[site], *argv]

    def run(self, site: str, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(site, argv), **kw)  # type: ignore[call-overload,no-any-return]

    def popen(self, site: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        p: subprocess.Popen[bytes] = subprocess.Popen(self.cmd(site, argv), **kw)  # type: ignore[call-overload]
        self._procs.append(p)
        return p

    def call(self, site: str, fn: Callable[[], T]) -> T:
        """fn() on a fresh thread that has entered `site`'s network namespace: the sockets it makes
        belong to the site (and keep working from any thread afterwards)."""
        box: list[Any] = []

        def go() -> None:
            try:
                fd = os.open(f"/run/netns/{self.ns[site]}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise LabError(f"setns {self.ns[site]}: errno {ctypes.get_errno()}")
                finally:
                    os.close(fd)
                box.append((True, fn()))
            except BaseException as e:  # re-raised in the caller
                box.append((False, e))

        t = threading.Thread(target=go, daemon=True)  # the thread (and its namespace) ends with fn
        t.start()
        t.join()
        ok, v = box[0]
        if not ok:
            raise v
        return cast(T, v)

    def wait_port(self, site: str, host: str, port: int, timeout: float = 15.0) -> None:
        """Until something accepts on host:port as seen from `site`."""
        deadline = time.monotonic() + timeout

        def probe() -> bool:
            try:
                socket.create_connection((host, port), timeout=1).close()
                return True
            except OSError:
                return False

        while not self.call(site, probe):
            if time.monotonic() > deadline:
                raise LabError(f"{host}:{port} does not accept in site {site} after {timeout:.0f} s")
            time.sleep(0.1)

    @staticmethod
    def env() -> dict[str, str]:
        """The environment for `python -m labs.sites...` in a site: this checkout first on the path."""
        root = Path(__file__).resolve().parents[2]
        return {**os.environ, "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}"}

    def relay(
        self,
        site: str,
        to: tuple[str, int],
        rtt_ms: float,
        listen: str = "127.0.0.1",
        port: int = 0,
        window: int | None = None,
    ) -> tuple[subprocess.Popen[bytes], int]:
        """A delaying relay (labs.sites.relay) in `site`, listening on listen:port and forwarding to
        `to` with rtt_ms/2 each way; returns (process, port)."""
        argv = [
            sys.executable, "-m", "labs.sites.relay", "--listen", f"{listen}:{port}",
            "--to", f"{to[0]}:{to[1]}", "--delay-ms", str(rtt_ms / 2),
        ]  # fmt: skip
        if window is not None:
            argv += ["--window", str(window)]
        p = self.popen(site, argv, stdout=subprocess.PIPE, env=self.env())
        assert p.stdout is not None
        line = p.stdout.readline().decode()
        if not line.startswith("READY "):
            raise LabError(f"relay in site {site} did not start: {line!r}")
        return p, int(line.split()[1])

    # --- the link ----------------------------------------------------------------------------------
    def link(self, up: bool, site: str = "a") -> None:
        _ip("-n", self.ns[site], "link", "set", self.dev[site], "up" if up else "down")

    @contextlib.contextmanager
    def cut(self, seconds: float | None = None, site: str = "a") -> Iterator[None]:
        """The link down (site's veth end; the peer loses carrier) for the block, or for `seconds`
        from entry if given (then up again in the background, even if the block runs longer)."""
        self.link(False, site)
        timer = None
        if seconds is not None:
            timer = threading.Timer(seconds, self.link, args=(True, site))
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            if timer is None:
                self.link(True, site)

    def cut_for(self, seconds: float, site: str = "a") -> threading.Thread:
        """The link down now and up again after `seconds`, in the background (mid-copy cuts)."""

        def go() -> None:
            self.link(False, site)
            time.sleep(seconds)
            self.link(True, site)

        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t
