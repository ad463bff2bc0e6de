"""The vSphere lab's VDDK stand-in (labs/vsphere/vddk_standin.py): real nbdkit, vcsim-lab and qemu-nbd.

nbdkit runs the stand-in with the vddk plugin's command line (only the plugin word swapped); clients are
python3-libnbd and nbdcopy over the unix socket; expected bytes come from the file the lab's endpoint
names (GET /sendense-lab/disk), read with qemu-img/qemu-io.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nbd  # Debian's python3-libnbd (the venv has system site packages; scripts/install.sh)
import pytest
from pyVmomi import vim

from labs.vsphere import VsphereLab

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "labs" / "vsphere" / "vddk_standin.py"
BUILD = ROOT / "labs" / "vsphere" / "build.sh"
MIB = 1 << 20

# (scripts/install.sh installs every one of these: a missing one fails the tests, never skips them)
for tool in ("nbdkit", "qemu-nbd", "qemu-img", "qemu-io", "nbdcopy", "setpriv"):
    assert shutil.which(tool), f"{tool} is not installed: run scripts/install.sh"
assert subprocess.run(["nbdkit", "python", "--version"], capture_output=True).returncode == 0, (
    "nbdkit's python plugin is not installed: run scripts/install.sh"
)


# ---------------------------------------------------------------------------------------------- the lab
@pytest.fixture(scope="module")
def lab() -> Iterator[VsphereLab]:
    with VsphereLab(vms=1) as lab:
        yield lab


class Vm:
    """A powered-off lab VM with one thin 16 MiB disk; `disk()` asks the lab's endpoint about it."""

    def __init__(self, lab: VsphereLab, name: str) -> None:
        self.lab, self.moref = lab, lab.make_vm(name, [16 * MIB])
        self.obj = lab.vm(self.moref)

    def file(self, snapshot=None) -> str:
        config = (snapshot or self.obj).config
        return next(
            d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
        ).backing.fileName

    def disk(self, snapshot=None) -> dict:
        info = self.lab.disk_info(self.moref, self.file(snapshot), snapshot._moId if snapshot else None)
        return {**info, "file": self.file(snapshot)}

    def snapshot(self, name: str):
        return self.lab.wait(
            self.obj.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
        )


@pytest.fixture
def vm(lab: VsphereLab, request: pytest.FixtureRequest) -> Vm:
    return Vm(lab, "vddk-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60])


# ------------------------------------------------------------------------------------------- nbdkit
def _args(
    lab: VsphereLab, vm: Vm, file: str, *, snapshot=None, password_file: Path | None = None, **over
) -> list[str]:
    kv = {
        "libdir": "/opt/vmware-vix-disklib-distrib",
        "server": lab.host,
        "port": str(lab.port),
        "user": lab.user,
        "password": f"+{password_file}" if password_file else lab.password,
        "thumbprint": lab.thumbprint,
        "vm": f"moref={vm.moref}",
        "file": file,
        "transports": "nbdssl:nbd",
    }
    if snapshot is not None:
        kv["snapshot"] = snapshot._moId
    kv.update(over)
    return [f"{k}={v}" for k, v in kv.items() if v is not None]


class Nbdkit:
    def __init__(self, proc: subprocess.Popen, sock: Path, errpath: Path) -> None:
        self.proc, self.sock, self.errpath = proc, sock, errpath

    @property
    def stderr(self) -> str:
        return self.errpath.read_text()

    def connect(self):
        # nbdkit binds the socket before it listens: ECONNREFUSED for a moment after the file appears
        deadline = time.monotonic() + 10
        while True:
            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            try:
                h.connect_unix(str(self.sock))
                return h
            except nbd.Error as e:
                if e.errno != "ECONNREFUSED" or time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
            time.sleep(0.01)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


@contextlib.contextmanager
def nbdkit(
    tmp_path: Path,
    args: list[str],
    *,
    readonly: bool = False,
    stdin: bytes | None = None,
    pass_fds: tuple[int, ...] = (),
) -> Iterator[Nbdkit]:
    """`nbdkit -U SOCK --exit-with-parent [-r] python STANDIN args...`, the production command line."""
    n = len(list(tmp_path.glob("nbdkit-*.stderr")))
    sock = tmp_path / f"nbdkit-{n}.sock"
    errpath = tmp_path / f"nbdkit-{n}.stderr"
    tmpdir = tmp_path / "tmp"  # the stand-in's private temp dirs go here (checked empty afterwards)
    tmpdir.mkdir(exist_ok=True)
    cmd = [
        "nbdkit",
        "-U",
        str(sock),
        "--exit-with-parent",
        *(["-r"] if readonly else []),
        "python",
        str(STANDIN),
        *args,
    ]
    with errpath.open("w") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "TMPDIR": str(tmpdir)},
            pass_fds=pass_fds,
        )
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, errpath.read_text()
            assert time.monotonic() < deadline, "nbdkit did not create its socket"
            time.sleep(0.01)
        yield Nbdkit(proc, sock, errpath)
    except BaseException:
        proc.kill()  # the test failed: a client may still be connected
        raise
    finally:
        if proc.poll() is None:
            proc.terminate()  # nbdkit 1.32 waits for connected clients to leave before it exits
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("nbdkit did not exit on SIGTERM (a client left connected?)") from None


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def _qemu_nbd_children(pid: int) -> list[int]:
    pids = []
    for child in _children(pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "qemu-nbd":
                pids.append(child)
    return pids


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line]


