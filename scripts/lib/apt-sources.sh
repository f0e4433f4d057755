#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Derive extra apt sources from the machine's own Debian source list, so no
# registry host name is ever written into this repository.
#
# Usage (sourced):  . scripts/lib/apt-sources.sh; ensure_backports_sources
# Idempotent: writes /etc/apt/sources.list.d/vhost-user-iommu.sources only
# when its content would change, and runs `apt-get update` only then.
set -eu

VUI_APT_LIST=/etc/apt/sources.list.d/vhost-user-iommu.sources
VUI_DEBIAN_SOURCES=${VUI_DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}

# The URI of the stanza that carries the main Debian suite (not -security).
debian_mirror_uri() {
    awk '
        /^URIs:/   { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /-security$/ && $i !~ /-updates$/) { print uri; exit } }
    ' "$VUI_DEBIAN_SOURCES"
}

debian_codename() {
    . /etc/os-release
    echo "$VERSION_CODENAME"
}

# Adds deb + deb-src for <codename>-backports and deb-src for <codename>.
ensure_backports_sources() {
    uri=$(debian_mirror_uri)
    [ -n "$uri" ] || { echo "apt-sources: no Debian URI found in $VUI_DEBIAN_SOURCES" >&2; return 1; }
    codename=$(debian_codename)
    want=$(cat <<EOT
Types: deb deb-src
URIs: $uri
Suites: $codename-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: $uri
Suites: $codename
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
)
    if [ ! -f "$VUI_APT_LIST" ] || [ "$(cat "$VUI_APT_LIST")" != "$want" ]; then
        printf '%s\n' "$want" > "$VUI_APT_LIST"
        echo "apt-sources: added $codename-backports (deb, deb-src) and $codename (deb-src); updating package lists" >&2
        # With scripts/lib/progress.sh sourced, a line every 30 s.
        if command -v progress_with >/dev/null 2>&1; then
            progress_with "apt-sources: apt-get update" : apt-get update -qq
        else
            apt-get update -qq
        fi
    fi
}

# apt options (one word each) for another architecture's packages, kept in a
# private state under $1 (made here): the machine's own sources, read with
# APT::Architecture=$2, without telling this machine's dpkg about $2. Use as
#   apt-get $(foreign_apt_options DIR arm64) update | download PKG
foreign_apt_options() {
    dir=$1 arch=$2
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    [ -f "$dir/status" ] || : >"$dir/status"
    echo "-o Dir::State::Lists=$dir/lists -o Dir::Cache=$dir/cache" \
        "-o Dir::State::status=$dir/status -o APT::Architecture=$arch" \
        "-o APT::Architectures=$arch -o APT::Sandbox::User=root"
}
