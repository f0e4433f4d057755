#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Install the vhost-user-iommu daemon, its QEMU vhost-user.json entry, its
# manual page, the example systemd units and the licences.
set -eu

usage() {
    cat <<'USAGE'
usage: scripts/install.sh [--help] [--prefix DIR] [--destdir DIR] [--bin FILE]

Builds the daemon in release mode (unless --bin names one already built) and
installs, under PREFIX (default /usr/local; packagers add --destdir):

  PREFIX/libexec/vhost-user-iommu                       the daemon
  PREFIX/share/qemu/vhost-user/50-vhost-user-iommu.json what QEMU's management
                                                        layers read (its binary
                                                        is the path above)
  PREFIX/share/man/man8/vhost-user-iommu.8              the manual page
  PREFIX/lib/systemd/system/vhost-user-iommu@.socket    example units (socket
  PREFIX/lib/systemd/system/vhost-user-iommu@.service   activation, confined)
  PREFIX/share/doc/vhost-user-iommu/                    README, CHANGELOG, licences

Running it again installs the same files again. The patched QEMU is built
separately: scripts/qemu/build-qemu.sh --help.
USAGE
}

prefix=/usr/local
destdir=
bin=
while [ $# -gt 0 ]; do
    case "$1" in
    --help | -h) usage; exit 0 ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
    --bin) bin=${2:?--bin needs a file}; shift 2 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
if [ -z "$bin" ]; then
    echo "== building the daemon (cargo build --release)"
    cargo build --release --locked -p vhost-user-iommu
    bin=target/release/vhost-user-iommu
fi
[ -x "$bin" ] || { echo "install.sh: $bin is not an executable" >&2; exit 1; }

root=$destdir$prefix
daemon=$prefix/libexec/vhost-user-iommu
doc=$root/share/doc/vhost-user-iommu

install -D -m 0755 "$bin" "$root/libexec/vhost-user-iommu"
mkdir -p "$root/share/qemu/vhost-user" "$root/share/man/man8" \
    "$root/lib/systemd/system" "$doc"
sed "s|/usr/libexec/vhost-user-iommu|$daemon|" backend/share/50-vhost-user-iommu.json \
    >"$root/share/qemu/vhost-user/50-vhost-user-iommu.json"
"$bin" --print-man-page >"$root/share/man/man8/vhost-user-iommu.8"
for unit in vhost-user-iommu@.socket vhost-user-iommu@.service; do
    sed "s|/usr/libexec/vhost-user-iommu|$daemon|" "backend/share/systemd/$unit" \
        >"$root/lib/systemd/system/$unit"
done
install -m 0644 README.md CHANGELOG.md LICENSE-APACHE LICENSE-BSD-3-Clause "$doc/"
echo "installed vhost-user-iommu under $root"
