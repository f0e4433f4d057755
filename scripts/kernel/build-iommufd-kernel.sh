#!/bin/sh
# Build a small x86_64 guest kernel with iommufd and VFIO cdev from Debian's
# linux-source-6.12 package, and cache it. Debian's own kernels do not enable
# CONFIG_IOMMUFD; the pass-through tests need it inside a guest that has an
# intel-iommu.
set -eu

usage() {
    cat <<USAGE
usage: scripts/kernel/build-iommufd-kernel.sh [--help] [--print-path] [--force] [--jobs N]

Downloads Debian's linux-source-6.12 with apt, configures it as defconfig +
kvm_guest.config + IOMMUFD, VFIO, VFIO_DEVICE_CDEV, VFIO_PCI, INTEL_IOMMU,
IRQ_REMAP, VIRTIO_IOMMU, ACPI_VIOT, TRANSPARENT_HUGEPAGE (all built in), builds bzImage and caches it under
  \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/kernel/<version>-<config-hash>/bzImage
A second run prints the cached path at once. The path is the last line on stdout.

  --print-path   print the cached bzImage path (fail if not built) and exit
  --force        rebuild even if cached
  --jobs N       parallel build jobs (default: number of CPUs)
Measured on 2 cores: about 13 minutes cold.
USAGE
}

PRINT=0 FORCE=0 JOBS=$(nproc)
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h) usage; exit 0 ;;
        --print-path) PRINT=1 ;;
        --force) FORCE=1 ;;
        --jobs) shift; JOBS=${1:?--jobs needs a number} ;;
        *) echo "build-iommufd-kernel.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { echo "build-iommufd-kernel: $*" >&2; }
die() { say "error: $*"; exit 1; }

CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-iommu/kernel
PKG=linux-source-6.12

# The options on top of defconfig + kvm_guest.config; part of the cache key.
# TRANSPARENT_HUGEPAGE as in Debian's kernels: it changes the iommufd IOVA
# allocator's alignment cap (PAGE_SIZE without it, HPAGE_SIZE with), which
# the conformance suite checks.
OPTIONS="IOMMUFD VFIO VFIO_DEVICE_CDEV VFIO_PCI VFIO_PCI_CORE INTEL_IOMMU INTEL_IOMMU_DEFAULT_ON
IRQ_REMAP VIRTIO_IOMMU ACPI_VIOT PCI_MSI IOMMU_SUPPORT VIRTIO_PCI VIRTIO_BLK BLK_DEV_INITRD
DEVTMPFS DEVTMPFS_MOUNT TRANSPARENT_HUGEPAGE"
CONFIG_HASH=$(printf '%s\n%s\n' "$OPTIONS" "$(cat "$0")" | sha256sum | cut -c1-12)

if ! VERSION=$(apt-cache policy "$PKG" 2>/dev/null | awk '/Candidate:/ {print $2}') || [ -z "$VERSION" ] || [ "$VERSION" = "(none)" ]; then
    [ "$PRINT" = 1 ] && die "$PKG unknown to apt; run without --print-path first"
    apt-get update -qq
    VERSION=$(apt-cache policy "$PKG" | awk '/Candidate:/ {print $2}')
fi
[ -n "$VERSION" ] && [ "$VERSION" != "(none)" ] || die "apt has no $PKG"

OUT=$CACHE_ROOT/$VERSION-$CONFIG_HASH
IMAGE=$OUT/bzImage
if [ "$PRINT" = 1 ]; then
    [ -f "$IMAGE" ] || die "not built yet: $IMAGE"
    echo "$IMAGE"
    exit 0
fi
if [ -f "$IMAGE" ] && [ "$FORCE" = 0 ]; then
    say "cached: $PKG $VERSION, config $CONFIG_HASH"
    echo "$IMAGE"
    exit 0
fi

mkdir -p "$CACHE_ROOT/downloads" "$CACHE_ROOT/work"
exec 9>"$CACHE_ROOT/.lock"
flock 9

say "installing build dependencies"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    build-essential bc bison flex libelf-dev libssl-dev xz-utils cpio kmod >/dev/null

DEB=$(ls "$CACHE_ROOT/downloads/${PKG}_${VERSION}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$DEB" ]; then
    say "downloading $PKG $VERSION"
    (cd "$CACHE_ROOT/downloads" && apt-get download -q "$PKG=$VERSION" >&2)
    DEB=$(ls "$CACHE_ROOT/downloads/${PKG}_${VERSION}"_*.deb | head -n1)
fi

WORK=$CACHE_ROOT/work/$VERSION-$CONFIG_HASH
rm -rf "$WORK"
mkdir -p "$WORK"
say "unpacking the source"
dpkg-deb -x "$DEB" "$WORK/deb"
TARBALL=$(ls "$WORK"/deb/usr/src/linux-source-*.tar.* | head -n1)
tar -C "$WORK" -xf "$TARBALL"
SRC=$(ls -d "$WORK"/linux-source-*/ | head -n1)
rm -rf "$WORK/deb"

say "configuring: defconfig + kvm_guest.config + iommufd/VFIO options"
make -C "$SRC" -s defconfig >&2
make -C "$SRC" -s kvm_guest.config >&2
for opt in $OPTIONS; do
    "$SRC/scripts/config" --file "$SRC/.config" --enable "$opt"
done
make -C "$SRC" -s olddefconfig >&2
for opt in IOMMUFD VFIO_DEVICE_CDEV VFIO_PCI INTEL_IOMMU VIRTIO_IOMMU TRANSPARENT_HUGEPAGE; do
    grep -q "^CONFIG_$opt=y" "$SRC/.config" || die "CONFIG_$opt did not stick (dependency missing?)"
done

say "building bzImage with $JOBS jobs (about 13 min on 2 cores)"
start=$(date +%s)
# shellcheck source=scripts/lib/progress.sh
. "$(dirname "$0")/../lib/progress.sh"
progress_run "build-iommufd-kernel: building" "$SRC" make -C "$SRC" -s -j"$JOBS" bzImage >&2
say "built in $(( $(date +%s) - start )) s"

mkdir -p "$OUT"
cp "$SRC/arch/x86/boot/bzImage" "$IMAGE.tmp"
cp "$SRC/.config" "$OUT/config"
mv "$IMAGE.tmp" "$IMAGE"
rm -rf "$WORK"
echo "$IMAGE"
