"""A source disk served by one agent and read by another over mutual TLS (sendense.datapath.remote):
real sockets, real TLS with certificates `sendense certs agent` makes, the real copy engine."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sendense.datapath.copy import CopyPlan, run_copy
from sendense.datapath.extents import Extent
from sendense.datapath.remote import AgentTls, DiskServer, Hello, Peer, RemoteSourceDisk
from sendense.errors import (
    ChangeTrackingLost,
    DataPathError,
    NotAllowed,
    ResourceNotFound,
    ResourceUnavailable,
)
from tools.certs import agent

MiB = 1 << 20
CHUNK = 256 << 10
SIZE = 8 * MiB
TOKEN = "t0ken-of-the-export"


class MemSource:
    """A SourceDisk in memory: data ranges where bytes were set, the rest zero; `since` = "lost" raises
    ChangeTrackingLost, "half" lists the first half only (an incremental's change list)."""

    tracks_resize = True

    def __init__(self, buf: bytearray) -> None:
        self.buf, self.size = buf, len(buf)
        self.readers = 0

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        if since == "lost":
            raise ChangeTrackingLost("disk d0: bitmap b1 is gone")
        end = self.size // 2 if since == "half" else self.size
        for off in range(start - start % CHUNK, end, CHUNK):
            piece = self.buf[off : off + CHUNK]
            yield Extent(max(off, start), off + len(piece) - max(off, start), zero=not any(piece))

    def connect(self) -> MemReader:
        self.readers += 1
        return MemReader(self.buf)

    def __enter__(self) -> MemSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class MemReader:
    def __init__(self, buf: bytearray) -> None:
        self.buf = buf

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def close(self) -> None:
        pass

    def wire(self) -> None:
        return None


class MemTarget:
    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.buf[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def wire(self) -> None:
        return None


def disk_bytes() -> bytearray:
    """1 MiB random, 1 MiB compressible text, 2 MiB zero, 1 MiB random at 6 MiB, the rest zero."""
    buf = bytearray(SIZE)
    buf[0:MiB] = os.urandom(MiB)
    buf[MiB : 2 * MiB] = (b"sendense replicates VMs block by block. " * 30000)[:MiB]
    buf[6 * MiB : 7 * MiB] = os.urandom(MiB)
    return buf


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    for host in ("src", "dst", "other"):
        agent(d, host, ["127.0.0.1"])
    agent(d, "old", ["127.0.0.1"], days=-1)  # expired yesterday
    agent(tmp_path_factory.mktemp("foreign"), "dst", ["127.0.0.1"])  # another deployment's CA
    return d


def tls(d: Path, host: str) -> AgentTls:
    return AgentTls(d / f"agent-{host}.pem", d / f"agent-{host}-key.pem", d / "ca.pem")


@contextmanager
def serving(
    certs: Path, src: MemSource, host: str = "src", expect_peer: str = "dst"
) -> Iterator[tuple[DiskServer, list[str]]]:
    asked: list[str] = []

    def authorize(h: Hello, peer: str) -> tuple[str, object]:
        asked.append(f"{h.op} {h.export} {h.disk} from {peer}")
        if h.export != "job1/s1" or h.disk != "d0":
            raise ResourceNotFound(f"export {h.export} disk {h.disk}: not exported by this agent")
        if h.token != TOKEN:
            raise NotAllowed(f"export {h.export}: wrong token")
        if peer != expect_peer:
            raise NotAllowed(f"agent host-{peer} is not the target of export {h.export}")
        return f"{h.export}/{h.disk}", lambda: src

    with DiskServer(("127.0.0.1", 0), tls(certs, host), authorize) as srv:  # type: ignore[arg-type]
        yield srv, asked


def peer(srv: DiskServer, host: str = "src", token: str = TOKEN, export: str = "job1/s1") -> Peer:
    return Peer(address=f"127.0.0.1:{srv.address[1]}", host_id=host, export=export, token=token)


def copy(disk: RemoteSourceDisk, since: str | None = None, connections: int = 3) -> tuple[MemTarget, object]:
    dst = MemTarget(disk.size)
    stats, _ = run_copy(
        CopyPlan(
            extents=[e for e in disk.extents(since) if not e.zero],
            open_reader=disk.connect,
            open_writer=lambda: dst,
            chunk_size=CHUNK,
            connections=connections,
        )
    )
    return dst, stats


def test_a_remote_copy_is_bit_exact_and_zero_chunks_never_cross_the_link(certs: Path) -> None:
    src = MemSource(disk_bytes())
    with serving(certs, src) as (srv, asked):
        disk = RemoteSourceDisk(peer(srv), "d0", tls(certs, "dst"), in_flight=4)
        assert (disk.size, disk.tracks_resize) == (SIZE, True)
        dst, stats = copy(disk)
    assert dst.buf == src.buf
    assert stats.bytes_read == 3 * MiB  # the data ranges only  # type: ignore[attr-defined]
    # uncompressed: payload plus 5 bytes per chunk; plus the extents stream
    assert 3 * MiB <= disk.wire.bytes < 3 * MiB + 64 << 10
    assert all(a.endswith("from dst") for a in asked)


def test_compression_sends_text_small_and_random_data_raw(certs: Path) -> None:
    src = MemSource(disk_bytes())
    with serving(certs, src) as (srv, _):
        disk = RemoteSourceDisk(peer(srv), "d0", tls(certs, "dst"), compress=True)
        dst, stats = copy(disk)
    assert dst.buf == src.buf
    # 2 MiB random cross as they are; the 1 MiB of text in a few KiB
    assert 2 * MiB < disk.wire.bytes < 2 * MiB + 128 << 10
    assert 2 * MiB < stats.bytes_on_wire < 2 * MiB + 64 << 10  # type: ignore[attr-defined]
    assert stats.bytes_read == 3 * MiB  # type: ignore[attr-defined]


def test_requests_in_flight_are_bounded_by_depth(certs: Path) -> None:
    """With depth d, a connection has at most d requests outstanding (the engine reads them in order)."""
    src = MemSource(disk_bytes())
    seen: list[int] = []
    with serving(certs, src) as (srv, _):
        disk = RemoteSourceDisk(peer(srv), "d0", tls(certs, "dst"), in_flight=3)
        real = disk.connect

        def watched() -> object:
            r = real()
            pre = r.prefetch

            def prefetch(o: int, n: int) -> None:
                pre(o, n)
                seen.append(len(r.pending))

            r.prefetch = prefetch  # type: ignore[method-assign]
            return r

        disk.connect = watched  # type: ignore[method-assign]
        dst, _ = copy(disk, connections=1)
    assert dst.buf == src.buf
    assert max(seen) == 3


def test_an_incremental_change_list_and_lost_tracking_cross_the_link(certs: Path) -> None:
    src = MemSource(disk_bytes())
    with serving(certs, src) as (srv, _):
        disk = RemoteSourceDisk(peer(srv), "d0", tls(certs, "dst"))
        assert max(e.end for e in disk.extents("half")) == SIZE // 2
        assert [e.offset for e in disk.extents(None, start=5 * MiB + 1)][0] == 5 * MiB + 1
        with pytest.raises(ChangeTrackingLost, match="bitmap b1 is gone"):
            list(disk.extents("lost"))
        # the same server goes on serving after an error
        assert disk.size == SIZE and len(list(disk.extents(None))) == SIZE // CHUNK


def test_a_server_certificate_for_another_host_is_refused(certs: Path) -> None:
    with serving(certs, MemSource(disk_bytes()), host="other") as (srv, asked):
        with pytest.raises(NotAllowed) as e:
            RemoteSourceDisk(peer(srv, host="src"), "d0", tls(certs, "dst"))
    assert str(e.value) == (
        f"source agent host-src at 127.0.0.1:{srv.address[1]}: its certificate is for host other, not src"
    )
    assert asked == []  # nothing was asked of the wrong agent


def test_a_client_agent_that_is_not_the_exports_target_is_refused(certs: Path) -> None:
    with serving(certs, MemSource(disk_bytes())) as (srv, _):
        with pytest.raises(NotAllowed, match="agent host-other is not the target of export job1/s1"):
            RemoteSourceDisk(peer(srv), "d0", tls(certs, "other"))
        with pytest.raises(NotAllowed, match="wrong token"):
            RemoteSourceDisk(peer(srv, token="guess"), "d0", tls(certs, "dst"))
        with pytest.raises(ResourceNotFound, match="not exported"):
            RemoteSourceDisk(peer(srv, export="job1/s2"), "d0", tls(certs, "dst"))


def test_expired_and_foreign_certificates_are_refused_in_one_line(certs: Path, tmp_path: Path) -> None:
    src = MemSource(disk_bytes())
    with serving(certs, src, host="old") as (srv, asked):  # the server's certificate expired
        with pytest.raises(NotAllowed) as e:
            RemoteSourceDisk(peer(srv, host="old"), "d0", tls(certs, "dst"))
        assert "source agent host-old at 127.0.0.1:" in str(e.value)
        assert str(e.value).endswith("TLS refused: its certificate has expired")
    with serving(certs, src) as (srv, asked):  # the client's certificate expired: the server refuses
        with pytest.raises((NotAllowed, ResourceUnavailable)) as e2:
            RemoteSourceDisk(peer(srv), "d0", tls(certs, "old"))
        assert f"source agent host-src at 127.0.0.1:{srv.address[1]}" in str(e2.value)
        foreign = tls(
            certs.parent / next(p.name for p in certs.parent.iterdir() if p.name.startswith("foreign")), "dst"
        )
        with pytest.raises((NotAllowed, ResourceUnavailable)) as e3:
            RemoteSourceDisk(peer(srv), "d0", foreign)
        assert "\n" not in str(e3.value)
        assert asked == []  # neither got as far as asking for a disk
    assert src.readers == 0


def test_an_unreachable_peer_is_named_in_one_line(certs: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = Peer(address=f"127.0.0.1:{port}", host_id="src", export="job1/s1", token=TOKEN)
    with pytest.raises(ResourceUnavailable) as e:
        RemoteSourceDisk(p, "d0", tls(certs, "dst"))
    assert str(e.value) == f"source agent host-src at 127.0.0.1:{port} is unreachable: connection refused"


def test_a_plaintext_client_learns_nothing(certs: Path) -> None:
    with serving(certs, MemSource(disk_bytes())) as (srv, asked):
        with socket.create_connection(("127.0.0.1", srv.address[1])) as c:
            c.sendall(b"\x00\x00\x00\x02{}")
            c.settimeout(5)
            try:
                got = c.recv(100)
            except ConnectionResetError:
                got = b""
    assert b"ok" not in got and asked == []


def test_a_released_snapshot_ends_the_connections_reading_it(certs: Path) -> None:
    src = MemSource(disk_bytes())
    with serving(certs, src) as (srv, _):
        disk = RemoteSourceDisk(peer(srv), "d0", tls(certs, "dst"))
        r = disk.connect()
        assert r.read(0, CHUNK) == bytes(src.buf[:CHUNK])
        srv.drop("job1/s1/")  # the snapshot is being released under a reader
        with pytest.raises(
            DataPathError, match=f"source agent host-src at 127.0.0.1:{srv.address[1]}: read at"
        ):
            for i in range(1, 8):
                r.read(i * CHUNK, CHUNK)


def test_an_allocated_chunk_of_zeros_crosses_as_five_bytes(certs: Path) -> None:
    """Data the source lists as data but that reads as zeros (an allocated, zeroed range): the server
    says "zero" and sends no payload."""
    src = MemSource(disk_bytes())
    with serving(certs, src) as (srv, _):
        disk = RemoteSourceDisk(peer(srv), "d0", tls(certs, "dst"))
        r = disk.connect()
        assert r.read(3 * MiB, CHUNK) == bytes(CHUNK)  # (3 MiB: zeros)
        assert r.last_wire == 5
        assert r.read(0, CHUNK) == bytes(src.buf[:CHUNK]) and r.last_wire == 5 + CHUNK
        r.close()
