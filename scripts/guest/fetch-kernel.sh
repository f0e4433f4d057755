#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Fetch Debian's 6.12 amd64 (or arm64) kernel and the modules the guest tests
# load, and cache them (decompressed, with their load order).
set -eu

usage() {
    cat <<USAGE
usage: scripts/guest/fetch-kernel.sh [--help] [--print-path] [--arch amd64|arm64]

Downloads Debian's newest linux-image-6.12.*-ARCH-unsigned with apt-get
download (apt sources derived from this machine's own list), checks that its
config has VIRTIO_IOMMU=m and ACPI_VIOT=y, and caches under
  \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/guest/kernel-<version>/
    vmlinuz  config  modules/*.ko (decompressed)  modules.order (load order)
The cache directory is the last line on stdout. A second run reuses it.

  --print-path   print the cache directory if it is complete, else fail
  --arch ARCH    amd64 (default) or arm64. Another architecture's package
                 lists are kept apart, in a private apt state under
                 \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/guest/apt-ARCH/
                 (the machine's own sources, APT::Architecture=ARCH): this
                 machine's dpkg is not told about the architecture.
USAGE
}

PRINT=0 ARCH=amd64
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h) usage; exit 0 ;;
        --print-path) PRINT=1 ;;
        --arch) shift; ARCH=${1:-} ;;
        --arch=*) ARCH=${1#--arch=} ;;
        *) echo "fetch-kernel.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$ARCH" in
    amd64|arm64) ;;
    *) echo "fetch-kernel.sh: --arch must be amd64 or arm64" >&2; exit 2 ;;
esac

say() { echo "fetch-kernel: $*" >&2; }
die() { say "error: $*"; exit 1; }

ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-iommu/guest
# Modules the guest tests need; their dependencies come from modules.dep.
WANT="virtio_pci virtio_iommu virtio_blk virtio_net vfio_pci vfio_iommu_type1"

HERE=$(cd "$(dirname "$0")/.." && pwd)
. "$HERE/lib/apt-sources.sh"
# Steps that may run for minutes say what they are at every 30 s.
# shellcheck source=scripts/lib/progress.sh
. "$HERE/lib/progress.sh"
# apt's options for ARCH: none for this machine's own, a private state for another.
APT_OPTS=
if [ "$ARCH" != "$(dpkg --print-architecture)" ]; then
    APT_OPTS=$(foreign_apt_options "$ROOT/apt-$ARCH" "$ARCH")
fi

pkg_name() {
    # shellcheck disable=SC2086 # options, one word each
    apt-cache $APT_OPTS search --names-only "^linux-image-6\.12\.[0-9]+\+[a-z0-9]+-$ARCH-unsigned\$" 2>/dev/null |
        awk '{print $1}' | sort -V | tail -n1
}

PKG=$(pkg_name)
if [ -z "$PKG" ]; then
    [ "$PRINT" = 1 ] && die "no 6.12 $ARCH kernel known to apt; run without --print-path"
    ensure_backports_sources
    # shellcheck disable=SC2086
    progress_with "fetch-kernel: apt-get update" : apt-get $APT_OPTS update -qq
    PKG=$(pkg_name)
fi
[ -n "$PKG" ] || die "apt knows no linux-image-6.12.*-$ARCH-unsigned"
KVER=${PKG#linux-image-}
KVER=${KVER%-unsigned}
OUT=$ROOT/kernel-$KVER

# Complete, and made with every module of $WANT (a cache from before a module
# was added is fetched again).
cache_complete() {
    [ -f "$OUT/.complete" ] && [ "$(cat "$OUT/want" 2>/dev/null)" = "$WANT" ]
}

if cache_complete; then
    [ "$PRINT" = 1 ] || say "cached: $KVER"
    echo "$OUT"
    exit 0
fi
[ "$PRINT" = 1 ] && die "not fetched yet: $OUT"

mkdir -p "$ROOT/downloads"
exec 9>"$ROOT/.lock"
flock 9
say "downloading $PKG"
# shellcheck disable=SC2086
download() { cd "$ROOT/downloads" && apt-get $APT_OPTS download -q "$PKG" >&2; }
downloaded() { progress_size "$ROOT/downloads"; }
progress_with "fetch-kernel: downloading" downloaded download
DEB=$(ls -t "$ROOT/downloads/${PKG}"_*.deb | head -n1)

WORK=$(mktemp -d "$ROOT/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
unpacked() { progress_size "$WORK"; }
progress_with "fetch-kernel: unpacking $(basename "$DEB")" unpacked dpkg-deb -x "$DEB" "$WORK"
CONFIG=$WORK/boot/config-$KVER
grep -q '^CONFIG_VIRTIO_IOMMU=[ym]' "$CONFIG" || die "$KVER has no CONFIG_VIRTIO_IOMMU"
grep -q '^CONFIG_ACPI_VIOT=y' "$CONFIG" || die "$KVER has no CONFIG_ACPI_VIOT=y"

# The package ships no modules.dep (depmod makes it at install time).
command -v depmod >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kmod >/dev/null
depmod -b "$WORK" "$KVER"
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/modules"
: >"$OUT.tmp/modules.order"
# modprobe lists each module after its dependencies ("insmod PATH"), and
# "builtin NAME" for what is in the kernel.
for m in $WANT; do
    modprobe -d "$WORK" -S "$KVER" --show-depends "$m" >"$WORK/deps" || die "no module $m in $KVER"
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        name=$(basename "$path"); name=${name%%.ko*}
        grep -qx "$name.ko" "$OUT.tmp/modules.order" && continue
        case "$path" in
            *.ko.xz) xz -dc "$path" >"$OUT.tmp/modules/$name.ko" ;;
            *.ko.zst) zstd -qdc "$path" >"$OUT.tmp/modules/$name.ko" ;;
            *.ko.gz) gzip -dc "$path" >"$OUT.tmp/modules/$name.ko" ;;
            *) cp "$path" "$OUT.tmp/modules/$name.ko" ;;
        esac
        echo "$name.ko" >>"$OUT.tmp/modules.order"
    done <"$WORK/deps"
done
cp "$WORK/boot/vmlinuz-$KVER" "$OUT.tmp/vmlinuz"
cp "$CONFIG" "$OUT.tmp/config"
echo "$KVER" >"$OUT.tmp/version"
echo "$WANT" >"$OUT.tmp/want"
touch "$OUT.tmp/.complete"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
say "kernel $KVER with modules: $(tr '\n' ' ' <"$OUT/modules.order")"
echo "$OUT"
