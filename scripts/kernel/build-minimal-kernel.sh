#!/bin/sh
# Build the minimal x86_64 kernel of the nested test bed's second-level guest:
# allnoconfig plus the few options a busybox initramfs, a serial console,
# virtio-iommu (VIOT), the intel-iommu and VFIO need. No modules. Under
# nested TCG every instruction counts: this kernel boots in about a second
# under single-level TCG, Debian's in about six.
set -eu

usage() {
    cat <<USAGE
usage: scripts/kernel/build-minimal-kernel.sh [--help] [--print-path] [--force] [--jobs N]

Builds from Debian's linux-source-6.12 (the same package, and the same
download cache, as scripts/kernel/build-iommufd-kernel.sh): make allnoconfig,
merge the options listed in this script (scripts/kconfig/merge_config.sh),
make olddefconfig, make bzImage. Caches
  \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/kernel-min/<version>-<config-hash>/bzImage
(and vmlinux beside it, for a PVH boot without decompression). A second run
prints the cached path at once. The path is the last line on stdout.

  --print-path   print the cached bzImage path (fail if not built) and exit
  --force        rebuild even if cached
  --jobs N       parallel build jobs (default: number of CPUs + 1)
Measured on 2 cores: about 4.5 minutes cold.
USAGE
}

PRINT=0 FORCE=0 JOBS=$(( $(nproc) + 1 ))
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h) usage; exit 0 ;;
        --print-path) PRINT=1 ;;
        --force) FORCE=1 ;;
        --jobs) shift; JOBS=${1:?--jobs needs a number} ;;
        *) echo "build-minimal-kernel.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { echo "build-minimal-kernel: $*" >&2; }
die() { say "error: $*"; exit 1; }

CACHE_BASE=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-iommu
CACHE_ROOT=$CACHE_BASE/kernel-min
# The source package is shared with build-iommufd-kernel.sh.
DOWNLOADS=$CACHE_BASE/kernel/downloads
PKG=linux-source-6.12

# On top of allnoconfig; part of the cache key. Each must survive
# olddefconfig (checked below).
OPTIONS="64BIT SMP PRINTK PRINTK_TIME TTY SERIAL_8250 SERIAL_8250_CONSOLE
BLK_DEV_INITRD RD_GZIP DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS BINFMT_ELF BINFMT_SCRIPT
NET UNIX PCI PCI_MSI ACPI HYPERVISOR_GUEST PARAVIRT KVM_GUEST PVH X86_X2APIC
IOMMU_SUPPORT INTEL_IOMMU IRQ_REMAP BLOCK BLK_DEV VIRTIO_MENU VIRTIO_PCI VIRTIO_BLK
VIRTIO_IOMMU ACPI_VIOT VFIO VFIO_GROUP VFIO_CONTAINER VFIO_PCI IOMMUFD VFIO_DEVICE_CDEV
KERNEL_GZIP DEVMEM"
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

mkdir -p "$DOWNLOADS" "$CACHE_ROOT/work"
exec 9>"$CACHE_ROOT/.lock"
flock 9
# Another run may have built it while this one waited for the lock.
if [ -f "$IMAGE" ] && [ "$FORCE" = 0 ]; then
    echo "$IMAGE"
    exit 0
fi

say "installing build dependencies"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    build-essential bc bison flex libelf-dev libssl-dev xz-utils cpio >/dev/null

# The download directory is shared: hold its lock while fetching.
DEB=$(ls "$DOWNLOADS/${PKG}_${VERSION}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$DEB" ]; then
    say "downloading $PKG $VERSION"
    (cd "$DOWNLOADS" && flock "$CACHE_BASE/kernel/.lock" apt-get download -q "$PKG=$VERSION" >&2)
    DEB=$(ls "$DOWNLOADS/${PKG}_${VERSION}"_*.deb | head -n1)
fi

WORK=$CACHE_ROOT/work/$VERSION-$CONFIG_HASH
rm -rf "$WORK"
mkdir -p "$WORK"
say "unpacking the source"
dpkg-deb --fsys-tarfile "$DEB" | tar -C "$WORK" -x --wildcards './usr/src/linux-source-*.tar.*'
TARBALL=$(ls "$WORK"/usr/src/linux-source-*.tar.* | head -n1)
tar -C "$WORK" -xf "$TARBALL"
rm -rf "${WORK:?}/usr"
SRC=$(ls -d "$WORK"/linux-source-*/ | head -n1)

say "configuring: allnoconfig + $(echo "$OPTIONS" | wc -w) options"
for opt in $OPTIONS; do echo "CONFIG_$opt=y"; done >"$WORK/guest.config"
make -C "$SRC" -s allnoconfig >&2
(cd "$SRC" && scripts/kconfig/merge_config.sh -m .config "$WORK/guest.config" >/dev/null)
make -C "$SRC" -s olddefconfig >&2
for opt in $OPTIONS; do
    grep -q "^CONFIG_$opt=y" "$SRC/.config" || die "CONFIG_$opt did not stick (dependency missing?)"
done

say "building bzImage with $JOBS jobs (about 4.5 min on 2 cores)"
start=$(date +%s)
# shellcheck source=scripts/lib/progress.sh
. "$(dirname "$0")/../lib/progress.sh"
progress_run "build-minimal-kernel: building" "$SRC" make -C "$SRC" -s -j"$JOBS" bzImage >&2
say "built in $(( $(date +%s) - start )) s"

mkdir -p "$OUT"
cp "$SRC/vmlinux" "$OUT/vmlinux.tmp"
strip --strip-debug "$OUT/vmlinux.tmp" 2>/dev/null || true
mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
cp "$SRC/.config" "$OUT/config"
cp "$SRC/arch/x86/boot/bzImage" "$IMAGE.tmp"
mv "$IMAGE.tmp" "$IMAGE"
rm -rf "$WORK"
echo "$IMAGE"
