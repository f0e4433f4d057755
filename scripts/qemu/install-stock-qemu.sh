#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Install Debian's stock qemu-system-x86 (no project patches): the QEMU of
# the pass-through test bed, which needs only intel-iommu and edu.
set -eu

usage() {
    cat <<USAGE
usage: scripts/qemu/install-stock-qemu.sh [--print-path] [--help]

Installs Debian's qemu-system-x86 with apt from <codename>-backports (the same
suite as the QEMU source the project patches, so its firmware package matches),
unless it is installed already, and prints the binary's path as the last line.

  --print-path   print the path if it is installed (status 1 if not); install nothing
USAGE
}

PRINT=0
for arg in "$@"; do
    case "$arg" in
        --help|-h) usage; exit 0 ;;
        --print-path) PRINT=1 ;;
        *) echo "install-stock-qemu.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

BIN=/usr/bin/qemu-system-x86_64
installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' qemu-system-x86 2>/dev/null || true)" = installed ] &&
        [ -x "$BIN" ]
}

if installed; then
    echo "$BIN"
    exit 0
fi
[ "$PRINT" -eq 0 ] || exit 1
[ "$(id -u)" -eq 0 ] || { echo "install-stock-qemu: need root to install qemu-system-x86" >&2; exit 1; }

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/lib/progress.sh
. "$HERE/../lib/progress.sh"
. "$HERE/../lib/apt-sources.sh"
ensure_backports_sources
echo "install-stock-qemu: installing qemu-system-x86 from $(debian_codename)-backports" >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -t "$(debian_codename)-backports" qemu-system-x86 >&2
installed || { echo "install-stock-qemu: qemu-system-x86 did not install" >&2; exit 1; }
echo "$BIN"
