"""A delaying TCP relay (asyncio, user space): latency for the two-site lab, whose kernel has no netem.

    python -m labs.sites.relay --listen 127.0.0.1:9000 --to 10.1.2.1:10809 --delay-ms 10 [--delay-back-ms 10]

Every accepted connection is forwarded to `--to`; each chunk read from one side is released to the other
`delay` after it was read (one-way delay per direction; RTT = delay + delay-back), in order. Reading
never waits for the delay: chunks queue (up to `--window` bytes per direction, default 8 MiB, then
reading pauses), so a stream's throughput is bounded by window / delay (8 MiB / 10 ms = 6.7 Gbit/s),
not by one chunk per RTT. The window plays the part of a TCP receive window over a long path: with a
window below rate x delay a single stream is window-limited exactly like TCP on a WAN.

How it combines with tbf: the relay's two legs are ordinary TCP connections with microsecond RTTs
(the relay runs in one site, one leg on its loopback, the other across the shaped veth), so tbf's rate
applies to the bytes as the relay releases them; the delay is added before the shaped link. An
application protocol with a bounded number of requests in flight (NBD) sees RTT = relay delay + tbf
queueing + serialisation, and its per-connection throughput falls with RTT as on a WAN. TCP's own
congestion window does not see the delay (each leg is short): loss-recovery dynamics of a long TCP
path are not reproduced, only the request/response latency and the window limit.

Prints "READY <port>" on stdout once listening (port 0 picks one).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import socket
import sys
import time

CHUNK = 256 * 1024


class _Pipe:
    def __init__(self, delay: float, window: int) -> None:
        self.delay = delay
        self.window = window
        self.q: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.more = asyncio.Event()  # something was queued
        self.room = asyncio.Event()  # queued fell below the window
        self.room.set()

    async def read(self, r: asyncio.StreamReader) -> None:
        try:
            while True:
                await self.room.wait()
                data = await r.read(CHUNK)
                self.q.append((time.monotonic(), data or None))
                self.more.set()
                if not data:
                    return
                self.queued += len(data)
                if self.queued >= self.window:
                    self.room.clear()
        except (ConnectionError, OSError):
            self.q.append((time.monotonic(), None))
            self.more.set()

    async def write(self, w: asyncio.StreamWriter) -> None:
        while True:
            while not self.q:
                self.more.clear()
                await self.more.wait()
            t, _ = self.q[0]
            wait = t + self.delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            out = []
            eof = False
            while self.q and self.q[0][0] + self.delay <= now:  # everything due, in one write
                _, data = self.q.popleft()
                if data is None:
                    eof = True
                    break
                out.append(data)
                self.queued -= len(data)
            if out:
                w.write(b"".join(out))
                if self.queued < self.window:
                    self.room.set()
                await w.drain()
            if eof:
                with contextlib.suppress(OSError):
                    w.write_eof()
                return


async def _serve(
    r1: asyncio.StreamReader,
    w1: asyncio.StreamWriter,
    to: tuple[str, int],
    fwd: float,
    back: float,
    window: int,
) -> None:
    try:
        r2, w2 = await asyncio.open_connection(*to)
    except OSError:
        w1.close()
        return
    for w in (w1, w2):
        s = w.get_extra_info("socket")
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up, down = _Pipe(fwd, window), _Pipe(back, window)
    tasks = [asyncio.ensure_future(x) for x in (up.read(r1), up.write(w2), down.read(r2), down.write(w1))]
    try:
        # both writers done (both directions saw EOF) or any error: tear down
        await asyncio.gather(tasks[1], tasks[3])
    except (ConnectionError, OSError):
        pass
    finally:
        for t in tasks:
            t.cancel()
        for w in (w1, w2):
            w.close()


async def main(listen: tuple[str, int], to: tuple[str, int], fwd: float, back: float, window: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, to, fwd, back, window), listen[0], listen[1], reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    async with server:
        await server.serve_forever()


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, type=_hostport)
    p.add_argument("--to", required=True, type=_hostport)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, listen side -> to side")
    p.add_argument("--delay-back-ms", type=float, default=None, help="to -> listen (default: --delay-ms)")
    p.add_argument("--window", type=int, default=8 * 1024 * 1024, help="bytes queued per direction")
    a = p.parse_args(argv)
    back = a.delay_ms if a.delay_back_ms is None else a.delay_back_ms
    try:
        asyncio.run(main(a.listen, a.to, a.delay_ms / 1000, back / 1000, a.window))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    cli()
