#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build the first-level initramfs of the nested test bed (issue 12): the
# patched QEMU and what it loads, the daemon, and a second-level guest
# (minimal kernel + busybox initramfs with edu-dma) for it to boot.
set -eu

usage() {
    cat <<USAGE
usage: scripts/guest/build-nested-initramfs.sh --out FILE --tools DIR
           [--qemu PATH] [--l2-kernel FILE] [--help]

--tools DIR holds the static guest programs (edu-dma, vhost-user-iommu; see
qemu-tests/src/lib.rs guest_tools). Defaults: --qemu is
scripts/qemu/build-qemu.sh --print-path, --l2-kernel is
scripts/kernel/build-minimal-kernel.sh --print-path.

Writes, with scripts/guest/build-initramfs.sh (no modules):
  FILE                 the first-level initramfs:
    /usr/bin/qemu-system-x86_64   the patched QEMU, stripped, with the
                                  libraries ldd names and ld-linux
    /fw/                          bios-256k.bin linuxboot_dma.bin kvmvapic.bin (-L /fw)
    /tests/vhost-user-iommu, /tests/edu-dma, /tests/nested-l1.sh
    /l2/bzImage, /l2/initrd.gz    the second-level guest
  FILE.l2.gz           the second-level initramfs: busybox, /tests/edu-dma,
                       /tests/nested-l2.sh
USAGE
}

OUT="" TOOLS="" QEMU="" L2K=""
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h) usage; exit 0 ;;
        --out) shift; OUT=${1:?--out needs a file} ;;
        --tools) shift; TOOLS=${1:?--tools needs a directory} ;;
        --qemu) shift; QEMU=${1:?--qemu needs a path} ;;
        --l2-kernel) shift; L2K=${1:?--l2-kernel needs a file} ;;
        *) echo "build-nested-initramfs.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ -n "$OUT" ] && [ -n "$TOOLS" ] || { usage >&2; exit 2; }

say() { echo "build-nested-initramfs: $*" >&2; }
die() { say "error: $*"; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
GUEST=$HERE/../../qemu-tests/guest

[ -n "$QEMU" ] || QEMU=$("$HERE/../qemu/build-qemu.sh" --print-path) ||
    die "the patched QEMU is not built (scripts/qemu/build-qemu.sh)"
[ -n "$L2K" ] || L2K=$("$HERE/../kernel/build-minimal-kernel.sh" --print-path) ||
    die "the minimal kernel is not built (scripts/kernel/build-minimal-kernel.sh)"
for f in "$QEMU" "$L2K" "$TOOLS/edu-dma" "$TOOLS/vhost-user-iommu" \
    "$GUEST/nested-l1.sh" "$GUEST/nested-l2.sh"; do
    [ -f "$f" ] || die "missing: $f"
done

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

"$HERE/build-initramfs.sh" --no-modules --out "$OUT.l2.gz" \
    --add "$TOOLS/edu-dma" --add "$GUEST/nested-l2.sh" >/dev/null

strip -o "$STAGE/qemu-system-x86_64" "$QEMU"
set -- --add "$STAGE/qemu-system-x86_64:/usr/bin/qemu-system-x86_64"
# ldd prints "name => /path (addr)" for libraries and "/path (addr)" for
# the loader; vdso has no path.
for lib in $(ldd "$QEMU" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    set -- "$@" --add "$lib:$lib"
done
for fw in /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin \
    /usr/share/qemu/kvmvapic.bin; do
    [ -f "$fw" ] || die "no firmware $fw (apt-get install seabios qemu-system-data)"
    set -- "$@" --add "$fw:/fw/$(basename "$fw")"
done
"$HERE/build-initramfs.sh" --no-modules --out "$OUT" "$@" \
    --add "$TOOLS/vhost-user-iommu" --add "$TOOLS/edu-dma" --add "$GUEST/nested-l1.sh" \
    --add "$L2K:/l2/bzImage" --add "$OUT.l2.gz:/l2/initrd.gz" >/dev/null
say "wrote $OUT ($(du -k "$OUT" | cut -f1) KiB; second level $(du -k "$OUT.l2.gz" | cut -f1) KiB)"
echo "$OUT"
