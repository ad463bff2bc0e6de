"""A lab VM: a real QEMU with qcow2 disks and no guest, written to like a guest would.

`LabVm` starts `qemu-system-x86_64 -S -nodefaults -machine pc -accel tcg -display none` (paused, no
guest OS: nothing but the lab writes to the disks) with each disk as a `-blockdev` file + format pair
(`diskN-file`, `diskN`; qcow2 unless `formats` says raw) behind `virtio-blk-pci` device `vdN`, or,
with `drive=True`, as `-drive file=IMG,format=FMT,if=virtio` (drive `virtioN`, automatic node names
such as `#block113`, as a hand-started VM has them); `discard=True` opens them with `discard=unmap`, so
that a guest discard (`qemu_io(n, "discard ...")`) reaches the image (QEMU's default ignores it: the
bytes stay and no dirty bitmap sees it). Guest-like writes go through the device's block
backend with HMP `qemu-io -d /machine/peripheral/vdN/virtio-backend "write ..."` (`qemu-io virtioN`
for drives), so dirty bitmaps, copy-before-write filters and resizes see them exactly as guest I/O.

`swap(i, j)` (VM stopped) exchanges which image files devices i and j get at the next start: the
disks swapped behind their node names, as a VM restarted with its disks in another order; shadows
follow the images.

Two QMP monitors: `qmp_path` for the code under test (a monitor serves one client at a time) and a
private one the lab uses for its writes, so a `Workload` can write while a source talks to QEMU.

With `shadow=True` every write is also applied to a sparse raw file per disk (`shadow_path(n)`): the
bytes the guest wrote, to compare replicas against. Take `snapshot_shadow` inside `frozen()` (which
holds writes back) at the moment that matters, e.g. around a source's `create_snapshot`.

QEMU runs as a child process that gets SIGKILL if the thread that started it dies (PDEATHSIG), and
writes a `-pidfile`; `stop()` quits over QMP (persistent bitmaps are stored), `kill()` simulates a
crash. Unix socket paths must stay under 108 bytes: use a short directory (e.g. under /tmp).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sendense.errors import SendenseError
from tools.qemu import die_with_parent, fits_unix_socket, qemu_img, tool
from tools.qmp import QmpClient, QmpError, VmNotRunning


class LabVm:
    def __init__(
        self,
        directory: Path,
        sizes: Sequence[int],
        *,
        name: str = "labvm",
        shadow: bool = False,
        cluster_size: int = 64 << 10,
        detached: bool = False,
        formats: Sequence[str] | None = None,
        drive: bool = False,
        discard: bool = False,
    ) -> None:
        self.dir = Path(directory)
        self.sizes = list(sizes)  # per image file
        self.formats = list(formats) if formats is not None else ["qcow2"] * len(self.sizes)
        self.drive = drive
        self.discard = discard  # guest discards unmap (QEMU's discard=unmap); default: ignored
        self.order = list(range(len(self.sizes)))  # device i uses image order[i]
        self.name = name
        self.shadow = shadow
        self.cluster_size = cluster_size
        self.detached = detached  # outlives this process (the demo's VM); stop it with stop_detached()
        self.qmp_path = self.dir / "qmp.sock"
        self.lab_qmp_path = self.dir / "lab.sock"
        self.pidfile = self.dir / "qemu.pid"
        self.log = self.dir / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.monitor: QmpClient | None = None
        self._lock = threading.RLock()  # one write at a time; shadow and disk change together
        if not fits_unix_socket(self.qmp_path):
            raise ValueError(f"lab VM directory {self.dir} is too long for a unix socket path")
        if "," in str(self.dir):
            raise ValueError(f"lab VM directory {self.dir}: commas would break QEMU's option syntax")

    # ------------------------------------------------------------------ files

    def disk_path(self, disk: int) -> Path:
        """Image file `disk` (device `disk` uses it unless swapped: `image_of`)."""
        return self.dir / f"disk{disk}.{'img' if self.formats[disk] == 'raw' else 'qcow2'}"

    def image_of(self, device: int) -> Path:
        return self.disk_path(self.order[device])

    def shadow_path(self, disk: int) -> Path:
        return self.dir / f"disk{disk}.shadow.raw"

    def node(self, disk: int) -> str:
        return f"disk{disk}"

    def device(self, disk: int) -> str:
        """The block backend guest I/O goes through: a qdev path, or the drive's name (`virtioN`)."""
        return f"virtio{disk}" if self.drive else f"/machine/peripheral/vd{disk}/virtio-backend"

    def swap(self, a: int, b: int) -> None:
        """Devices a and b get each other's image at the next start."""
        if self.running:
            raise SendenseError(f"lab VM {self.name}: stop it before swapping disks")
        self.order[a], self.order[b] = self.order[b], self.order[a]

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> LabVm:
        """Create missing disks (and shadows) and start QEMU; existing disks are reused, so a stopped or
        killed VM can be started again on the same images."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(self.sizes):
            if not self.disk_path(i).exists():
                fmt = self.formats[i]
                opts = ["-o", f"cluster_size={self.cluster_size}"] if fmt == "qcow2" else []
                qemu_img("create", "-q", "-f", fmt, *opts, str(self.disk_path(i)), str(size))
            if self.shadow and not self.shadow_path(i).exists():
                with open(self.shadow_path(i), "wb") as f:
                    f.truncate(size)
        for p in (self.qmp_path, self.lab_qmp_path, self.pidfile):
            p.unlink(missing_ok=True)
        cmd = [tool("qemu-system-x86_64"), *"-S -nodefaults -machine pc -accel tcg -display none".split()]
        cmd += ["-name", self.name, "-pidfile", str(self.pidfile)]
        for sock in (self.qmp_path, self.lab_qmp_path):
            cmd += ["-qmp", f"unix:{sock},server=on,wait=off"]
        unmap = ",discard=unmap" if self.discard else ""
        for i in range(len(self.sizes)):
            img, fmt = self.image_of(i), self.formats[self.order[i]]
            if self.drive:
                cmd += ["-drive", f"file={img},format={fmt},if=virtio{unmap}"]
                continue
            cmd += ["-blockdev", f"driver=file,filename={img},node-name=disk{i}-file{unmap}"]
            cmd += ["-blockdev", f"driver={fmt},file=disk{i}-file,node-name=disk{i}{unmap}"]
            cmd += ["-device", f"virtio-blk-pci,drive=disk{i},id=vd{i},share-rw=on"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd if self.detached else die_with_parent(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=self.detached,
            )
        deadline = time.monotonic() + 30
        while not (self.qmp_path.exists() and self.lab_qmp_path.exists()):
            if self.proc.poll() is not None:
                err = self.log.read_text(errors="replace").strip().splitlines()
                self.proc = None
                raise SendenseError(f"lab VM {self.name}: qemu exited: {err[-1] if err else 'no output'}")
            if time.monotonic() > deadline:
                self.kill()
                raise SendenseError(f"lab VM {self.name}: qemu did not open its QMP sockets in 30s")
            time.sleep(0.01)
        while True:
            # QEMU binds the socket before it listens: a connect in between is refused
            try:
                self.monitor = QmpClient(self.lab_qmp_path).connect()
                return self
            except VmNotRunning:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def stop(self, timeout: float = 30) -> None:
        """Quit over QMP (QEMU stores persistent bitmaps in the images), then reap the process."""
        if self.proc is None:
            return
        if self.running and self.monitor is not None:
            try:
                self.monitor.execute("quit")
            except SendenseError:
                pass  # QEMU may close the socket before replying
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reset()

    def stop_detached(self, timeout: float = 30) -> bool:
        """Stop a QEMU started by an earlier process (known by its pidfile): quit over QMP, else SIGKILL."""
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            self._reset()
            return False
        try:
            QmpClient(self.lab_qmp_path).connect().execute("quit")
        except SendenseError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        self._reset()
        return True

    def kill(self) -> None:
        """SIGKILL: a host crash as far as the images are concerned (unflushed writes may be lost and
        persistent bitmaps come back inconsistent). Also kills a QEMU known only by its pidfile."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        elif self.pidfile.exists():
            try:
                os.kill(int(self.pidfile.read_text().strip()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
        self._reset()

    def _reset(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        self.monitor, self.proc = None, None
        for p in (self.qmp_path, self.lab_qmp_path, self.pidfile):
            p.unlink(missing_ok=True)

    def __enter__(self) -> LabVm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop(timeout=10)
        finally:
            self.kill()

    # ------------------------------------------------------------------ guest-like I/O

    def _mon(self) -> QmpClient:
        if self.monitor is None or not self.running:
            raise SendenseError(f"lab VM {self.name} is not running")
        return self.monitor

    def qemu_io(self, disk: int, command: str) -> None:
        """Run a qemu-io command on the device's block backend.

        QEMU 7.2 trap: through QMP `human-monitor-command` the qemu-io report ("wrote N/N bytes ...",
        also "write failed: ...") goes to QEMU's stdout, not to the reply; only monitor-level errors
        ("Error: Device ... not found") come back. So an empty reply means success, and callers check
        ranges themselves.
        """
        dev = self.device(disk) if self.drive else f"-d {self.device(disk)}"
        out = self._mon().hmp(f'qemu-io {dev} "{command}"').strip()
        if out and not out.startswith(("wrote", "read")):
            raise SendenseError(f"lab VM {self.name} vd{disk}: qemu-io {command!r}: {out.splitlines()[0]}")

    def write(self, disk: int, offset: int, data_or_pattern: bytes | int, length: int | None = None) -> None:
        """Write `length` bytes of pattern byte `data_or_pattern` (an int), or the given bytes.

        Bytes are written as runs of equal bytes, one `write -P` each (QEMU 7.2's `write -s file` sends
        its report, and every later qemu-io report, to QEMU's stdout instead of the monitor), so keep
        them to a few runs (at most 256).
        """
        if isinstance(data_or_pattern, int):
            if length is None:
                raise ValueError("length is required with a pattern")
            runs = [(offset, length, data_or_pattern)]
        else:
            data = bytes(data_or_pattern)[:length]
            runs = []
            i = 0
            while i < len(data):
                j = i + 1
                while j < len(data) and data[j] == data[i]:
                    j += 1
                runs.append((offset + i, j - i, data[i]))
                i = j
            if len(runs) > 256:
                raise ValueError(f"data has {len(runs)} runs of equal bytes: write patterns instead")
        end = offset + sum(n for _, n, _ in runs)
        if end > self.sizes[self.order[disk]]:
            raise ValueError(
                f"write up to {end} is beyond the end of disk{disk} ({self.sizes[self.order[disk]]} bytes)"
            )
        with self._lock:
            for off, n, byte in runs:
                self.qemu_io(disk, f"write -P 0x{byte:02x} {off} {n}")
                self._shadow_write(disk, off, bytes([byte]) * n)

    def write_zeroes(self, disk: int, offset: int, length: int) -> None:
        """A zero write (`write -z`): zero clusters in qcow2, dirty in bitmaps."""
        size = self.sizes[self.order[disk]]
        if offset + length > size:
            raise ValueError(f"write up to {offset + length} is beyond the end of disk{disk} ({size} bytes)")
        with self._lock:
            self.qemu_io(disk, f"write -z {offset} {length}")
            step = 4 << 20
            for off in range(offset, offset + length, step):
                self._shadow_write(disk, off, bytes(min(step, offset + length - off)))

    def flush(self, disk: int) -> None:
        with self._lock:
            self.qemu_io(disk, "flush")

    def resize(self, disk: int, new_size: int) -> None:
        """Grow (or shrink) a disk online with QMP block_resize."""
        with self._lock:
            where = {"device": self.device(disk)} if self.drive else {"node-name": self.node(disk)}
            self._mon().execute("block_resize", **where, size=new_size)
            self.sizes[self.order[disk]] = new_size
            if self.shadow:
                with open(self.shadow_path(self.order[disk]), "r+b") as f:
                    f.truncate(new_size)

    def _shadow_write(self, disk: int, offset: int, data: bytes) -> None:
        if not self.shadow:
            return
        fd = os.open(self.shadow_path(self.order[disk]), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Hold lab writes back (a running Workload blocks) for the duration of the block."""
        with self._lock:
            yield

    def snapshot_shadow(self, disk: int, dest: Path) -> Path:
        """Copy (sparse) what the guest had written to device `disk` by now."""
        if not self.shadow:
            raise SendenseError(f"lab VM {self.name} was created without shadow=True")
        with self._lock:
            src = self.shadow_path(self.order[disk])
            subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
        return Path(dest)


class Workload:
    """A background thread writing random-pattern blocks through `LabVm.write`.

    `rate`: writes per second (None: as fast as QEMU takes them). Offsets are aligned to
    `block_size` and drawn over each disk's current size; `zero_fraction` of the writes are zero writes.
    """

    def __init__(
        self,
        vm: LabVm,
        *,
        disks: Sequence[int] | None = None,
        block_size: int = 64 << 10,
        rate: float | None = 50.0,
        zero_fraction: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.vm = vm
        self.disks = list(disks) if disks is not None else list(range(len(vm.sizes)))
        self.block_size, self.rate, self.zero_fraction = block_size, rate, zero_fraction
        self.rng = random.Random(seed)
        self.bytes_written = 0
        self.writes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Workload:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lab-workload", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and wait; re-raises the error that stopped the thread, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Workload:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        period = 1.0 / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                disk = self.rng.choice(self.disks)
                blocks = self.vm.sizes[self.vm.order[disk]] // self.block_size
                off = self.rng.randrange(blocks) * self.block_size
                if self.rng.random() < self.zero_fraction:
                    self.vm.write_zeroes(disk, off, self.block_size)
                else:
                    self.vm.write(disk, off, self.rng.randrange(1, 256), self.block_size)
                self.writes += 1
                self.bytes_written += self.block_size
                if period:
                    next_at += period
                    self._stop.wait(max(0.0, next_at - time.monotonic()))
        except (SendenseError, QmpError) as e:
            if not self._stop.is_set():
                self.error = e


__all__ = ["LabVm", "Workload"]
