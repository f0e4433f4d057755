#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Fetch Debian's DPDK testpmd with the vhost-user net PMD, unpacked into a cache.
#
# See --help. POSIX sh; progress goes to stderr, the wrapper's path to stdout (last line).
set -eu

usage() {
    cat <<USAGE
usage: scripts/dpdk/fetch-testpmd.sh [--help] [--print-path]

Fetches Debian's DPDK (dpdk-testpmd from dpdk-dev, the vhost-user net PMD
librte-net-vhost23 and the ring mempool librte-mempool-ring23) with
apt-get download, with the libraries they need that this machine lacks, and
unpacks them under
  \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/dpdk/<version>-r<recipe>/
    root/        the unpacked packages
    pmds/        the two drivers testpmd needs (plugins in Debian's build)
    bin/dpdk-testpmd   a wrapper: the unpacked libraries, the drivers
                       preloaded, then your arguments (EAL arguments first,
                       as for testpmd)
The drivers are preloaded (LD_PRELOAD: their constructors register them)
rather than given to EAL with -d, which refuses a plugin directory below a
world-writable one: a cache under /tmp would otherwise fail at start.
Nothing is installed system-wide: installing dpdk-dev would pull rdma-core,
hence udev and a systemd upgrade, into a machine that only runs tests.
The wrapper's path is the last line on stdout. A second run reuses the cache.
If apt knows no dpdk-dev (no Debian sources, or another distribution), it
fails saying so: the DPDK guest test then says it skipped.

  --print-path   print the wrapper's path if it is fetched, else fail
USAGE
}

PRINT=0
for a in "$@"; do
    case "$a" in
        --help|-h) usage; exit 0 ;;
        --print-path) PRINT=1 ;;
        *) echo "fetch-testpmd.sh: unknown argument $a" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "fetch-testpmd: $*" >&2; }
die() { say "error: $*"; exit 1; }
# Steps that may run for minutes say what they are at every 30 s.
# shellcheck source=scripts/lib/progress.sh
. "$(dirname "$0")/../lib/progress.sh"

ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-iommu/dpdk
# The PMDs testpmd needs besides what dpdk-dev depends on (they are plugins).
PMDS="librte-net-vhost23 librte-mempool-ring23"

VERSION=$(apt-cache policy dpdk-dev 2>/dev/null | awk '/Candidate:/ {print $2}')
case $VERSION in
    ''|'(none)') die "apt knows no dpdk-dev (Debian's DPDK); nothing to fetch" ;;
esac
# The wrapper's recipe: a new one is a new cache entry (2: drivers preloaded).
RECIPE=2
OUT=$ROOT/$(echo "$VERSION" | tr -c 'A-Za-z0-9.+\n-' _)-r$RECIPE
WRAPPER=$OUT/bin/dpdk-testpmd

if [ -f "$OUT/.complete" ]; then
    [ "$PRINT" = 1 ] || say "cached: dpdk $VERSION"
    echo "$WRAPPER"
    exit 0
fi
[ "$PRINT" = 1 ] && die "not fetched yet: $OUT"

mkdir -p "$ROOT/downloads"
exec 9>"$ROOT/.lock"
flock 9

# What installing them would add to this machine: dpdk-dev's run-time
# dependencies (not its headers, libdpdk-dev) and the PMDs. Upgrades of
# installed packages are left out: the installed versions serve.
DEPS=$(apt-cache show "dpdk-dev=$VERSION" | awk -F': ' '/^Depends:/ {print $2; exit}' |
    tr ',' '\n' | sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g' |
    grep -vx -e libdpdk-dev -e 'python3.*' -e '')
# shellcheck disable=SC2086 # one word per package
PKGS="dpdk-dev $(apt-get install -s -q --no-install-recommends $DEPS $PMDS 2>/dev/null |
    awk '$1 == "Inst" && $3 !~ /^\[/ {print $2}' | grep -E '^(lib|ibverbs-providers$)' || true)"
echo "$PKGS" | grep -q librte-net-vhost23 || die "apt would not install $PMDS"
say "downloading dpdk $VERSION: $(echo "$PKGS" | wc -w) packages"
# shellcheck disable=SC2086
download() { cd "$ROOT/downloads" && apt-get download -qq $PKGS >&2; }
downloaded() { progress_size "$ROOT/downloads"; }
progress_with "fetch-testpmd: downloading" downloaded download || die "apt-get download failed"

WORK=$(mktemp -d "$ROOT/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/root" "$WORK/pmds" "$WORK/bin"
unpack() {
    for p in $PKGS; do
        deb=$(ls -t "$ROOT/downloads/${p}"_*.deb 2>/dev/null | head -n1)
        [ -n "$deb" ] || die "no download of $p"
        dpkg-deb -x "$deb" "$WORK/root"
    done
}
unpacked() { progress_size "$WORK/root"; }
progress_with "fetch-testpmd: unpacking" unpacked unpack
LIBDIR=$(find "$WORK/root/usr/lib" -maxdepth 1 -type d -name '*-linux-gnu' | head -n1)
[ -n "$LIBDIR" ] || die "no multiarch library directory in the packages"
for d in net_vhost mempool_ring; do
    so=$(find "$LIBDIR/dpdk" -name "librte_$d.so.*" | head -n1)
    [ -n "$so" ] || die "no librte_$d in the packages"
    # Relative, so the cache may move.
    ln -s "../${so#"$WORK"/}" "$WORK/pmds/librte_$d.so"
done
[ -x "$WORK/root/usr/bin/dpdk-testpmd" ] || die "dpdk-dev has no usr/bin/dpdk-testpmd"
LIBREL=${LIBDIR#"$WORK"/}
cat >"$WORK/bin/dpdk-testpmd" <<WRAP
#!/bin/sh
# Debian's dpdk-testpmd $VERSION from its unpacked packages (scripts/dpdk/fetch-testpmd.sh).
set -eu
D=\$(cd "\$(dirname "\$0")/.." && pwd)
LD_LIBRARY_PATH=\$D/$LIBREL:\$D/$LIBREL/dpdk/pmds-23.0\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
LD_PRELOAD="\$D/pmds/librte_net_vhost.so \$D/pmds/librte_mempool_ring.so\${LD_PRELOAD:+ \$LD_PRELOAD}"
export LD_PRELOAD
exec "\$D/root/usr/bin/dpdk-testpmd" "\$@"
WRAP
chmod +x "$WORK/bin/dpdk-testpmd"
LD_LIBRARY_PATH=$LIBDIR ldd "$WORK/root/usr/bin/dpdk-testpmd" | grep 'not found' >&2 &&
    die "dpdk-testpmd misses libraries"
touch "$WORK/.complete"
rm -rf "$OUT"
mv "$WORK" "$OUT"
trap - EXIT
say "dpdk $VERSION unpacked in $OUT"
echo "$WRAPPER"