def _qemu_io_write(path: str, pattern: int, offset: int, length: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "vmdk", "-c", f"write -P {pattern} {offset} {length}", path],
        check=True,
        capture_output=True,
    )


def _qemu_io_reads(path: str, pattern: int, offset: int, length: int) -> bool:
    out = subprocess.run(
        ["qemu-io", "-r", "-U", "-f", "vmdk", "-c", f"read -P {pattern} {offset} {length}", path],
        capture_output=True,
        text=True,
    )
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout


# ---------------------------------------------------------------------------------- parameter errors
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["server=127.0.0.1", "user=u", "password=p", "thumbprint=AA:BB", "vm=moref=vm-1"],
            "you must supply the file=<FILENAME> parameter",
        ),
        (
            ["server=127.0.0.1", "user=u", "password=p", "vm=moref=vm-1", "file=[ds] a/a.vmdk"],
            "missing parameter: thumbprint",
        ),
        (
            ["server=127.0.0.1", "user=u", "password=p", "thumbprint=AA:BB", "vm=vm-1", "file=[ds] a/a.vmdk"],
            "vm: expected moref=",
        ),
        (["file=[ds] a/a.vmdk", "transports=nbdssl:nfs"], "unknown transport mode 'nfs'"),
        (["file=[ds] a/a.vmdk", "bogus=1"], "unknown parameter 'bogus'"),
        (
            [
                "file=[ds] a/a.vmdk",
                "server=h",
                "user=u",
                "password=+/nonexistent/pw",
                "thumbprint=AA",
                "vm=moref=vm-1",
            ],
            "open /nonexistent/pw: No such file or directory",
        ),
        (
            ["file=[ds] a/a.vmdk", "server=h", "cookie=c", "user=u", "vm=moref=vm-1", "thumbprint=AA"],
            "remote connection requested, missing parameter: password",
        ),
        (["file=[ds] a/a.vmdk", "port=44x"], 'port: could not parse number: "44x"'),
        (["file=[ds] a/a.vmdk", "compression=ZLIB"], "unknown compression type: ZLIB"),
        (["file=[ds] a/a.vmdk", "single-link=maybe"], "could not decipher boolean (maybe)"),
    ],
    ids=[
        "missing-file",
        "no-thumbprint",
        "bad-vm",
        "unknown-transport",
        "unknown-parameter",
        "password-file",
        "cookie-without-password",
        "bad-port",
        "bad-compression",
        "bad-bool",
    ],
)
def test_parameter_errors_are_one_line_and_fail_nbdkit(tmp_path: Path, args: list[str], message: str) -> None:
    out = subprocess.run(
        ["nbdkit", "-U", str(tmp_path / "s"), "--exit-with-parent", "python", str(STANDIN), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------- connection refusals
def _refused(srv: Nbdkit) -> None:
    with pytest.raises(nbd.Error):
        srv.connect()


def test_wrong_thumbprint_is_refused(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    disk = vm.disk()
    wrong = lab.thumbprint[:-2] + ("00" if not lab.thumbprint.endswith("00") else "11")
    with nbdkit(tmp_path, _args(lab, vm, disk["file"], thumbprint=wrong)) as srv:
        _refused(srv)
        assert not _qemu_nbd_children(srv.proc.pid)
    errors = _error_lines(srv.stderr)
    assert errors and all("VixDiskLib_ConnectEx" in e and "thumbprint does not match" in e for e in errors)
    # the right thumbprint in lower case is accepted (VDDK compares case-insensitively)
    with nbdkit(tmp_path, _args(lab, vm, disk["file"], thumbprint=lab.thumbprint.lower())) as srv:
        assert srv.connect().get_size() == disk["capacity"]


def test_wrong_password_is_refused_and_never_printed(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    disk = vm.disk()
    secret = "Wr0ng-s3cret-4711"
    pwfile = tmp_path / "pw"
    pwfile.write_text(secret + "\n")
    for args in (
        _args(lab, vm, disk["file"], password_file=pwfile),
        _args(lab, vm, disk["file"], password=secret),
    ):
        with nbdkit(tmp_path, args) as srv:
            _refused(srv)
        errors = _error_lines(srv.stderr)
        assert errors and all("bad user name or password" in e for e in errors), srv.stderr
        assert secret not in srv.stderr
    # the right password: from a file (its first line, as nbdkit_read_password reads it) and from an
    # inherited fd (-FD) works; password=- reads only from a terminal (nbdkit refuses a pipe)
    pwfile.write_text(lab.password + "\nsecond line\n")
    with nbdkit(tmp_path, _args(lab, vm, disk["file"], password_file=pwfile)) as srv:
        assert srv.connect().get_size() == disk["capacity"]
    rfd, wfd = os.pipe()
    os.write(wfd, f"{lab.password}\n".encode())
    os.close(wfd)
    try:
        with nbdkit(tmp_path, _args(lab, vm, disk["file"], password=f"-{rfd}"), pass_fds=(rfd,)) as srv:
            assert srv.connect().get_size() == disk["capacity"]
    finally:
        os.close(rfd)
    out = subprocess.run(
        ["nbdkit", "-U", str(tmp_path / "s"), "--exit-with-parent", "python", str(STANDIN),
         *_args(lab, vm, disk["file"], password="-")],
        input=f"{lab.password}\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        f"nbdkit: error: {STANDIN}: config: error: stdin is not a tty, cannot read password interactively"
    ], out.stderr


def test_unknown_snapshot_or_file_is_refused(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    disk = vm.disk()
    for args in (
        [*_args(lab, vm, disk["file"]), "snapshot=snapshot-99999"],
        _args(lab, vm, "[LocalDS_0] nowhere/none.vmdk"),
    ):
        with nbdkit(tmp_path, args) as srv:
            _refused(srv)
        assert "VixDiskLib_Open" in srv.stderr and "cannot find the file" in srv.stderr


# ------------------------------------------------------------------------------------------ data path
def test_snapshot_reads_are_the_snapshot_files_bytes_and_writes_land_in_the_current_file(
    lab: VsphereLab, vm: Vm, tmp_path: Path
) -> None:
    before = vm.disk()
    assert before["writable"], before
    # write through the stand-in (no snapshot, writable): lands in the VM's current file
    with nbdkit(tmp_path, _args(lab, vm, before["file"])) as srv:
        h = srv.connect()
        assert not h.is_read_only()
        h.pwrite(b"\xa1" * MIB, 2 * MIB)
        h.pwrite(b"\xa2" * 4096, 5 * MIB + 512)  # unaligned to the block size
        h.pwrite(b"\xa3" * MIB, 8 * MIB)
        h.zero(64 << 10, 8 * MIB, nbd.CMD_FLAG_NO_HOLE)
        h.zero(MIB - (64 << 10), 8 * MIB + (64 << 10))  # may trim
        h.trim(MIB, 12 * MIB)  # advisory: the bytes after a trim are unspecified
        h.flush()
        assert h.pread(MIB, 8 * MIB) == bytes(MIB)
        h.shutdown()
    assert _qemu_io_reads(before["path"], 0xA1, 2 * MIB, MIB)
    assert _qemu_io_reads(before["path"], 0xA2, 5 * MIB + 512, 4096)
    assert _qemu_io_reads(before["path"], 0, 8 * MIB, MIB)

    snap = vm.snapshot("vddk-s1")
    frozen = vm.disk(snap)
    current = vm.disk()
    assert current["path"] != frozen["path"]

    # after the snapshot, a write to the VM's (new) current file must not show in the snapshot
    with nbdkit(tmp_path, _args(lab, vm, current["file"])) as srv:
        h = srv.connect()
        h.pwrite(b"\xb7" * MIB, 2 * MIB)
        h.flush()
        h.shutdown()
    assert _qemu_io_reads(current["path"], 0xB7, 2 * MIB, MIB)
    assert _qemu_io_reads(frozen["path"], 0xA1, 2 * MIB, MIB)

    # read the snapshot's disk through the stand-in (nbdkit not -r: a snapshot is served read-only)
    out = tmp_path / "snap.raw"
    with nbdkit(tmp_path, _args(lab, vm, frozen["file"], snapshot=snap)) as srv:
        h = srv.connect()
        assert h.is_read_only() and h.get_size() == frozen["capacity"]
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        h.shutdown()
        subprocess.run(["nbdcopy", srv.uri, str(out)], check=True, timeout=60)
    cmp = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", frozen["format"], str(out), frozen["path"]],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert out.stat().st_size == frozen["capacity"]
    assert not any((tmp_path / "tmp").iterdir()), "the stand-in left temp files"


def test_readonly_refuses_writes_and_holds_no_write_lock(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    disk = vm.disk()
    assert disk["writable"]
    digest = hashlib.sha256(Path(disk["path"]).read_bytes()).hexdigest()
    with nbdkit(tmp_path, _args(lab, vm, disk["file"]), readonly=True) as srv:
        h = srv.connect()
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"\xcc" * 4096, 0)
        h.pread(4096, 0)
        # nobody may hold the disk open for writing while a read-only export is served:
        # `qemu-img info` without -U takes the shared lock and fails against a writer
        info = subprocess.run(["qemu-img", "info", disk["path"]], capture_output=True, text=True)
        assert info.returncode == 0, info.stderr
        h.shutdown()
    assert hashlib.sha256(Path(disk["path"]).read_bytes()).hexdigest() == digest


def _map(h, size: int) -> list[tuple[int, int, int]]:
    """base:allocation over the whole export: (offset, length, flags) with flags 1 hole, 2 zero."""
    seen: list[tuple[int, int, int]] = []

    def collect(ctx, offset, entries, err):
        for i in range(0, len(entries), 2):
            seen.append((offset, entries[i], entries[i + 1]))
            offset += entries[i]
        return 0

    off = 0
    while off < size:
        n = len(seen)
        h.block_status(size - off, off, collect)
        assert len(seen) > n, "block status made no progress"
        off = seen[-1][0] + seen[-1][1]
    return seen


def test_block_status_shows_holes_and_data(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    disk = vm.disk()
    _qemu_io_write(disk["path"], 0x5A, 4 * MIB, MIB)
    with nbdkit(tmp_path, _args(lab, vm, disk["file"]), readonly=True) as srv:
        h = srv.connect()
        assert h.can_meta_context("base:allocation")
        seen = _map(h, disk["capacity"])
        h.shutdown()
    data = [(o, n) for o, n, f in seen if not f & 1]
    holes = [(o, n) for o, n, f in seen if f & 3 == 3]
    assert data == [(4 * MIB, MIB)], seen
    assert holes and holes[0][0] == 0 and sum(n for _, n in holes) == disk["capacity"] - MIB, seen


# ------------------------------------------------------------------------------------------ lifetime
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_qemu_nbd_dies_with_nbdkit(lab: VsphereLab, vm: Vm, tmp_path: Path, sig: signal.Signals) -> None:
    disk = vm.disk()
    with nbdkit(tmp_path, _args(lab, vm, disk["file"]), readonly=True) as srv:
        h = srv.connect()
        h.pread(512, 0)
        children = _qemu_nbd_children(srv.proc.pid)
        assert len(children) == 1
        assert not any((tmp_path / "tmp").iterdir()), "socket dir should be gone once connected"
        if sig == signal.SIGKILL:
            # a stopped (hung) qemu-nbd cannot notice its client is gone: only the parent-death signal
            # ends it (without setpriv --pdeathsig it would outlive nbdkit)
            os.kill(children[0], signal.SIGSTOP)
        srv.proc.send_signal(sig)
        if sig == signal.SIGTERM:  # nbdkit 1.32 waits for a connected client to leave before it exits
            time.sleep(0.2)
            h.shutdown()
        srv.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(children[0]) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(children[0]):
            os.kill(children[0], signal.SIGKILL)
            pytest.fail("qemu-nbd outlived nbdkit")
    assert not any((tmp_path / "tmp").iterdir())


def test_close_stops_qemu_nbd(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    disk = vm.disk()
    with nbdkit(tmp_path, _args(lab, vm, disk["file"]), readonly=True) as srv:
        h = srv.connect()
        children = _qemu_nbd_children(srv.proc.pid)
        assert len(children) == 1
        h.shutdown()
        del h
        deadline = time.monotonic() + 5
        while _alive(children[0]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(children[0])
        assert srv.proc.poll() is None  # nbdkit keeps serving
        h2 = srv.connect()
        assert h2.get_size() == disk["capacity"]
        h2.shutdown()


def test_powered_on_vm_disk_is_served_read_only(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    lab.wait(vm.obj.PowerOnVM_Task())
    disk = vm.disk()
    assert disk["power_state"] == "poweredOn" and not disk["writable"]
    with nbdkit(tmp_path, _args(lab, vm, disk["file"])) as srv:
        h = srv.connect()
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"\x01" * 512, 0)
        h.shutdown()


def test_data_path_error_is_one_line(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    disk = vm.disk()
    with nbdkit(tmp_path, _args(lab, vm, disk["file"]), readonly=True) as srv:
        h = srv.connect()
        (child,) = _qemu_nbd_children(srv.proc.pid)
        os.kill(child, signal.SIGKILL)
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
        h.shutdown()
    errors = _error_lines(srv.stderr)
    assert errors and "Traceback" not in srv.stderr, srv.stderr
    assert any("VixDiskLib_Read: " in e for e in errors), srv.stderr


def test_local_mode_serves_a_local_file(tmp_path: Path) -> None:
    """No server: file= is a local disk (VDDK's local mode); writable unless -r."""
    image = tmp_path / "local.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(4 * MIB)], check=True)
    with nbdkit(tmp_path, [f"file={image}"]) as srv:
        h = srv.connect()
        assert h.get_size() == 4 * MIB and not h.is_read_only()
        h.pwrite(b"\x42" * 4096, MIB)
        h.flush()
        h.shutdown()
    out = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P 0x42 {MIB} 4096", str(image)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "verification failed" not in out.stdout, out.stdout


def test_snapshot_read_while_the_current_disk_is_written(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    """A backup reads a snapshot while the VM writes its current delta (whose backing is the snapshot's
    file): the reader shares the file (force-share); a second writer of the current disk is refused."""
    with nbdkit(tmp_path, _args(lab, vm, vm.disk()["file"])) as srv:
        h = srv.connect()
        h.pwrite(b"\x31" * MIB, 0)
        h.shutdown()
    snap = vm.snapshot("busy")
    frozen, current = vm.disk(snap), vm.disk()
    (tmp_path / "w").mkdir()
    (tmp_path / "r").mkdir()
    (tmp_path / "w2").mkdir()
    with nbdkit(tmp_path / "w", _args(lab, vm, current["file"])) as writer:
        w = writer.connect()
        assert not w.is_read_only()
        w.pwrite(b"\x32" * MIB, 0)
        with nbdkit(tmp_path / "r", _args(lab, vm, frozen["file"], snapshot=snap)) as reader:
            r = reader.connect()
            assert r.pread(MIB, 0) == b"\x31" * MIB
            w.pwrite(b"\x33" * MIB, MIB)
            assert r.pread(MIB, MIB) == bytes(MIB)
            r.shutdown()
        # a read-only export of the disk being written is served too (force-share; a torn read is the
        # reader's risk, as when reading a running VM's disk without a snapshot)
        w.flush()
        (tmp_path / "r2").mkdir()
        with nbdkit(tmp_path / "r2", _args(lab, vm, current["file"]), readonly=True) as peek:
            p = peek.connect()
            assert p.pread(MIB, MIB) == b"\x33" * MIB
            p.shutdown()
        with nbdkit(tmp_path / "w2", _args(lab, vm, current["file"])) as second:
            with pytest.raises(nbd.Error):
                second.connect()
        errors = _error_lines(second.stderr)
        assert errors and all("VixDiskLib_Open" in e and "lock" in e for e in errors), second.stderr
        assert w.pread(2 * MIB, 0) == b"\x32" * MIB + b"\x33" * MIB
        w.shutdown()


def test_unaligned_io_is_refused_like_vddk(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    disk = vm.disk()
    with nbdkit(tmp_path, _args(lab, vm, disk["file"])) as srv:
        h = srv.connect()
        with pytest.raises(nbd.Error, match="EINVAL"):
            h.pread(100, 0)
        with pytest.raises(nbd.Error, match="EINVAL"):
            h.pwrite(b"x" * 512, 100)
        assert h.pread(512, 512) == bytes(512)  # aligned is fine
        h.shutdown()
    assert "read is not aligned to sectors" in srv.stderr and "write is not aligned to sectors" in srv.stderr


def test_single_link_serves_only_the_top_file(lab: VsphereLab, vm: Vm, tmp_path: Path) -> None:
    with nbdkit(tmp_path, _args(lab, vm, vm.disk()["file"])) as srv:
        h = srv.connect()
        h.pwrite(b"\x41" * MIB, 0)  # into the base file
        h.shutdown()
    vm.snapshot("base")
    current = vm.disk()
    with nbdkit(tmp_path, _args(lab, vm, current["file"])) as srv:
        h = srv.connect()
        h.pwrite(b"\x42" * MIB, 4 * MIB)  # into the delta
        h.shutdown()

    def view(single: bool) -> tuple[bytes, bytes, list[tuple[int, int, int]]]:
        args = _args(lab, vm, current["file"], **({"single-link": "true"} if single else {}))
        with nbdkit(tmp_path, args, readonly=True) as srv:
            h = srv.connect()
            seen = _map(h, current["capacity"])
            head, mine = h.pread(MIB, 0), h.pread(MIB, 4 * MIB)
            h.shutdown()
        return head, mine, seen

    head, mine, seen = view(single=False)
    assert head == b"\x41" * MIB and mine == b"\x42" * MIB
    head, mine, seen = view(single=True)
    assert mine == b"\x42" * MIB and head != b"\x41" * MIB  # the base's bytes are not in this link
    assert [(o, n) for o, n, f in seen if not f & 1] == [(4 * MIB, MIB)], seen
    assert all(f == 1 for o, n, f in seen if f & 1), seen  # holes, not promised to read as zeros


# ------------------------------------------------------------------------------------- planted bugs
# `python tests/labs/test_vsphere_vddk_standin.py [BUG ...]`: plant each bug into the stand-in in turn, run
# this module, print the failing tests, restore the file (labs/vsphere/NOTES.md has the results). Never
# commit a planted bug; the script refuses to run when the stand-in has uncommitted changes.
PLANTED_BUGS = {
    "skip-thumbprint": ('if got.lower() != params["thumbprint"].strip().lower():', "if False:"),
    "ignore-snapshot": ('"snapshot": params.get("snapshot", ""),', '"snapshot": "",'),
    "writable-on-r": (
        'writable = not readonly and not params.get("snapshot") and bool(disk["writable"])',
        'writable = not params.get("snapshot") and bool(disk["writable"])',
    ),
    "pread-off-by-one": (
        "buf[:] = _nbd(h).pread(len(buf), offset)",
        "buf[:] = _nbd(h).pread(len(buf), min(offset + 1, h.capacity - len(buf)))",
    ),
    "no-pdeathsig": ('cmd = ["setpriv", "--pdeathsig", "KILL", "--", "qemu-nbd"', 'cmd = ["qemu-nbd"'),
    "no-force-share": ('spec["force-share"] = True', "pass"),
    "unaligned-io-served": ("    if offset % SECTOR or count % SECTOR:", "    if False:"),
    "single-link-ignored": ('spec["backing"] = None', "pass"),
    "snapshot-writable": (
        'writable = not readonly and not params.get("snapshot") and bool(disk["writable"])',
        'writable = not readonly and bool(disk["writable"])',
    ),
}


def _plant(names: list[str]) -> int:
    import re
    import sys

    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", str(STANDIN)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if dirty:
        print(f"{STANDIN} has uncommitted changes; refusing to plant bugs", file=sys.stderr)
        return 2
    original = STANDIN.read_text()
    try:
        for name in names or list(PLANTED_BUGS):
            old, new = PLANTED_BUGS[name]
            assert original.count(old) == 1, f"{name}: the text to replace is gone"
            STANDIN.write_text(original.replace(old, new))
            out = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--tb=no", __file__],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            print(f"## {name}: {out.stdout.strip().splitlines()[-1]}")
            for test, why in re.findall(r"^FAILED \S+::(\S+)(?: - (.*))?$", out.stdout, re.M):
                print(f"    {test}: {why[:200]}")
    finally:
        STANDIN.write_text(original)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_plant(sys.argv[1:]))
