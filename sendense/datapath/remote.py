"""Disk data across a site link: a source disk served by one agent, read by another over mutual TLS.

When a sync's source and target are served by different agents (different hosts, often different
sites), the target's agent runs the copy and pulls the source's blocks from the source's agent:

    target agent (copy engine, writer, resume tokens)  --TLS-->  source agent (DiskServer -> SourceDisk)

Why the target pulls: the writer, its checkpoints and its resume tokens stay on the side that commits
the point, so a link cut or a killed agent resumes where the writes are; no write to the replica is ever
in flight across the WAN; only the source's agent listens (one port per agent).

Every connection is TLS 1.3 with certificates of the deployment's CA on both ends (`sendense certs
agent`). An agent's certificate names its host id as the URI `sendense://host/<id>`: the client checks
that the server is the agent the workflow named (not merely some agent of the deployment), the server
checks that the client is the agent the export was made for. The export id and a per-export token
(carried by the workflow's encrypted payloads, never logged) name what may be read.

Protocol (all integers big-endian). The client opens a connection and sends one hello (a frame: u32
length + JSON); the server answers with a JSON frame {"ok": true, "size": .., "tracks_resize": ..} or
{"ok": false, "kind": .., "message": ..}. Then, by the hello's "op":
- "extents": the server streams batches of (u64 offset, u64 length, u8 zero) records, each batch a
  u32 count followed by the records; count 0 ends the stream, count 0xFFFFFFFF is followed by an error
  frame (the source's error, e.g. ChangeTrackingLost, re-raised as such on the client);
- "read" (with "dscp": the job's class, set on the data the server sends, for the WAN's QoS): the
  client sends requests (u64 offset, u32 length; length 0 = goodbye) without waiting,
  several in flight; the server answers each in order with (u8 flag, u32 payload length, payload):
  flag 0 raw bytes, 1 zstd frame, 2 all zero (no payload), 3 error frame. Zero chunks never cross the
  link; with compression on, a chunk whose zstd frame is not smaller than 90% of it goes raw, and after
  8 such chunks in a row the server stops trying for the next 64 (random data costs no CPU for long).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from sendense.datapath.extents import Extent
from sendense.errors import DataPathError, NotAllowed, ResourceUnavailable, SendenseError
from sendense.protocols import SourceDisk

log = logging.getLogger(__name__)

HOST_URI = "sendense://host/"
VERSION = 1
_U32 = struct.Struct(">I")
_REQ = struct.Struct(">QI")
_REPLY = struct.Struct(">BI")
_EXT = struct.Struct(">QQB")
RAW, ZSTD, ZERO, ERROR = 0, 1, 2, 3
END, FAILED = 0, 0xFFFFFFFF
BATCH = 4096  # extents per batch
MAX_FRAME = 1 << 20  # a JSON frame (hello, answer, error)
MAX_CHUNK = 64 << 20
HANDSHAKE_TIMEOUT = 15.0
IO_TIMEOUT = 120.0  # no byte for this long: the peer or the link is gone (a short cut is ridden out)
LINGER = 20.0  # an opened source disk stays open this long after its last connection


def host_uri(host_id: str) -> str:
    return f"{HOST_URI}{host_id}"


# ------------------------------------------------------------------------------ TLS


@dataclass(frozen=True)
class AgentTls:
    """This agent's certificate and key and the deployment's CA, for data connections."""

    cert: Path
    key: Path
    ca: Path
    where: str = "SENDENSE_AGENT_CERT/KEY/CA"  # what to check, in errors

    def context(self, server: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the peer's host id (URI SAN) is checked after the handshake
        ctx.verify_mode = ssl.CERT_REQUIRED
        for p in (self.cert, self.key, self.ca):
            if not p.is_file():
                raise NotAllowed(f"agent TLS: {p} does not exist (check {self.where})")
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(cafile=str(self.ca))
        except (ssl.SSLError, OSError) as e:
            raise NotAllowed(f"agent TLS: {self.cert} / {self.key} / {self.ca}: {_ssl_reason(e)}") from None
        return ctx


def peer_host(sock: ssl.SSLSocket) -> str | None:
    """The host id the peer's (verified) certificate names, or None."""
    cert = sock.getpeercert() or {}
    sans: Any = cert.get("subjectAltName", ())
    for kind, value in sans:
        if kind == "URI" and isinstance(value, str) and value.startswith(HOST_URI):
            return value[len(HOST_URI) :]
    return None


