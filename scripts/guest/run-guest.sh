#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Boot a test guest under TCG and report the status its init printed.
set -eu

usage() {
    cat <<USAGE
usage: scripts/guest/run-guest.sh --initrd FILE [--kernel FILE] [--qemu PATH]
                                  [--append ARGS] [--memory SIZE] [--timeout SECS]
                                  [--log FILE] [--reboot] [--arch amd64|arm64] [--help]
                                  [-- EXTRA-QEMU-ARGS...]

Boots q35 under TCG (this machine's KVM does not boot stock kernels) with
-nodefaults -no-reboot, console on ttyS0, the given kernel (default:
the cached Debian kernel of fetch-kernel.sh) and initramfs, plus EXTRA-QEMU-ARGS.
With --arch arm64: the arm64 "virt" machine instead (-M virt,gic-version=3
-cpu max under TCG, the kernel booted directly from its device tree, console
on ttyAMA0), QEMU scripts/qemu/build-qemu.sh --target aarch64 and the kernel of
fetch-kernel.sh --arch arm64.
--reboot leaves -no-reboot out: a guest reboot or a system_reset on the
monitor then boots the machine again instead of ending QEMU.
The guest's output goes to stdout (and --log). Exits with the status of the
guest's "VUI-GUEST-DONE rc=N" line, or 124 on timeout, 125 if the line is missing.
QEMU defaults to the project's patched build (scripts/qemu/build-qemu.sh
--print-path), else qemu-system-x86_64 (qemu-system-aarch64) on PATH.
USAGE
}

HERE=$(cd "$(dirname "$0")" && pwd)
QEMU="" KERNEL="" INITRD="" APPEND="" MEM=1G TIMEOUT=300 LOG="" NO_REBOOT=-no-reboot ARCH=amd64
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h) usage; exit 0 ;;
        --qemu) shift; QEMU=$1 ;;
        --kernel) shift; KERNEL=$1 ;;
        --initrd) shift; INITRD=$1 ;;
        --append) shift; APPEND=$1 ;;
        --memory) shift; MEM=$1 ;;
        --timeout) shift; TIMEOUT=$1 ;;
        --log) shift; LOG=$1 ;;
        --reboot) NO_REBOOT="" ;;
        --arch) shift; ARCH=$1 ;;
        --) shift; break ;;
        *) echo "run-guest.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ -n "$INITRD" ] || { usage >&2; exit 2; }
case "$ARCH" in
    amd64) QEMU_TARGET=x86_64 ;;
    arm64) QEMU_TARGET=aarch64 ;;
    *) echo "run-guest.sh: --arch must be amd64 or arm64" >&2; exit 2 ;;
esac
if [ -z "$QEMU" ]; then
    QEMU=$("$HERE/../qemu/build-qemu.sh" --target "$QEMU_TARGET" --print-path 2>/dev/null) ||
        QEMU=qemu-system-$QEMU_TARGET
fi
if [ -z "$KERNEL" ]; then
    KERNEL=$("$HERE/fetch-kernel.sh" --arch "$ARCH" --print-path)/vmlinuz
fi
[ -n "$LOG" ] || LOG=$(mktemp)

set +e
# -nodefaults: q35's default AHCI CD-ROM makes SeaBIOS wait out a 32 s
# command timeout under TCG before it boots the kernel.
# arm64: GICv3 with its ITS (the MSI doorbell virtio-iommu reports), any CPU
# feature TCG has; pauth-impdef=on: the pointer-authentication hash TCG
# computes fast (QEMU's docs), the architected one costs boot time.
if [ "$ARCH" = arm64 ]; then
    set -- -M virt,gic-version=3 -cpu max,pauth-impdef=on "$@"
    CONSOLE="console=ttyAMA0"
else
    set -- -M q35 -L /usr/share/seabios -L /usr/share/qemu "$@"
    CONSOLE="console=ttyS0 edd=off"
fi
# shellcheck disable=SC2086 # $NO_REBOOT: one word, or none with --reboot
timeout --foreground "$TIMEOUT" "$QEMU" -accel tcg -smp 2 -m "$MEM" \
    -nodefaults -display none -serial stdio $NO_REBOOT \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "$CONSOLE panic=-1 loglevel=4 $APPEND" "$@" </dev/null 2>&1 | tee "$LOG"
status=$?
set -e
rc=$(sed -n 's/.*VUI-GUEST-DONE rc=\([0-9]*\).*/\1/p' "$LOG" | tail -n1)
if [ -n "$rc" ]; then
    exit "$rc"
fi
if grep -q "Terminated\|timeout" "$LOG" || [ "$status" = 124 ]; then
    echo "run-guest: timed out after $TIMEOUT s" >&2
    exit 124
fi
echo "run-guest: the guest did not report its status" >&2
exit 125
