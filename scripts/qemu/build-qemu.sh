#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build QEMU (x86_64-softmmu, or aarch64-softmmu) with the vhost-user-iommu patch series and
# cache it.
#
# See --help. POSIX sh; progress goes to stderr, the binary's path to stdout (last line).
set -eu

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
PATCH_DIR=${VUI_QEMU_PATCH_DIR:-$SCRIPT_DIR/patches}
CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-iommu/qemu
JOBS=${VUI_QEMU_JOBS:-2}
TARGET=${VUI_QEMU_TARGET:-x86_64}
# The QEMU series the patches are written against: only orig tarballs of it are accepted.
QEMU_SERIES=10.0

# Everything that changes the binary besides the source and the patches: part of the cache key.
# Set after the arguments (--target); one build, and one cache entry, per target.
configure_flags() {
    echo "--target-list=$TARGET-softmmu --without-default-features --enable-kvm \
--enable-tcg --enable-vhost-user --enable-vhost-net --enable-fdt=system --disable-install-blobs --disable-docs \
--disable-werror --disable-download${DEVICES_MAK:+ --without-default-devices --with-devices-$TARGET=vui-tests}"
}
# aarch64's default device set is every 32- and 64-bit Arm board QEMU has; the tests use
# only `virt` and the PCI devices below (written to configs/devices/aarch64-softmmu/
# vui-tests.mak before configure; part of the cache key). Without default devices,
# minikconf turns every "default y" (and "imply") off: each device is named here.
devices_mak() {
    case $TARGET in
        aarch64) cat <<'MAK'
CONFIG_ARM_VIRT=y
CONFIG_PCIE_PORT=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_NET=y
CONFIG_VIRTIO_IOMMU=y
CONFIG_VHOST_USER_IOMMU=y
CONFIG_EDU=y
MAK
        ;;
    esac
}
BUILD_DEPS="ninja-build gcc make pkg-config python3 python3-venv libglib2.0-dev \
libpixman-1-dev libfdt-dev flex bison bzip2 xz-utils patch ccache"
# Too old or missing in <codename> itself: taken from <codename>-backports.
BACKPORTS_BUILD_DEPS="meson python3-pycotap"
# Needed at run time: libraries, and the firmware given with -L /usr/share/seabios -L /usr/share/qemu.
RUN_DEPS="libglib2.0-0 libpixman-1-0 libfdt1 seabios qemu-system-data"

usage() {
    cat <<EOF
Usage: scripts/qemu/build-qemu.sh [--target x86_64|aarch64] [--print-path] [--force]
                                  [--keep-build] [--help]

Builds qemu-system-x86_64 (or, with --target aarch64, qemu-system-aarch64: the arm64 "virt"
machine and the PCI devices the tests use, no other board) from Debian's QEMU $QEMU_SERIES.x orig tarball (source package
"qemu" from <codename>-backports, fetched with apt-get source), with the patch series in
scripts/qemu/patches/ applied, and caches it under
  \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/qemu/<version>-<patch-hash>/
        bin/qemu-system-<target>, stamp
(each target a build and a cache entry of its own: the configure flags are in the key).
A run whose source version and patches (and configure flags) are already built does
nothing but print the cached path. The path of the binary is the last line on stdout;
all progress goes to stderr.

Installs with apt (as root): the build dependencies (meson >= 1.5 from backports, ninja,
glib, pixman, libfdt, python3-pycotap, ccache, ...) and the firmware packages
seabios + qemu-system-data. Run the binary with:
  qemu-system-x86_64 -L /usr/share/seabios -L /usr/share/qemu ...
qemu-system-aarch64 boots a kernel directly (-M virt -kernel ...) and needs no firmware.

Options:
  --target T     x86_64 (default) or aarch64
  --print-path   print the cached binary's path for the current source + patches and
                 exit (status 1 if it is not built yet); builds nothing
  --force        rebuild even if the cache has this build
  --keep-build   keep the build tree (\$cache/work/...) after a successful build
  --help         this text

Environment:
  XDG_CACHE_HOME        cache root (default \$HOME/.cache)
  VUI_QEMU_JOBS         parallel compile jobs (default 2; the build runs under nice -n 10)
  VUI_QEMU_SUITE        apt suite of the qemu source (default <codename>-backports)
  VUI_QEMU_PATCH_DIR    patch series directory (default scripts/qemu/patches)
  VUI_QEMU_EXTRA_PATCHES  patch files applied after the series, separated by spaces (the
                        experiments in scripts/qemu/experiments/; part of the cache key)
  VUI_CACHE_KEEP        after a build, keep this many builds of the target, the most
                        recently used (default 3; 0 keeps all)
  VUI_QEMU_TARGET       the default of --target
