#!/usr/bin/env bash
# Build vcsim-lab (govmomi's simulator from Debian's golang-github-vmware-govmomi-dev, with the Sendense
# lab's extensions) offline: GOPATH mode, no module downloads. Idempotent: the binary is cached by recipe
# (the overlay's files, this script, the Debian package and Go versions) under
# ${SENDENSE_VCSIM_CACHE:-~/.cache/sendense/vcsim}; a repeat run is a file lookup.
# Prints the binary's path on stdout (the last line); progress goes to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SENDENSE_VCSIM_CACHE:-$HOME/.cache/sendense/vcsim}"
DEBIAN_SRC=/usr/share/gocode/src/github.com/vmware/govmomi
APT_PACKAGES=(golang-go golang-github-vmware-govmomi-dev patch)

say() { printf 'vcsim-lab build: %s\n' "$*" >&2; }
die() { printf 'vcsim-lab build: error: %s\n' "$*" >&2; exit 1; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == ii* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  ((EUID == 0)) || die "missing Debian packages (install them as root): ${missing[*]}"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[[ -d "$DEBIAN_SRC/simulator" ]] || die "$DEBIAN_SRC/simulator is missing (golang-github-vmware-govmomi-dev)"

# --- the recipe key -------------------------------------------------------------------------------
recipe="$( {
  dpkg-query -W -f='${Version}\n' golang-github-vmware-govmomi-dev golang-go
  go version
  cd "$HERE" && find build.sh cmd overlay -type f | LC_ALL=C sort | xargs sha256sum
} | sha256sum | cut -c1-16)"
bin="$CACHE/vcsim-lab-$recipe"
if [[ -x "$bin" ]]; then
  ln -sfn "$(basename "$bin")" "$CACHE/vcsim-lab"
  say "cached ($recipe)"
  echo "$bin"
  exit 0
fi

# --- the GOPATH overlay ---------------------------------------------------------------------------
# GOPATH=$gopath:/usr/share/gocode: github.com/vmware/govmomi/simulator resolves to the overlay (Debian's
# files symlinked, ours added, patched ones copied); other packages resolve to Debian's tree.
gopath="$CACHE/gopath-$recipe"
rm -rf "$gopath"
trap 'rm -rf "$gopath" "$bin.tmp"' EXIT  # the overlay is only needed while building
# Go takes a package from the first GOPATH entry whose directory exists, so the overlay mirrors Debian's
# whole govmomi tree (symlinks) with simulator/ as the only real directory.
gov="$gopath/src/github.com/vmware/govmomi"
mkdir -p "$gov"
for f in "$DEBIAN_SRC"/*; do
  [[ "$(basename "$f")" == simulator ]] || ln -s "$f" "$gov/$(basename "$f")"
done
sim="$gov/simulator"
mkdir -p "$sim"
for f in "$DEBIAN_SRC"/simulator/*; do
  case "$f" in *_test.go) continue ;; esac
  ln -s "$f" "$sim/$(basename "$f")"  # files and the esx/, vpx/, internal/ subpackages
done
for f in "$HERE"/overlay/simulator/*.go; do
  [[ ! -e "$sim/$(basename "$f")" ]] || die "overlay file $(basename "$f") would shadow Debian's: use a patch"
  cp "$f" "$sim/"
done
for p in "$HERE"/overlay/patches/*.patch; do
  target="$(basename "$p" .patch)"
  rm "$sim/$target"
  cp "$DEBIAN_SRC/simulator/$target" "$sim/$target"
  patch --quiet --no-backup-if-mismatch -p1 -d "$sim" <"$p" || die "$(basename "$p") does not apply to Debian's $target"
done
main="$gopath/src/sendense.lab/vcsim-lab"
mkdir -p "$main"
cp "$HERE"/cmd/vcsim-lab/*.go "$main/"

# --- build ----------------------------------------------------------------------------------------
say "building ($recipe)"
start=$(date +%s)
(
  cd "$main"
  GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off GOPROXY=off GOFLAGS= \
    GOCACHE="$CACHE/gocache" go build -o "$bin.tmp" .
)
mv "$bin.tmp" "$bin"
ln -sfn "$(basename "$bin")" "$CACHE/vcsim-lab"
find "$CACHE" -mindepth 1 -maxdepth 1 -name 'vcsim-lab-*' ! -name "$(basename "$bin")" -delete  # older recipes
say "built in $(($(date +%s) - start)) s"
echo "$bin"
