"""Build the bootable guest: a small real Linux disk that boots through its own MBR and bootloader.

What it is (PLATFORM-LABS.md, "A bootable guest"): a 256 MiB disk with an MBR, one bootable ext4
partition at 1 MiB (label `sdroot`), extlinux in the boot sectors, Debian's cloud kernel and a
busybox initramfs that loads the virtio/SCSI/ATA drivers and mounts the root by label. The root
filesystem is busybox plus `/sbin/init`, which reads its mode from QEMU's fw_cfg
(`opt/sendense/mode`, so source and replica stay byte-identical) or from `/etc/sendense/mode`:

- `boot`: prints `SENDENSE-GUEST-BOOTED mode=boot seq=N`, then `SENDENSE-GUEST-READY`, and idles;
- `workload`: prints the same, then writes files and a sequence counter in a loop, each step
  synced (`/var/lib/sendense/seq`), and prints `SENDENSE-GUEST-SEQ N` now and then.

In both modes, before its first marker, init starts `/sbin/sendense-qga` in the background: a tiny
QEMU guest agent (busybox sh) on the virtio-serial port `org.qemu.guest_agent.0`, when the VM has one
(found through `/sys/class/virtio-ports/*/name`; no port: it exits). Per JSON line it answers
`guest-sync` / `guest-sync-delimited` with `{"return": <id>}` (the delimited one after a 0xFF byte),
`guest-ping` with `{"return": {}}`, and any other command with an error. While the host side is not
connected its reads end at once (virtio_console), so it polls twice a second. Without the file (a
test removes it) the guest boots the same and no agent answers.

Everything comes from Debian packages (the kernel .deb is fetched with `apt-get download`; the tools
are in scripts/install.sh). The image is cached by recipe: a second build is a file lookup.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

KERNEL_PACKAGE = "linux-image-cloud-amd64"  # the metapackage; its dependency is the versioned kernel
MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ata_piix", "virtio_console",
           "virtio_net", "qemu_fw_cfg")  # fmt: skip
LABEL = "sdroot"
DISK_MIB = 256
PART_OFFSET = 1 << 20
RECIPE_VERSION = "1"  # bump when the image's content changes

INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
label=$(sed -n 's/.*root=LABEL=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
dev=""
for i in $(seq 1 100); do dev=$(findfs "LABEL=$label" 2>/dev/null) && break; sleep 0.1; done
if [ -z "$dev" ] || ! mount -t ext4 -o rw "$dev" /newroot; then
  echo "SENDENSE-GUEST-ERROR: no root filesystem LABEL=$label (disks: $(ls /sys/block | tr '\\n' ' '))"
  sleep 1; poweroff -f
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
"""

ROOT_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin 2>/dev/null
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -o remount,rw /
[ -x /sbin/sendense-qga ] && /sbin/sendense-qga </dev/null >/dev/null 2>&1 &
mode=$(cat /sys/firmware/qemu_fw_cfg/by_name/opt/sendense/mode/raw 2>/dev/null || cat /etc/sendense/mode)
seq=$(cat /var/lib/sendense/seq 2>/dev/null || echo 0)
echo "SENDENSE-GUEST-BOOTED mode=$mode seq=$seq" > /dev/console
if [ "$mode" != workload ]; then
  echo "SENDENSE-GUEST-READY" > /dev/console
  while true; do sleep 3600; done
fi
mkdir -p /data /var/lib/sendense
while true; do
  seq=$((seq + 1))
  i=$((seq % 8))
  dd if=/dev/urandom of=/data/blob$i bs=4k count=8 2>/dev/null
  echo "$seq" > /data/f$i
  echo "$seq" > /var/lib/sendense/seq.tmp
  sync
  mv /var/lib/sendense/seq.tmp /var/lib/sendense/seq
  sync
  [ $((seq % 25)) = 0 ] && echo "SENDENSE-GUEST-SEQ $seq" > /dev/console
done
"""

GUEST_AGENT = r"""#!/bin/busybox sh
export PATH=/bin
port=""
for i in 1 2 3 4 5 6 7 8 9 10; do
  for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=${n%/name} && break 2
  done
  sleep 0.2