EOF
}

say() { printf 'build-qemu: %s\n' "$*" >&2; }
die() { printf 'build-qemu: error: %s\n' "$*" >&2; exit 1; }

PRINT_PATH=0 FORCE=0 KEEP_BUILD=0
while [ $# -gt 0 ]; do
    case $1 in
        --help|-h) usage; exit 0 ;;
        --print-path) PRINT_PATH=1 ;;
        --force) FORCE=1 ;;
        --keep-build) KEEP_BUILD=1 ;;
        --target) shift; TARGET=${1:-} ;;
        --target=*) TARGET=${1#--target=} ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
case $TARGET in
    x86_64|aarch64) ;;
    *) die "--target must be x86_64 or aarch64, not '$TARGET'" ;;
esac
DEVICES_MAK=$(devices_mak)
CONFIGURE_FLAGS=$(configure_flags)

. "$REPO_ROOT/scripts/lib/apt-sources.sh"
# Steps that run for minutes say what they are at every 30 s.
# shellcheck source=scripts/lib/progress.sh
. "$REPO_ROOT/scripts/lib/progress.sh"
# shellcheck source=scripts/lib/cache.sh
. "$REPO_ROOT/scripts/lib/cache.sh"
CODENAME=$(debian_codename)
SUITE=${VUI_QEMU_SUITE:-$CODENAME-backports}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else die "need root for: $*"; fi
}

# Packages of the list that are not installed (dpkg-query, no network).
missing_pkgs() {
    miss=
    for p in "$@"; do
        st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [ "$st" = installed ] || miss="$miss $p"
    done
    echo "$miss"
}

# meson >= 1.5 is only in backports on bookworm.
meson_ok() {
    v=$(meson --version 2>/dev/null || echo 0)
    major=${v%%.*}; rest=${v#*.}; minor=${rest%%.*}
    [ "$major" -gt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -ge 5 ]; }
}

install_pkgs() {
    # $1: what for; $2: target release or "-"; rest: packages
    what=$1 release=$2; shift 2
    miss=$(missing_pkgs "$@")
    if [ -n "$miss" ]; then
        say "installing $what packages:$miss"
        if [ "$release" = - ]; then
            # shellcheck disable=SC2086
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q $miss >&2
        else
            # shellcheck disable=SC2086
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q -t "$release" $miss >&2
        fi
    fi
}

# ---------------------------------------------------------------------------------------------
# 1. Patch series hash (patches + configure flags + this script's build recipe version).
RECIPE_VERSION=1
patch_list() {
    [ -d "$PATCH_DIR" ] || return 0
    find "$PATCH_DIR" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort
}
PATCHES=$(patch_list)
# Experiments applied after the series (scripts/qemu/experiments/): part of the key.
for p in ${VUI_QEMU_EXTRA_PATCHES:-}; do
    [ -f "$p" ] || die "VUI_QEMU_EXTRA_PATCHES: no such file: $p"
    PATCHES="$PATCHES
$(cd "$(dirname "$p")" && pwd)/$(basename "$p")"
done
PATCH_HASH=$({
    echo "recipe $RECIPE_VERSION"
    echo "configure $CONFIGURE_FLAGS"
    [ -z "$DEVICES_MAK" ] || echo "devices $DEVICES_MAK"
    for p in $PATCHES; do basename "$p"; cat "$p"; done
} | sha256sum | cut -c1-12)

# ---------------------------------------------------------------------------------------------
# 2. Source version: the orig tarball apt would fetch for qemu/$SUITE.
if [ "$PRINT_PATH" -eq 0 ]; then
    ensure_backports_sources
fi
URIS=$(cd /tmp && apt-get source --print-uris "qemu/$SUITE" 2>/dev/null | grep "\.orig\.tar\." || true)
[ -n "$URIS" ] || die "apt knows no source package qemu/$SUITE (deb-src of $SUITE missing? run without --print-path once)"
ORIG_FILE=$(echo "$URIS" | head -n1 | awk '{print $2}')
ORIG_SIZE=$(echo "$URIS" | head -n1 | awk '{print $3}')
ORIG_SHA=$(echo "$URIS" | head -n1 | awk '{print $4}' | sed 's/^SHA256://')
# qemu_10.0.2+ds.orig.tar.xz -> 10.0.2+ds
SRC_VERSION=$(echo "$ORIG_FILE" | sed -e 's/^qemu_//' -e 's/\.orig\.tar\..*$//')
UPSTREAM_VERSION=${SRC_VERSION%%+*}
case $UPSTREAM_VERSION in
    "$QEMU_SERIES".*) ;;
    *) die "qemu/$SUITE is $UPSTREAM_VERSION; the patches are for $QEMU_SERIES.x (set VUI_QEMU_SUITE)" ;;
