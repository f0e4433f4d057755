#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# What the test kernels' build scripts share: Debian's linux-source-6.12,
# `make allnoconfig`, a small list of options merged on top, a built-in-only
# bzImage (no modules), and a cache keyed by the package version and a hash
# of the options and of the recipe (this file and the calling script).
#
# Usage (sourced by a script that has set NAME, CACHE_DIR, OPTIONS and
# ABOUT, and parsed --print-path/--force/--jobs into PRINT, FORCE, JOBS):
#   kernel_build
# prints the cached bzImage path as the last line on stdout (vmlinux, for a
# PVH boot without decompression, and the .config are beside it).
set -eu

say() { echo "$NAME: $*" >&2; }
die() { say "error: $*"; exit 1; }

KERNEL_LIB=$(dirname "$0")/lib.sh
# shellcheck source=scripts/lib/cache.sh
. "$(dirname "$KERNEL_LIB")/../lib/cache.sh"
CACHE_BASE=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-iommu
# The source package and its download are shared by every kernel.
DOWNLOADS=$CACHE_BASE/kernel/downloads
PKG=linux-source-6.12

# The package version apt would install (apt-get update once if unknown).
kernel_version() {
    if ! v=$(apt-cache policy "$PKG" 2>/dev/null | awk '/Candidate:/ {print $2}') ||
        [ -z "$v" ] || [ "$v" = "(none)" ]; then
        [ "$PRINT" = 1 ] && die "$PKG unknown to apt; run without --print-path first"
        apt-get update -qq
        v=$(apt-cache policy "$PKG" | awk '/Candidate:/ {print $2}')
    fi
    [ -n "$v" ] && [ "$v" != "(none)" ] || die "apt has no $PKG"
    echo "$v"
}