def _ssl_reason(e: BaseException) -> str:
    text = str(e).lower()
    for needle, reason in (
        ("certificate has expired", "its certificate has expired"),
        ("sslv3_alert_certificate_expired", "it refused this agent's certificate as expired"),
        ("certificate_expired", "it refused this agent's certificate as expired"),
        ("unknown ca", "it does not trust this agent's certificate (another CA)"),
        ("tlsv1_alert_unknown_ca", "it does not trust this agent's certificate (another CA)"),
        ("unable to get local issuer", "its certificate is not signed by this deployment's CA"),
        ("self-signed", "its certificate is not signed by this deployment's CA"),
        ("self signed", "its certificate is not signed by this deployment's CA"),
        ("certificate verify failed", "its certificate is not trusted"),
        ("certificate required", "it requires a client certificate"),
        ("bad certificate", "it refused this agent's certificate"),
        ("key values mismatch", "the key does not match the certificate"),
        ("no such file", "a file is missing"),
        ("pem lib", "not a PEM certificate or key"),
        ("wrong version number", "it does not speak TLS"),
    ):
        if needle in text:
            return reason
    return " ".join(str(e).split())[:160] or type(e).__name__


# ------------------------------------------------------------------------------ framing


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by the peer")
        got += k
    return buf


def _send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_U32.pack(len(data)) + data)


def _recv_frame(sock: socket.socket) -> dict[str, Any]:
    (n,) = _U32.unpack(_recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ConnectionError(f"a frame of {n} bytes (at most {MAX_FRAME})")
    obj = json.loads(bytes(_recv_exact(sock, n)))
    if not isinstance(obj, dict):
        raise ConnectionError("a frame that is not an object")
    return obj


def _error_frame(e: BaseException) -> dict[str, Any]:
    if isinstance(e, SendenseError):
        return {"ok": False, "kind": e.kind, "message": e.message, "retryable": e.retryable}
    return {"ok": False, "kind": "DataPathError", "message": f"source agent: {e}", "retryable": True}


def _raise_remote(frame: dict[str, Any], peer: str) -> None:
    kind = str(frame.get("kind") or "DataPathError")
    message = str(frame.get("message") or "failed")
    cls: type[SendenseError] = DataPathError
    for c in _subclasses(SendenseError):
        if c.kind == kind:
            cls = c
            break
    raise cls(message if kind != "DataPathError" else f"{peer}: {message}", retryable=frame.get("retryable"))


def _subclasses(c: type[SendenseError]) -> Iterator[type[SendenseError]]:
    for s in c.__subclasses__():
        yield s
        yield from _subclasses(s)


# ------------------------------------------------------------------------------ client


@dataclass(frozen=True)
class Peer:
    """Where a source disk is served: the source agent's address and host id, and the export."""

    address: str  # host:port
    host_id: str
    export: str
    token: str

    def describe(self) -> str:
        return f"source agent host-{self.host_id} at {self.address}"


@dataclass
class WireCounter:
    """Bytes that crossed the link for one disk (payload and headers), from every connection."""

    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n


def _connect(peer: Peer, tls: AgentTls, timeout: float) -> ssl.SSLSocket:
    host, _, port = peer.address.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError) as e:
        raise ResourceUnavailable(f"{peer.describe()} is unreachable: {_os_reason(e)}") from None
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = tls.context(server=False).wrap_socket(raw, server_hostname=None)
    except NotAllowed:
        raw.close()
        raise
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:  # closed mid-handshake: the peer or the path
        raw.close()
        raise ResourceUnavailable(
            f"{peer.describe()}: closed during the TLS handshake ({_os_reason(e)})"
        ) from None
    except ssl.SSLError as e:
        raw.close()
        raise NotAllowed(f"{peer.describe()}: TLS refused: {_ssl_reason(e)}") from None
    except OSError as e:
        raw.close()
        raise ResourceUnavailable(f"{peer.describe()}: TLS handshake failed: {_os_reason(e)}") from None
    got = peer_host(s)
    if got != peer.host_id:
        s.close()
        raise NotAllowed(
            f"{peer.describe()}: its certificate is for "
            + (f"host {got}" if got else "no agent host id")
            + f", not {peer.host_id}"
        )
    s.settimeout(IO_TIMEOUT)
    return s


