#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build a busybox initramfs for the guest tests.
set -eu

usage() {
    cat <<USAGE
usage: scripts/guest/build-initramfs.sh --out FILE [--kernel-dir DIR | --no-modules]
                                        [--add SRC[:DEST]]... [--with-fio]
                                        [--arch amd64|arm64] [--help]

Builds a gzip'd cpio initramfs: a static busybox (Debian's busybox-static of
--arch, default amd64, fetched with apt-get download and cached), the kernel
modules of --kernel-dir (default: scripts/guest/fetch-kernel.sh --arch ARCH
--print-path) loaded in their order,
extra files (--add, e.g. test scripts or static test programs; DEST defaults
to /tests/<name>), with --with-fio Debian's fio and the libraries it loads
(scripts/guest/fetch-fio.sh, about 30 MiB more; /usr/bin/fio), and an /init
that:
  - mounts proc, sysfs, devtmpfs, tmpfs on /tmp, loads the modules;
  - runs /tests/<NAME> for the kernel parameter vui.test=NAME (it gets the
    rest of the command line's vui.* parameters in its environment as
    VUI_<KEY>=VALUE), else prints a short system summary;
  - prints "VUI-GUEST-DONE rc=<exit status>" and powers off.
scripts/guest/run-guest.sh boots it and exits with that status.
USAGE
}

OUT="" KDIR="" NOMOD=0 ADDS="" FIO=0 ARCH=amd64
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h) usage; exit 0 ;;
        --out) shift; OUT=${1:?--out needs a file} ;;
        --kernel-dir) shift; KDIR=${1:?--kernel-dir needs a directory} ;;
        --no-modules) NOMOD=1 ;;
        --add) shift; ADDS="$ADDS ${1:?--add needs SRC[:DEST]}" ;;
        --with-fio) FIO=1 ;;
        --arch) shift; ARCH=${1:?--arch needs amd64 or arm64} ;;
        *) echo "build-initramfs.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ -n "$OUT" ] || { usage >&2; exit 2; }
case "$ARCH" in
    amd64|arm64) ;;
    *) echo "build-initramfs.sh: --arch must be amd64 or arm64" >&2; exit 2 ;;
esac

