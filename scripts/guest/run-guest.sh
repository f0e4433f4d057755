#!/bin/sh
# Boot a test guest under TCG and report the status its init printed.
set -eu

usage() {
    cat <<USAGE
usage: scripts/guest/run-guest.sh --initrd FILE [--kernel FILE] [--qemu PATH]
                                  [--append ARGS] [--memory SIZE] [--timeout SECS]
                                  [--log FILE] [--reboot] [--help] [-- EXTRA-QEMU-ARGS...]

Boots q35 under TCG (this machine's KVM does not boot stock kernels) with
-nodefaults -no-reboot, console on ttyS0, the given kernel (default:
the cached Debian kernel of fetch-kernel.sh) and initramfs, plus EXTRA-QEMU-ARGS.
--reboot leaves -no-reboot out: a guest reboot or a system_reset on the
monitor then boots the machine again instead of ending QEMU.
The guest's output goes to stdout (and --log). Exits with the status of the
guest's "VUI-GUEST-DONE rc=N" line, or 124 on timeout, 125 if the line is missing.
QEMU defaults to the project's patched build (scripts/qemu/build-qemu.sh
--print-path), else qemu-system-x86_64 on PATH.
USAGE
}

HERE=$(cd "$(dirname "$0")" && pwd)
QEMU="" KERNEL="" INITRD="" APPEND="" MEM=1G TIMEOUT=300 LOG="" NO_REBOOT=-no-reboot
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
        --) shift; break ;;
        *) echo "run-guest.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ -n "$INITRD" ] || { usage >&2; exit 2; }
if [ -z "$QEMU" ]; then
    QEMU=$("$HERE/../qemu/build-qemu.sh" --print-path 2>/dev/null) || QEMU=qemu-system-x86_64
fi
if [ -z "$KERNEL" ]; then
    KERNEL=$("$HERE/fetch-kernel.sh" --print-path)/vmlinuz
fi
[ -n "$LOG" ] || LOG=$(mktemp)

set +e
# -nodefaults: q35's default AHCI CD-ROM makes SeaBIOS wait out a 32 s
# command timeout under TCG before it boots the kernel.
# shellcheck disable=SC2086 # $NO_REBOOT: one word, or none with --reboot
timeout --foreground "$TIMEOUT" "$QEMU" -M q35 -accel tcg -smp 2 -m "$MEM" \
    -nodefaults -display none -serial stdio $NO_REBOOT \
    -L /usr/share/seabios -L /usr/share/qemu \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1 loglevel=4 edd=off $APPEND" "$@" </dev/null 2>&1 | tee "$LOG"
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