# The .deb of linux-source, downloaded once into the shared directory.
kernel_deb() {
    mkdir -p "$DOWNLOADS"
    deb=$(ls "$DOWNLOADS/${PKG}_${VERSION}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        say "downloading $PKG $VERSION (about 140 MiB)"
        (cd "$DOWNLOADS" && flock "$CACHE_BASE/kernel/.download-lock" \
            apt-get download -q "$PKG=$VERSION" >&2)
        deb=$(ls "$DOWNLOADS/${PKG}_${VERSION}"_*.deb | head -n1)
    fi
    echo "$deb"
}

# allnoconfig, then OPTIONS as =y; each must survive olddefconfig.
kernel_configure() {
    src=$1
    say "configuring: allnoconfig + $(echo "$OPTIONS" | wc -w) options"
    for opt in $OPTIONS; do echo "CONFIG_$opt=y"; done >"$WORK/fragment.config"
    make -C "$src" -s allnoconfig >&2
    (cd "$src" && scripts/kconfig/merge_config.sh -m .config "$WORK/fragment.config" >/dev/null)
    make -C "$src" -s olddefconfig >&2
    for opt in $OPTIONS; do
        grep -q "^CONFIG_$opt=y" "$src/.config" ||
            die "CONFIG_$opt did not stick (a dependency missing from the list?)"
    done
}

kernel_build() {
    config_hash=$(printf '%s\n%s\n%s\n' "$OPTIONS" "$(cat "$0")" "$(cat "$KERNEL_LIB")" |
        sha256sum | cut -c1-12)
    VERSION=$(kernel_version)
    out=$CACHE_BASE/$CACHE_DIR/$VERSION-$config_hash
    image=$out/bzImage
    if [ "$PRINT" = 1 ]; then
        [ -f "$image" ] || die "not built yet: $image"
        cache_used "$out"
        echo "$image"
        return 0
    fi
    if [ -f "$image" ] && [ "$FORCE" = 0 ]; then
        say "cached: $PKG $VERSION, config $config_hash"
        cache_used "$out"
        echo "$image"
        return 0
    fi

    mkdir -p "$CACHE_BASE/$CACHE_DIR/work"
    exec 9>"$CACHE_BASE/$CACHE_DIR/.lock"
    flock 9
    # Another run may have built it while this one waited for the lock.
    if [ -f "$image" ] && [ "$FORCE" = 0 ]; then
        cache_used "$out"
        echo "$image"
        return 0
    fi

    say "installing build dependencies"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        build-essential bc bison flex libelf-dev libssl-dev xz-utils cpio >/dev/null
    deb=$(kernel_deb)

    WORK=$CACHE_BASE/$CACHE_DIR/work/$VERSION-$config_hash
    rm -rf "$WORK"
    mkdir -p "$WORK"
    say "unpacking the source"
    dpkg-deb --fsys-tarfile "$deb" | tar -C "$WORK" -x --wildcards './usr/src/linux-source-*.tar.*'
    tarball=$(ls "$WORK"/usr/src/linux-source-*.tar.* | head -n1)
    tar -C "$WORK" -xf "$tarball"
    rm -rf "${WORK:?}/usr"
    src=$(ls -d "$WORK"/linux-source-*/ | head -n1)

    kernel_configure "$src"
    say "building bzImage with $JOBS jobs ($ABOUT)"
    start=$(date +%s)
    # shellcheck source=scripts/lib/progress.sh
    . "$(dirname "$KERNEL_LIB")/../lib/progress.sh"
    progress_run "$NAME: building" "$src" make -C "$src" -s -j"$JOBS" bzImage >&2
    say "built in $(( $(date +%s) - start )) s"

    mkdir -p "$out"
    cp "$src/vmlinux" "$out/vmlinux.tmp"
    strip --strip-debug "$out/vmlinux.tmp" 2>/dev/null || true
    mv "$out/vmlinux.tmp" "$out/vmlinux"
    cp "$src/.config" "$out/config"
    cp "$src/arch/x86/boot/bzImage" "$image.tmp"
    mv "$image.tmp" "$image"
    rm -rf "$WORK"
    cache_used "$out"
    cache_prune "$CACHE_BASE/$CACHE_DIR" bzImage "$out"
    echo "$image"
}

# The options every test kernel has: a busybox initramfs on a serial
# console, PCI with MSI, virtio (blk, the virtio-iommu and its ACPI VIOT
# table), the intel-iommu with interrupt remapping, VFIO with cdev devices
# on iommufd, /dev/mem (the tests DMA to physical addresses through it).
# shellcheck disable=SC2034 # read by the scripts that source this file
KERNEL_BASE_OPTIONS="64BIT SMP PRINTK PRINTK_TIME TTY SERIAL_8250 SERIAL_8250_CONSOLE
BLK_DEV_INITRD RD_GZIP DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS BINFMT_ELF BINFMT_SCRIPT
NET UNIX PCI PCI_MSI ACPI HYPERVISOR_GUEST PARAVIRT KVM_GUEST PVH X86_X2APIC
IOMMU_SUPPORT INTEL_IOMMU IRQ_REMAP BLOCK BLK_DEV VIRTIO_MENU VIRTIO_PCI VIRTIO_BLK
VIRTIO_IOMMU ACPI_VIOT VFIO VFIO_GROUP VFIO_CONTAINER VFIO_PCI IOMMUFD VFIO_DEVICE_CDEV
KERNEL_GZIP DEVMEM"

# The command line every kernel script takes.
kernel_args() {
    PRINT=0 FORCE=0 JOBS=$(( $(nproc) + 1 ))
    while [ $# -gt 0 ]; do
        case "$1" in
            --help|-h) usage; exit 0 ;;
            --print-path) PRINT=1 ;;
            --force) FORCE=1 ;;
            --jobs) shift; JOBS=${1:?--jobs needs a number} ;;
            *) echo "$NAME: unknown argument $1" >&2; usage >&2; exit 2 ;;
        esac
        shift
    done
}