say() { echo "build-initramfs: $*" >&2; }
die() { say "error: $*"; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-iommu/guest
# Steps that may run for minutes say what they are at every 30 s.
# shellcheck source=scripts/lib/progress.sh
. "$HERE/../lib/progress.sh"

# busybox, cached (this machine's architecture in busybox/, another in busybox-ARCH/, its
# package lists in a private apt state: scripts/lib/apt-sources.sh).
BBDIR=$ROOT/busybox APT_OPTS=
if [ "$ARCH" != "$(dpkg --print-architecture)" ]; then
    . "$HERE/../lib/apt-sources.sh"
    BBDIR=$ROOT/busybox-$ARCH
    APT_OPTS=$(foreign_apt_options "$ROOT/apt-$ARCH" "$ARCH")
fi
BUSYBOX=$BBDIR/busybox
if [ ! -x "$BUSYBOX" ]; then
    mkdir -p "$BBDIR"
    say "downloading busybox-static ($ARCH)"
    # shellcheck disable=SC2086 # options, one word each
    if ! (cd "$BBDIR" && apt-get $APT_OPTS download -q "busybox-static:$ARCH" >&2); then
        # shellcheck disable=SC2086
        [ -n "$APT_OPTS" ] && progress_with "build-initramfs: apt-get update" : apt-get $APT_OPTS update -qq
        # shellcheck disable=SC2086
        (cd "$BBDIR" && apt-get $APT_OPTS download -q "busybox-static:$ARCH" >&2)
    fi
    tmp=$(mktemp -d)
    dpkg-deb -x "$(ls -t "$BBDIR"/busybox-static_*.deb | head -n1)" "$tmp"
    cp "$tmp/bin/busybox" "$BUSYBOX.tmp"
    rm -rf "$tmp"
    mv "$BUSYBOX.tmp" "$BUSYBOX"
fi
command -v cpio >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cpio >/dev/null

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/dev" "$STAGE/proc" "$STAGE/sys" "$STAGE/tmp" "$STAGE/etc" \
    "$STAGE/lib/modules" "$STAGE/tests"
cp "$BUSYBOX" "$STAGE/bin/busybox"
ln -s busybox "$STAGE/bin/sh"
mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || true
: >"$STAGE/etc/modules.order"
if [ "$NOMOD" = 0 ]; then
    [ -n "$KDIR" ] || KDIR=$("$HERE/fetch-kernel.sh" --arch "$ARCH" --print-path) ||
        die "no guest kernel: run scripts/guest/fetch-kernel.sh --arch $ARCH"
    cp "$KDIR"/modules/*.ko "$STAGE/lib/modules/"
    cp "$KDIR/modules.order" "$STAGE/etc/modules.order"
fi
if [ "$FIO" = 1 ]; then
    FIO_TREE=$("$HERE/fetch-fio.sh") || die "scripts/guest/fetch-fio.sh failed"
    [ -x "$FIO_TREE/usr/bin/fio" ] || die "fetch-fio.sh gave no usr/bin/fio"
    cp -a "$FIO_TREE/." "$STAGE/"
fi
for spec in $ADDS; do
    src=${spec%%:*}
    dest=${spec#*:}
    [ "$dest" = "$spec" ] && dest=/tests/$(basename "$src")
    [ -e "$src" ] || die "--add: no such file: $src"
    mkdir -p "$STAGE$(dirname "$dest")"
    cp "$src" "$STAGE$dest"
done

cat >"$STAGE/init" <<'INIT'
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "VUI-UP $(cut -d' ' -f1 /proc/uptime)"
# insmod, unlike modprobe, does not read MODULE.PARAM=VALUE from the kernel
# command line: pass those on by hand.
for m in $(cat /etc/modules.order); do
    name=$(basename "$m" .ko | tr - _)
    opts=
    for p in $(cat /proc/cmdline); do
        case "$p" in
            "$name".*=*) opts="$opts ${p#"$name".}" ;;
        esac
    done
    # shellcheck disable=SC2086 # one word per option
    insmod "/lib/modules/$m" $opts || echo "VUI: insmod $m failed"
done
# vui.KEY=VALUE kernel parameters become VUI_KEY=VALUE in the environment.
for p in $(cat /proc/cmdline); do
    case "$p" in
        vui.*=*) k=${p%%=*}; k=${k#vui.}; export "VUI_$(echo "$k" | tr a-z.- A-Z__)=${p#*=}" ;;
    esac
done
rc=0
if [ -n "${VUI_TEST:-}" ]; then
    if [ -x "/tests/$VUI_TEST" ]; then
        "/tests/$VUI_TEST"
        rc=$?
    else
        echo "VUI: no test /tests/$VUI_TEST"
        rc=127
    fi
else
    echo "VUI: kernel $(uname -r); no vui.test given"
    dmesg | grep -iE 'iommu|viot' | head -n 20
    for g in /sys/kernel/iommu_groups/*; do
        [ -d "$g" ] && echo "VUI: group $(basename "$g"): $(ls "$g/devices" | tr '\n' ' ')"
    done
fi
echo "VUI-GUEST-DONE rc=$rc"
sync
# arm64's PL011 console may still be sending the last lines when the machine
# powers off (seen: the status line lost): let it drain.
[ -c /dev/ttyAMA0 ] && sleep 0.5
poweroff -f
INIT
chmod +x "$STAGE/init" "$STAGE"/tests/* 2>/dev/null || true

mkdir -p "$(dirname "$OUT")"
pack() { (cd "$STAGE" && find . | sort | cpio -o -H newc --quiet -R 0:0) | gzip -1 >"$OUT.tmp"; }
packed() { echo "$(du -sm "$OUT.tmp" 2>/dev/null | cut -f1) MiB written"; }
progress_with "build-initramfs: packing $(du -sm "$STAGE" | cut -f1) MiB" packed pack
mv "$OUT.tmp" "$OUT"
say "wrote $OUT ($(du -k "$OUT" | cut -f1) KiB)"
echo "$OUT"