done
[ -n "$port" ] || exit 0
dev=/dev/${port##*/}
[ -c "$dev" ] || mknod "$dev" c $(tr : ' ' < "$port/dev") || exit 0
exec 3<>"$dev" || exit 0
while true; do
  while IFS= read -r line <&3; do
    id=$(echo "$line" | sed -n 's/.*"id" *: *\(-\{0,1\}[0-9][0-9]*\).*/\1/p')
    case "$line" in
      *'"guest-sync-delimited"'*) printf '\377{"return": %s}\n' "${id:-0}" >&3 ;;
      *'"guest-sync"'*) printf '{"return": %s}\n' "${id:-0}" >&3 ;;
      *'"guest-ping"'*) printf '{"return": {}}\n' >&3 ;;
      *'"execute"'*) printf '{"error": {"class": "CommandNotFound", "desc": "not in this guest"}}\n' >&3 ;;
    esac
  done
  sleep 0.5
done
"""

EXTLINUX_CONF = f"""DEFAULT linux
TIMEOUT 1
PROMPT 0
LABEL linux
  KERNEL /boot/vmlinuz
  INITRD /boot/initrd.img
  APPEND root=LABEL={LABEL} console=ttyS0 quiet panic=-1
"""


class GuestBuildError(RuntimeError):
    pass


def _run(*cmd: str | Path, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, input=stdin, capture_output=True)
    if p.returncode != 0:
        err = (p.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
        raise GuestBuildError(f"guest build: {Path(str(cmd[0])).name} failed: {err}")
    return p.stdout


def default_cache() -> Path:
    return Path(os.environ.get("SENDENSE_GUEST_CACHE", "~/.cache/sendense/guest")).expanduser()


def kernel_version() -> str:
    """The versioned cloud kernel the metapackage names (e.g. 6.1.0-57-cloud-amd64)."""
    out = _run("apt-cache", "depends", KERNEL_PACKAGE).decode()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.removeprefix("Depends: linux-image-")
    raise GuestBuildError(f"guest build: apt-cache does not know {KERNEL_PACKAGE} (run apt-get update)")


def image_path(cache: Path | None = None, version: str | None = None) -> Path:
    """Where the cached image for this recipe and kernel lives (built or not)."""
    cache = cache or default_cache()
    recipe = hashlib.sha256(
        (RECIPE_VERSION + INITRAMFS_INIT + ROOT_INIT + GUEST_AGENT + EXTLINUX_CONF).encode()
    ).hexdigest()
    return cache / f"guest-{version or kernel_version()}-{recipe[:12]}.qcow2"


def build(cache: Path | None = None) -> Path:
    """The guest image (qcow2), built once per recipe and kernel; later calls return the cached file."""
    cached = sorted(
        (cache or default_cache()).glob(f"guest-*-{image_path(cache, 'x').name.rsplit('-', 1)[1]}")
    )
    if cached:  # this recipe, whatever kernel it was built with (no apt lookup when cached)
        return cached[-1]
    version = kernel_version()
    out = image_path(cache, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sendense-guest-") as tmp:
        work = Path(tmp)
        kernel, modules = _fetch_kernel(work, version)
        root = work / "root"
        _root_tree(root, kernel, _initramfs(work, modules, version))
        raw = work / "disk.raw"
        _disk(raw, root)
        part = out.with_name(out.name + ".part")
        _run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", raw, part)
        os.replace(part, out)
    log.info("built the bootable guest %s", out)
    return out


def with_mode(out: Path, mode: str, cache: Path | None = None) -> Path:
    """A qcow2 copy of the guest at `out` whose own mode file (`/etc/sendense/mode`) says `mode`: the
    mode a VM made from it boots in when nothing passes one through fw_cfg (a failed-over VM)."""
    if mode not in ("boot", "workload"):
        raise ValueError(f"guest mode {mode!r}: boot or workload")
    with tempfile.TemporaryDirectory(prefix="sendense-guest-") as tmp:
        raw, text = Path(tmp) / "disk.raw", Path(tmp) / "mode"
        _run("qemu-img", "convert", "-q", "-O", "raw", build(cache), raw)
        text.write_text(f"{mode}\n")
        fs = f"{raw}?offset={PART_OFFSET}"
        _run("debugfs", "-w", "-R", "rm /etc/sendense/mode", fs)
        _run("debugfs", "-w", "-R", f"write {text} /etc/sendense/mode", fs)
        _run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", raw, out)
    return out


def workload_image(cache: Path | None = None) -> Path:
    """The guest whose own mode is `workload` (cached beside the guest): every VM made from it writes
    files and its sequence counter, whatever platform boots it."""
    base = build(cache)
    out = base.with_name(f"{base.stem}-workload.qcow2")
    if not out.exists():
        part = out.with_name(out.name + ".part")
        with_mode(part, "workload", cache)
        os.replace(part, out)
    return out


def _fetch_kernel(work: Path, version: str) -> tuple[Path, Path]:
    _run("apt-get", "download", f"linux-image-{version}", cwd=work)
    deb = next(work.glob(f"linux-image-{version}_*.deb"))
    _run("dpkg-deb", "-x", deb, work / "k")
    return work / "k" / "boot" / f"vmlinuz-{version}", work / "k" / "lib" / "modules" / version


def _initramfs(work: Path, modules: Path, version: str) -> Path:
    """busybox, the driver modules in load order, and the init that mounts the root by label."""
    ird = work / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "newroot", "etc", "lib/modules"):
        (ird / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", ird / "bin" / "busybox")
    _run("depmod", "-b", work / "k", version)
    order: list[str] = []
    for m in MODULES:
        deps = _run("modprobe", "-d", work / "k", "-S", version, "--show-depends", m).decode()
        for line in deps.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                name = Path(parts[1]).name
                if name not in order:
                    shutil.copy2(parts[1], ird / "lib" / "modules" / name)
                    order.append(name)
    (ird / "etc" / "modules.order").write_text("\n".join(order) + "\n")
    init = ird / "init"
    init.write_text(INITRAMFS_INIT)
    init.chmod(0o755)
    files = sorted(str(p.relative_to(ird)) for p in ird.rglob("*"))
    cpio = _run("cpio", "-o", "-H", "newc", "--quiet", cwd=ird, stdin=("\n".join(files) + "\n").encode())
    out = work / "initrd.img"
    out.write_bytes(_run("gzip", "-9", "-n", stdin=cpio))
    return out


def _root_tree(root: Path, kernel: Path, initrd: Path) -> None:
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "data", "etc/sendense", "var/lib/sendense", "boot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    init = root / "sbin" / "init"
    init.write_text(ROOT_INIT)
    init.chmod(0o755)
    agent = root / "sbin" / "sendense-qga"
    agent.write_text(GUEST_AGENT)
    agent.chmod(0o755)
    (root / "etc" / "sendense" / "mode").write_text("boot\n")
    (root / "var" / "lib" / "sendense" / "seq").write_text("0\n")
    shutil.copy2(kernel, root / "boot" / "vmlinuz")
    shutil.copy2(initrd, root / "boot" / "initrd.img")
    (root / "boot" / "extlinux").mkdir()
    (root / "boot" / "extlinux" / "extlinux.conf").write_text(EXTLINUX_CONF)


def _disk(raw: Path, root: Path) -> None:
    """MBR, one bootable partition at 1 MiB, ext4 filled from `root` without mounting, then extlinux
    installed through a loop mount of the partition (it needs the mounted filesystem)."""
    with open(raw, "wb") as f:
        f.truncate(DISK_MIB << 20)
    _run("sfdisk", "-q", raw, stdin=b"label: dos\nstart=2048, type=83, bootable\n")
    part_kib = (DISK_MIB << 10) - (PART_OFFSET >> 10)
    _run("mkfs.ext4", "-q", "-F", "-L", LABEL, "-T", "default", "-E", f"offset={PART_OFFSET}", "-d", root,
         raw, f"{part_kib}k")  # fmt: skip
    mnt = Path(tempfile.mkdtemp(prefix="sendense-guest-mnt-"))
    loop = _run("losetup", "--find", "--show", "-o", str(PART_OFFSET), raw).decode().strip()
    try:
        _run("mount", loop, mnt)
        try:
            _run("extlinux", "-i", mnt / "boot" / "extlinux")
        finally:
            _run("umount", mnt)
    finally:
        _run("losetup", "-d", loop)
        mnt.rmdir()
    mbr = next(
        p for p in (Path("/usr/lib/syslinux/mbr/mbr.bin"), Path("/usr/lib/EXTLINUX/mbr.bin")) if p.exists()
    )
    with open(raw, "r+b") as f:
        f.write(mbr.read_bytes()[:440])
