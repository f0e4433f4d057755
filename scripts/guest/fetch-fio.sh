#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Fetch Debian's fio with every shared library it loads, as a tree to put
# into a guest initramfs (build-initramfs.sh --with-fio), and cache it.
set -eu

usage() {
    cat <<USAGE
usage: scripts/guest/fetch-fio.sh [--help] [--print-path]

Downloads the fio package apt offers (apt-get download), extracts it with
dpkg-deb, and lays out a root tree with the binary, every shared library
ldd reports for it (at the path ldd resolved) and the dynamic loader:
  \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/fio/<version>/root/
    usr/bin/fio  lib/x86_64-linux-gnu/*.so.*  lib64/ld-linux-x86-64.so.2 ...
The libraries are the host's: when ldd cannot resolve them all for the
extracted binary, the same fio package is installed on the host (apt-get
install, which pulls them in). The tree is the last line on stdout; a second
run reuses it. Debian's fio links the rbd, rados, gluster and pmem engines
in, so the tree is about 80 MiB (about 30 MiB in a gzip'd initramfs).

  --print-path   print the tree if it is complete, else fail
USAGE
}

PRINT=0
for a in "$@"; do
    case "$a" in
        --help|-h) usage; exit 0 ;;
        --print-path) PRINT=1 ;;
        *) echo "fetch-fio.sh: unknown argument $a" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "fetch-fio: $*" >&2; }
die() { say "error: $*"; exit 1; }
# Steps that may run for minutes say what they are at every 30 s.
# shellcheck source=scripts/lib/progress.sh
. "$(dirname "$0")/../lib/progress.sh"

ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-iommu/fio
VERSION=$(apt-cache policy fio 2>/dev/null | awk '/Candidate:/ { print $2 }')
case "$VERSION" in
    ""|"(none)") die "apt offers no fio package" ;;
esac
OUT=$ROOT/$(echo "$VERSION" | tr ':' '_')

if [ -f "$OUT/.complete" ]; then
    [ "$PRINT" = 1 ] || say "cached: fio $VERSION"
    echo "$OUT/root"
    exit 0
fi
[ "$PRINT" = 1 ] && die "not fetched yet: $OUT"

mkdir -p "$ROOT/downloads"
exec 9>"$ROOT/.lock"
flock 9
DEB=$ROOT/downloads/fio_$(echo "$VERSION" | sed 's/^[0-9]*://')_amd64.deb
if [ ! -f "$DEB" ]; then
    say "downloading fio $VERSION"
    download() { cd "$ROOT/downloads" && apt-get download -q "fio=$VERSION" >&2; }
    downloaded() { progress_size "$ROOT/downloads"; }
    progress_with "fetch-fio: downloading" downloaded download
fi
[ -f "$DEB" ] || die "apt-get download left no $DEB"

WORK=$(mktemp -d "$ROOT/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
dpkg-deb -x "$DEB" "$WORK/deb"
BIN=$WORK/deb/usr/bin/fio
[ -x "$BIN" ] || die "the package has no usr/bin/fio"

if ldd "$BIN" | grep -q 'not found'; then
    say "the host lacks fio's libraries: installing fio $VERSION on the host"
    install_fio() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "fio=$VERSION" >/dev/null
    }
    progress_with "fetch-fio: installing fio and its libraries" : install_fio
fi
missing=$(ldd "$BIN" | awk '/not found/ { print $1 }' | tr '\n' ' ')
[ -z "$missing" ] || die "libraries still missing after installing fio: $missing"

TREE=$WORK/root
mkdir -p "$TREE/usr/bin"
cp "$BIN" "$TREE/usr/bin/fio"
# "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" and the
# loader as "/lib64/ld-linux-x86-64.so.2 (0x...)": copy each file (not its
# symlink) to the path the loader looks for.
ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
    while read -r lib; do
        mkdir -p "$TREE$(dirname "$lib")"
        cp -L "$lib" "$TREE$lib"
    done
[ -f "$TREE/lib64/ld-linux-x86-64.so.2" ] || die "ldd named no dynamic loader"

rm -rf "$OUT"
mkdir -p "$OUT"
mv "$TREE" "$OUT/root"
echo "$VERSION" >"$OUT/version"
touch "$OUT/.complete"
say "fio $VERSION: $(find "$OUT/root" -type f | wc -l) files, $(du -sm "$OUT/root" | cut -f1) MiB"
echo "$OUT/root"