def _os_reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return " ".join(str(e).split())[:120] or type(e).__name__


class RemoteSourceDisk:
    """A SourceDisk read from another agent: `extents` and `connect` as a local disk's, over the link.
    `compress`: ask for zstd frames (the server still sends raw what does not compress)."""

    def __init__(
        self,
        peer: Peer,
        key: str,
        tls: AgentTls,
        *,
        compress: bool = False,
        in_flight: int = 4,
        timeout: float = 30.0,
        dscp: int = 0,
    ) -> None:
        self.peer, self.key, self.tls, self.dscp = peer, key, tls, dscp
        self.compress, self.in_flight, self.timeout = compress, max(1, in_flight), timeout
        self.wire = WireCounter()
        s, info = self._open("info")
        s.close()
        self.size: int = int(info["size"])
        self.tracks_resize: bool = bool(info.get("tracks_resize", False))

    def _open(self, op: str, **args: Any) -> tuple[ssl.SSLSocket, dict[str, Any]]:
        s = _connect(self.peer, self.tls, self.timeout)
        try:
            hello = {"v": VERSION, "op": op, "export": self.peer.export, "token": self.peer.token}
            _send_frame(s, {**hello, "disk": self.key, **args})
            answer = _recv_frame(s)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            # TLS 1.3: the server checks this agent's certificate after the handshake; a close without
            # an alert may be that, or the peer going away: retried, and said so
            s.close()
            raise ResourceUnavailable(
                f"{self.peer.describe()}: closed the connection at once "
                "(its log says why: it may not trust this agent's certificate)"
            ) from None
        except ssl.SSLError as e:  # an alert: the server refused this agent's certificate
            s.close()
            raise NotAllowed(f"{self.peer.describe()}: TLS refused: {_ssl_reason(e)}") from None
        except (OSError, ValueError) as e:
            s.close()
            raise DataPathError(f"{self.peer.describe()}: {_os_reason(e)}") from None
        if not answer.get("ok"):
            s.close()
            _raise_remote(answer, self.peer.describe())
        return s, answer

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        s, _ = self._open("extents", since=since, start=start)
        try:
            while True:
                try:
                    (n,) = _U32.unpack(_recv_exact(s, 4))
                    if n == FAILED:
                        _raise_remote(_recv_frame(s), self.peer.describe())
                    if n == END:
                        return
                    if n > BATCH:
                        raise ConnectionError(f"a batch of {n} extents")
                    data = _recv_exact(s, n * _EXT.size)
                except (OSError, ValueError) as e:
                    raise DataPathError(f"{self.peer.describe()}: extents: {_os_reason(e)}") from None
                self.wire.add(4 + len(data))
                for off, length, zero in _EXT.iter_unpack(data):
                    yield Extent(off, length, zero=bool(zero))
        finally:
            s.close()

    def connect(self) -> RemoteReader:
        s, _ = self._open("read", compress="zstd" if self.compress else None, dscp=self.dscp)
        return RemoteReader(s, self.peer.describe(), self.wire, self.in_flight)