esac

BUILD_ID=$SRC_VERSION-$PATCH_HASH
OUT_DIR=$CACHE_ROOT/$BUILD_ID
BIN=$OUT_DIR/bin/qemu-system-$TARGET
STAMP=$OUT_DIR/stamp

cached() { [ -f "$STAMP" ] && [ -x "$BIN" ]; }

if [ "$PRINT_PATH" -eq 1 ]; then
    cached || die "not built yet: $BIN (run scripts/qemu/build-qemu.sh)"
    cache_used "$OUT_DIR"
    echo "$BIN"
    exit 0
fi

# Run-time packages are checked on every run (cheap, no network when all are present).
# shellcheck disable=SC2086
install_pkgs run-time - $RUN_DEPS

if cached && [ "$FORCE" -eq 0 ]; then
    say "cached: QEMU $SRC_VERSION with patches $PATCH_HASH ($(echo "$PATCHES" | grep -c . || true) patches)"
    cache_used "$OUT_DIR"
    echo "$BIN"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 3. Build dependencies.
# shellcheck disable=SC2086
install_pkgs build - $BUILD_DEPS
# shellcheck disable=SC2086
install_pkgs build "$CODENAME-backports" $BACKPORTS_BUILD_DEPS
if ! meson_ok; then
    say "installing meson from $CODENAME-backports (need >= 1.5, have $(meson --version 2>/dev/null || echo none))"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q -t "$CODENAME-backports" meson >&2
    meson_ok || die "meson >= 1.5 still missing"
fi

mkdir -p "$CACHE_ROOT/downloads" "$CACHE_ROOT/work"
# One build at a time per cache (other engineers may run this script concurrently).
exec 9>"$CACHE_ROOT/.lock"
if ! flock -n 9; then
    say "another build holds $CACHE_ROOT/.lock; waiting"
    flock 9
fi
if cached && [ "$FORCE" -eq 0 ]; then
    say "cached (built while waiting): $BIN"
    cache_used "$OUT_DIR"
    echo "$BIN"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 4. Fetch the orig tarball. apt-get source may fail on the .dsc / Debian tarball (404 seen on
#    backports); only the orig tarball matters, checked against apt's SHA256.
TARBALL=$CACHE_ROOT/downloads/$ORIG_FILE
sha_ok() { [ -f "$TARBALL" ] && [ "$(sha256sum "$TARBALL" | cut -d' ' -f1)" = "$ORIG_SHA" ]; }
if ! sha_ok; then
    say "fetching qemu $SRC_VERSION source ($ORIG_SIZE bytes) with apt-get source --download-only"
    fetch_source() { cd "$CACHE_ROOT/downloads" && apt-get source --download-only "qemu/$SUITE" >&2; }
    downloaded() { progress_size "$CACHE_ROOT/downloads"; }
    progress_with "build-qemu: fetching" downloaded fetch_source ||
        say "apt-get source reported errors (the Debian tarball may 404); checking the orig tarball"
    sha_ok || die "orig tarball $ORIG_FILE missing or its SHA256 differs from apt's ($ORIG_SHA)"
fi

# ---------------------------------------------------------------------------------------------
# 5. Extract and patch.
WORK=$CACHE_ROOT/work/$BUILD_ID
rm -rf "$WORK"
mkdir -p "$WORK"
say "extracting $ORIG_FILE"
tar -C "$WORK" --no-same-owner -xf "$TARBALL"
SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n1)
[ -n "$SRC" ] && [ -f "$SRC/VERSION" ] || die "unexpected tarball layout in $WORK"
[ "$(cat "$SRC/VERSION")" = "$UPSTREAM_VERSION" ] || die "VERSION file says $(cat "$SRC/VERSION"), expected $UPSTREAM_VERSION"

n=0
for p in $PATCHES; do
    n=$((n + 1))
    say "applying $(basename "$p")"
    patch -d "$SRC" -p1 --batch --forward --quiet < "$p" >&2 || die "patch $(basename "$p") does not apply to $SRC_VERSION"
done
say "applied $n patch(es); series hash $PATCH_HASH"

