"""The two forms of KVM source the scenario rig drives, behind one small interface: the stopped VM
(qcow2 images written with qemu-io, resized with qemu-img; `disks:` in the spec) and the running VM
(a lab QEMU, labs/kvm/vm.py, written through its devices with HMP qemu-io, resized with QMP
block_resize, restarted with its disks swapped; `qmp:` in the spec). Disk i is the VM's i-th disk
(the source's key `disk<i>`)."""

from __future__ import annotations

from pathlib import Path

from helpers_kvm import bitmap_names, run

from connectors.kvm.spec import KvmSource
from labs.kvm.vm import LabVm

CLUSTER = 64 << 10


class StoppedVm:
    form = "disks"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: list[Path] = []

    def spec(self) -> KvmSource:
        return KvmSource(platform="kvm", disks=list(self.paths))

    def add(self, ident: int, size: int) -> None:
        path = self.root / f"img{ident}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, size)
        self.paths.append(path)

    def remove(self, i: int) -> None:
        del self.paths[i]

    def io(self, i: int, cmd: str) -> None:
        run("qemu-io", "-f", "qcow2", "-c", cmd, self.paths[i])

    def resize(self, i: int, size: int, shrink: bool) -> None:
        run("qemu-img", "resize", "-q", *(["--shrink"] if shrink else []), "-f", "qcow2", self.paths[i], size)

    def restart(self, a: int, b: int) -> None:
        raise AssertionError("a stopped VM has no restart")

    def image(self, i: int) -> Path:
        return self.paths[i]

    def content(self, i: int, scratch: Path) -> bytes:
        run("qemu-img", "convert", "-U", "-O", "raw", self.paths[i], scratch)
        try:
            return scratch.read_bytes()
        finally:
            scratch.unlink()

    def bitmaps(self, i: int) -> set[str]:
        return set(bitmap_names(self.paths[i]))

    def own_pids(self) -> set[int]:
        return set()

    def leftovers(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class RunningVm:
    """A lab VM started at the first use after its disks were added (its disk list is fixed then)."""

    form = "qmp"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sizes: list[int] = []
        self.vm: LabVm | None = None

    def _vm(self) -> LabVm:
        if self.vm is None:
            self.vm = LabVm(self.root / "vm", self.sizes, name="scenario").start()
        return self.vm

    @property
    def started(self) -> bool:
        return self.vm is not None

    def spec(self) -> KvmSource:
        return KvmSource(platform="kvm", qmp=self._vm().qmp_path)

    def add(self, ident: int, size: int) -> None:
        assert self.vm is None, "the running VM's disks are added before it starts"
        self.sizes.append(size)

    def remove(self, i: int) -> None:
        raise AssertionError("the running VM's disk list is fixed")

    def io(self, i: int, cmd: str) -> None:
        self._vm().qemu_io(i, cmd)

    def resize(self, i: int, size: int, shrink: bool) -> None:
        self._vm().resize(i, size)

    def restart(self, a: int, b: int) -> None:
        """Stop (QEMU stores the bitmaps), swap the images of devices a and b, start again."""
        vm = self._vm()
        vm.stop()
        if a != b:
            vm.swap(a, b)
        vm.start()

    def image(self, i: int) -> Path:
        return self._vm().image_of(i)

    def content(self, i: int, scratch: Path) -> bytes:
        vm = self._vm()
        vm.flush(i)  # QEMU's qcow2 metadata reaches the file: the file then reads what the guest sees
        run("qemu-img", "convert", "-U", "-O", "raw", vm.image_of(i), scratch)
        try:
            return scratch.read_bytes()
        finally:
            scratch.unlink()

    def _nodes(self) -> dict[str, dict]:  # type: ignore[type-arg]
        mon = self._vm().monitor
        assert mon is not None
        return {n["node-name"]: n for n in mon.execute("query-named-block-nodes", flat=True)}

    def bitmaps(self, i: int) -> set[str]:
        node = self._nodes()[f"disk{i}"]
        return {b["name"] for b in node.get("dirty-bitmaps", []) or [] if b.get("name")}

    def own_pids(self) -> set[int]:
        return {self.vm.proc.pid} if self.vm is not None and self.vm.proc is not None else set()

    def leftovers(self) -> list[str]:
        """What a released snapshot must not leave in QEMU: exports, block jobs, extra nodes."""
        if self.vm is None:
            return []
        mon = self.vm.monitor
        assert mon is not None
        odd = [f"export {e.get('id')}" for e in mon.execute("query-block-exports")]
        odd += [f"job {j.get('id')}" for j in mon.execute("query-jobs")]
        odd += [f"node {n}" for n in self._nodes() if not n.startswith("disk")]
        return odd

    def close(self) -> None:
        if self.vm is not None:
            try:
                self.vm.stop(timeout=10)
            finally:
                self.vm.kill()