class RemoteReader:
    """The copy engine's BlockReader over the link, with `depth` requests in flight: the engine
    announces the chunks it will read (`prefetch`), then reads them in that order."""

    def __init__(self, sock: ssl.SSLSocket, label: str, wire: WireCounter, depth: int) -> None:
        self.sock, self.label, self.counter, self.depth = sock, label, wire, depth
        self.pending: deque[tuple[int, int]] = deque()
        self.dctx = zstandard.ZstdDecompressor()
        self.last_wire = 0  # what the last read cost on the link (the engine's bytes_on_wire)

    def prefetch(self, offset: int, length: int) -> None:
        try:
            self.sock.sendall(_REQ.pack(offset, length))
        except OSError as e:
            raise DataPathError(f"{self.label}: {_os_reason(e)}") from None
        self.pending.append((offset, length))

    def read(self, offset: int, length: int) -> bytes:
        if not self.pending:
            self.prefetch(offset, length)
        want = self.pending.popleft()
        if want != (offset, length):
            raise DataPathError(f"{self.label}: read {offset}+{length} out of order (expected {want})")
        try:
            flag, n = _REPLY.unpack(_recv_exact(self.sock, _REPLY.size))
            if n > MAX_CHUNK + 1024:
                raise ConnectionError(f"a reply of {n} bytes")
            payload = bytes(_recv_exact(self.sock, n)) if n else b""
        except (OSError, ValueError) as e:
            raise DataPathError(f"{self.label}: read at {offset}: {_os_reason(e)}") from None
        self.last_wire = _REPLY.size + n
        self.counter.add(self.last_wire)
        if flag == RAW:
            data = payload
        elif flag == ZERO:
            return bytes(length)
        elif flag == ZSTD:
            try:
                data = self.dctx.decompress(payload, max_output_size=length)
            except zstandard.ZstdError as e:
                raise DataPathError(f"{self.label}: a corrupt compressed chunk at {offset}: {e}") from None
        elif flag == ERROR:
            _raise_remote(json.loads(payload), self.label)
        else:
            raise DataPathError(f"{self.label}: unknown reply flag {flag}")
        if len(data) != length:
            raise DataPathError(f"{self.label}: {len(data)} bytes at {offset}, {length} asked")
        return data

    def wire(self) -> None:
        return None

    def close(self) -> None:
        try:
            self.sock.settimeout(2)
            self.sock.sendall(_REQ.pack(0, 0))
        except OSError:
            pass
        self.sock.close()


# ------------------------------------------------------------------------------ server

Opener = Callable[[], AbstractContextManager[SourceDisk]]


@dataclass
class Hello:
    op: str
    export: str
    token: str
    disk: str
    args: dict[str, Any]


# Authorize a hello from the agent `peer` (its certificate's host id): return (a key naming the disk
# for the cache of opened disks, how to open it), or raise NotAllowed / ResourceNotFound.
Authorize = Callable[[Hello, str], tuple[str, Opener]]


class _Opened:
    def __init__(self, key: str, opener: Opener) -> None:
        self.key, self.users = key, 0
        self.stack = ExitStack()
        self.disk: SourceDisk = self.stack.enter_context(opener())
        self.lock = threading.Lock()  # one extents stream at a time (a disk's status connection)
        self.idle_since = time.monotonic()
        self.socks: set[socket.socket] = set()  # the connections reading it (shut when it is dropped)


