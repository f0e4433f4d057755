#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build caches that do not grow for ever. A cache root (e.g.
# ~/.cache/vhost-user-iommu/qemu) holds one directory per build,
# <version>-<hash>; every change of a patch series or a kernel config adds
# one. Each is stamped when used, and after a build only the few most
# recently used builds of its kind stay.
#
# Usage (sourced):  . scripts/lib/cache.sh
#   cache_used DIR
#       The cached build DIR was used now (touches DIR/.used).
#   cache_prune ROOT MARK KEEP_DIR
#       Of the directories of ROOT that hold MARK (a path relative to each,
#       naming one kind of build: bin/qemu-system-x86_64, bzImage), keeps
#       KEEP_DIR and the most recently used others, $VUI_CACHE_KEEP in all
#       (default 3), and removes the rest, a line on stderr for each. A build
#       never stamped counts as used when MARK was written. VUI_CACHE_KEEP=0
#       keeps everything. Call it holding the cache's build lock.
set -eu

cache_used() {
    touch "$1/.used" 2>/dev/null || true
}

# "SECONDS DIR" per build of the kind, newest use first.
cache_builds_by_use() {
    for _cb_dir in "$1"/*/; do
        _cb_dir=${_cb_dir%/}
        [ -e "$_cb_dir/$2" ] || continue
        if [ -e "$_cb_dir/.used" ]; then
            _cb_at=$(stat -c %Y "$_cb_dir/.used")
        else
            _cb_at=$(stat -c %Y "$_cb_dir/$2")
        fi
        echo "$_cb_at $_cb_dir"
    done | sort -rn
}

cache_prune() {
    _cp_keep=${VUI_CACHE_KEEP:-3}
    case $_cp_keep in
        '' | *[!0-9]*)
            echo "cache: VUI_CACHE_KEEP must be a number of builds, not '$_cp_keep'" >&2
            return 1
            ;;
    esac
    [ "$_cp_keep" -gt 0 ] || return 0
    # KEEP_DIR is one of the kept.
    _cp_left=$((_cp_keep - 1))
    cache_builds_by_use "$1" "$2" | while read -r _cp_at _cp_dir; do
        [ "$_cp_dir" != "${3%/}" ] || continue
        if [ "$_cp_left" -gt 0 ]; then
            _cp_left=$((_cp_left - 1))
            continue
        fi
        echo "cache: removing $_cp_dir (last used $(date -u -d "@$_cp_at" "+%Y-%m-%d %H:%M UTC"); VUI_CACHE_KEEP=$_cp_keep)" >&2
        rm -rf "$_cp_dir"
    done
}