# The +ds tarball drops the prebuilt edk2 images; meson wants their .bz2 inputs to exist when
# bzip2 is installed. Empty (valid) bz2 placeholders; we never use edk2 (firmware: SeaBIOS).
for f in aarch64-code arm-code arm-vars riscv-code riscv-vars i386-code i386-secure-code \
         i386-vars x86_64-code x86_64-secure-code loongarch64-code loongarch64-vars; do
    [ -f "$SRC/pc-bios/edk2-$f.fd.bz2" ] || bzip2 -c </dev/null > "$SRC/pc-bios/edk2-$f.fd.bz2"
done

[ -z "$DEVICES_MAK" ] || echo "$DEVICES_MAK" >"$SRC/configs/devices/$TARGET-softmmu/vui-tests.mak"

# ---------------------------------------------------------------------------------------------
# 6. Configure + build (niced; the machine is shared).
BUILD=$SRC/build
mkdir -p "$BUILD"
say "configuring: $CONFIGURE_FLAGS"
START=$(date +%s)
# Their output goes to logs; what they are at comes every 30 s.
# ccache (not part of the cache key: it does not change the binary). Paths are made relative to
# the work tree, so a rebuild after a patch edit, in another work directory, still hits.
CC_ARG=
if command -v ccache >/dev/null 2>&1; then
    CC_ARG="ccache cc"
    CCACHE_DIR=${CCACHE_DIR:-$CACHE_ROOT/ccache}
    CCACHE_BASEDIR=$WORK
    CCACHE_NOHASHDIR=1
    export CCACHE_DIR CCACHE_BASEDIR CCACHE_NOHASHDIR
fi
configure_qemu() {
    # shellcheck disable=SC2086
    cd "$BUILD" && nice -n 10 ../configure --python=/usr/bin/python3 ${CC_ARG:+--cc="$CC_ARG"} \
        $CONFIGURE_FLAGS > configure.log 2>&1
}
progress_with "build-qemu: configuring" : configure_qemu ||
    { tail -n 30 "$BUILD/configure.log" >&2; die "configure failed (log: $BUILD/configure.log)"; }
say "building qemu-system-$TARGET with ninja -j$JOBS (cold: several minutes)"
build_qemu() { cd "$BUILD" && nice -n 10 ninja -j"$JOBS" "qemu-system-$TARGET" > ninja.log 2>&1; }
# ninja's last "[N/M]" status line: N of its M steps done.
ninja_steps() {
    steps=$(grep -o '^\[[0-9]*/[0-9]*\]' "$BUILD/ninja.log" | tail -n 1 | tr -d '[]')
    [ -z "$steps" ] || echo "$steps steps"
}
if ! progress_with "build-qemu: building" ninja_steps build_qemu; then
    grep -E 'error|Error' "$BUILD/ninja.log" | head -n 40 >&2 || true
    die "build failed (log: $BUILD/ninja.log)"
fi
END=$(date +%s)
say "built in $((END - START)) s"

"$BUILD/qemu-system-$TARGET" --version >/dev/null || die "built binary does not run"

# ---------------------------------------------------------------------------------------------
# 7. Install into the cache, atomically.
TMP_OUT=$CACHE_ROOT/.tmp-$BUILD_ID.$$
rm -rf "$TMP_OUT"
mkdir -p "$TMP_OUT/bin"
cp "$BUILD/qemu-system-$TARGET" "$TMP_OUT/bin/"
for p in $PATCHES; do cp "$p" "$TMP_OUT/"; done
{
    echo "qemu_source=$SRC_VERSION"
    echo "orig_tarball=$ORIG_FILE sha256=$ORIG_SHA"
    echo "patch_hash=$PATCH_HASH"
    echo "patches=$(for p in $PATCHES; do printf '%s ' "$(basename "$p")"; done)"
    echo "configure=$CONFIGURE_FLAGS"
    echo "build_seconds=$((END - START))"
    echo "compiler=${CC_ARG:-cc}"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "firmware=-L /usr/share/seabios -L /usr/share/qemu"
} > "$TMP_OUT/stamp"
rm -rf "$OUT_DIR"
mv "$TMP_OUT" "$OUT_DIR"
cache_used "$OUT_DIR"
# Each patch edit is a new entry of about 100 MB: keep the few used last (of this target).
cache_prune "$CACHE_ROOT" "bin/qemu-system-$TARGET" "$OUT_DIR"
if [ "$KEEP_BUILD" -eq 0 ]; then
    rm -rf "$WORK"
else
    say "build tree kept: $BUILD"
fi
say "cached: $OUT_DIR"
echo "$BIN"