class DiskServer:
    """Serves source disks to other agents over mutual TLS (one thread per connection)."""

    def __init__(
        self, listen: tuple[str, int], tls: AgentTls, authorize: Authorize, *, linger: float = LINGER
    ):
        self.tls, self.authorize, self.linger = tls, authorize, linger
        self.ctx = tls.context(server=True)
        self.sock = socket.create_server(listen, family=_family(listen[0]), reuse_port=False)
        self.address = self.sock.getsockname()[:2]
        self._opened: dict[str, _Opened] = {}
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="disk-server")
        self._reaper = threading.Thread(target=self._reap, daemon=True, name="disk-server-reaper")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-opener")

    def start(self) -> DiskServer:
        self._thread.start()
        self._reaper.start()
        log.info("serving source disks to other agents on %s:%d", *self.address)
        return self

    def close(self) -> None:
        self._closed.set()
        _shut(self.sock)  # (wakes the accept; a close alone does not)
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _shut(c)
        self._thread.join(timeout=5)
        self.drop("")
        self._pool.shutdown(wait=False)

    def __enter__(self) -> DiskServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop(self, prefix: str) -> None:
        """Close the opened disks whose key starts with `prefix` ("" all), and their connections'
        reads fail: the snapshot they read is being released."""
        with self._lock:
            gone = [o for k, o in self._opened.items() if k.startswith(prefix)]
            for o in gone:
                del self._opened[o.key]
        for o in gone:
            for c in list(o.socks):
                _shut(c)
            _close_quietly(o.stack)

    def _reap(self) -> None:
        while not self._closed.wait(1.0):
            now = time.monotonic()
            with self._lock:
                idle = [o for o in self._opened.values() if o.users == 0 and now - o.idle_since > self.linger]
                for o in idle:
                    del self._opened[o.key]
            for o in idle:
                _close_quietly(o.stack)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True, name="disk-conn").start()

    def _serve(self, raw: socket.socket, addr: Any) -> None:
        with self._lock:
            self._conns.add(raw)
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                s = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.warning("data connection from %s refused: %s", addr[0], _ssl_reason(e))
                return
            with self._lock:
                self._conns.add(s)
            try:
                self._session(s, addr)
            finally:
                with self._lock:
                    self._conns.discard(s)
                s.close()
        except (OSError, ValueError) as e:
            log.debug("data connection from %s: %s", addr[0], e)
        finally:
            with self._lock:
                self._conns.discard(raw)
            raw.close()

    def _session(self, s: ssl.SSLSocket, addr: Any) -> None:
        """One connection: its hello checked, then the extents or reads it asks for."""
        peer = peer_host(s)
        frame = _recv_frame(s)
        try:
            if peer is None:
                raise NotAllowed(f"agent at {addr[0]}: its certificate names no agent host id")
            if frame.get("v") != VERSION:
                raise NotAllowed(
                    f"agent host-{peer}: protocol version {frame.get('v')} (this agent: {VERSION})"
                )
            hello = Hello(
                op=str(frame.get("op")),
                export=str(frame.get("export")),
                token=str(frame.get("token")),
                disk=str(frame.get("disk")),
                args=frame,
            )
            key, opener = self.authorize(hello, peer)
            opened = self._acquire(key, opener, s)
        except SendenseError as e:
            log.warning("data connection from agent host-%s at %s refused: %s", peer, addr[0], e.message)
            _send_frame(s, _error_frame(e))
            return
        except Exception as e:  # noqa: BLE001 - the peer hears it; the agent goes on
            log.exception("opening a source disk for host-%s failed", peer)
            _send_frame(s, _error_frame(e))
            return
        try:
            s.settimeout(IO_TIMEOUT)
            _send_frame(s, {"ok": True, "size": opened.disk.size, "tracks_resize": opened.disk.tracks_resize})
            if hello.op == "extents":
                self._extents(s, opened, hello)
            elif hello.op == "read":
                _mark(s, hello.args.get("dscp"))
                self._reads(s, opened, hello.args.get("compress") == "zstd")
        finally:
            with self._lock:
                opened.users -= 1
                opened.socks.discard(s)
                opened.idle_since = time.monotonic()

    def _acquire(self, key: str, opener: Opener, s: socket.socket) -> _Opened:
        with self._lock:
            o = self._opened.get(key)
            if o is not None:
                o.users += 1
                o.socks.add(s)
                return o
        # outside the lock (opening may take seconds), on the server's own long-lived thread: a helper
        # process (qemu-nbd) dies with the thread that started it (PR_SET_PDEATHSIG), not with ours
        new = self._pool.submit(_Opened, key, opener).result()
        with self._lock:
            o = self._opened.get(key)
            if o is None:
                self._opened[key] = o = new
                new = None  # type: ignore[assignment]
            o.users += 1
            o.socks.add(s)
        if new is not None:
            _close_quietly(new.stack)
        return o

    def _extents(self, s: ssl.SSLSocket, opened: _Opened, hello: Hello) -> None:
        since = hello.args.get("since")
        start = int(hello.args.get("start") or 0)
        batch: list[bytes] = []
        with opened.lock:
            try:
                for e in opened.disk.extents(None if since is None else str(since), start):
                    batch.append(_EXT.pack(e.offset, e.length, 1 if e.zero else 0))
                    if len(batch) >= BATCH:
                        s.sendall(_U32.pack(len(batch)) + b"".join(batch))
                        batch = []
            except Exception as e:  # noqa: BLE001 - the reader hears it (ChangeTrackingLost, I/O errors)
                if not isinstance(e, SendenseError):
                    log.exception("listing the extents of %s failed", opened.key)
                if batch:
                    s.sendall(_U32.pack(len(batch)) + b"".join(batch))
                s.sendall(_U32.pack(FAILED))
                _send_frame(s, _error_frame(e))
                return
        if batch:
            s.sendall(_U32.pack(len(batch)) + b"".join(batch))
        s.sendall(_U32.pack(END))

    def _reads(self, s: ssl.SSLSocket, opened: _Opened, compress: bool) -> None:
        reader = opened.disk.connect()
        cctx = zstandard.ZstdCompressor(level=1) if compress else None
        incompressible, skip = 0, 0
        zeros = b""
        try:
            while True:
                offset, length = _REQ.unpack(_recv_exact(s, _REQ.size))
                if length == 0:
                    return
                if length > MAX_CHUNK or offset + length > opened.disk.size:
                    err = DataPathError(f"a read of {length} bytes at {offset} (disk of {opened.disk.size})")
                    payload = json.dumps(_error_frame(err)).encode()
                    s.sendall(_REPLY.pack(ERROR, len(payload)) + payload)
                    return
                try:
                    data = reader.read(offset, length)
                except Exception as e:  # noqa: BLE001 - the reader hears it
                    payload = json.dumps(_error_frame(e)).encode()
                    s.sendall(_REPLY.pack(ERROR, len(payload)) + payload)
                    return
                if len(zeros) != length:
                    zeros = bytes(length)
                if data == zeros:
                    s.sendall(_REPLY.pack(ZERO, 0))
                    continue
                if cctx is not None and skip == 0:
                    packed = cctx.compress(data)
                    if len(packed) < len(data) * 0.9:
                        incompressible = 0
                        s.sendall(_REPLY.pack(ZSTD, len(packed)))
                        s.sendall(packed)
                        continue
                    incompressible += 1
                    if incompressible >= 8:
                        incompressible, skip = 0, 64
                elif skip:
                    skip -= 1
                s.sendall(_REPLY.pack(RAW, len(data)))
                s.sendall(data)
        finally:
            try:
                reader.close()
            except Exception:  # noqa: BLE001
                log.debug("close failed", exc_info=True)


def _mark(s: socket.socket, dscp: object) -> None:
    """DSCP on the data a connection sends (the job's priority class, for the WAN's own QoS)."""
    if not isinstance(dscp, int) or not 0 < dscp < 64:
        return
    try:
        if s.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, dscp << 2)
        else:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp << 2)
    except OSError:
        log.debug("DSCP %d not set", dscp, exc_info=True)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close_quietly(stack: ExitStack) -> None:
    try:
        stack.close()
    except Exception:  # noqa: BLE001
        log.warning("closing a served source disk failed", exc_info=True)
