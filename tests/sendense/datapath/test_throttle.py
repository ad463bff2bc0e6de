"""The job's token bucket: its average rate, and a new rate reaching callers already waiting."""

from __future__ import annotations

import threading
import time

from sendense.datapath.throttle import Throttle


def test_the_average_rate_is_the_rate_with_several_threads() -> None:
    t = Throttle(4 << 20, burst_seconds=0.25)
    t0 = time.monotonic()

    def go() -> None:
        for _ in range(8):
            t.consume(256 << 10)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    took = time.monotonic() - t0
    # 8 MiB at 4 MiB/s, less the quarter second of burst
    assert 1.6 <= took <= 2.6, took
    assert t.moved == 8 << 20 and t.waited > 0


def test_a_higher_rate_reaches_callers_already_waiting() -> None:
    """Eight threads in debt at 256 KiB/s (each would sleep up to 8 s): the rate raised to 64 MiB/s
    lets them all through within a fraction of a second."""
    t = Throttle(256 << 10, burst_seconds=0.1)
    done: list[float] = []

    def go() -> None:
        t.consume(256 << 10)
        done.append(time.monotonic())

    threads = [threading.Thread(target=go) for _ in range(8)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    raised = time.monotonic()
    t.set_rate(64 << 20)
    for th in threads:
        th.join(timeout=5)
    assert len(done) == 8
    assert max(done) - raised < 0.5, max(done) - raised


def test_a_lower_rate_applies_at_once() -> None:
    t = Throttle(64 << 20, burst_seconds=1)
    t.set_rate(1 << 20)
    t0 = time.monotonic()
    for _ in range(3):
        t.consume(512 << 10)
    # the bucket shrank to 1 MiB with the rate (else its 64 MiB would let all through): 0.5 s of wait
    assert time.monotonic() - t0 >= 0.45
