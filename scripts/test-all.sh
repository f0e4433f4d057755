#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Run every test tier of vhost-user-iommu, from a fresh machine:
#   1. the Rust workspace (unit, conformance, property and daemon integration tests);
#   2. the QEMU guest tests (qemu-tests/, through scripts/qemu-tests.sh),
#      unless --rust-only.
# Each tier says when it is skipped, and why.
set -eu

usage() {
    cat <<'USAGE'
usage: scripts/test-all.sh [--help] [--rust-only]

Runs all test tiers of the workspace. Needs cargo on PATH (install Rust with
rustup first); tier 2 builds or fetches what it needs (patched QEMU, guest
kernels) the first time, see scripts/qemu-tests.sh --help.

  --rust-only   run only the Rust workspace tests (no QEMU guest tier)
USAGE
}

rust_only=0
for arg in "$@"; do
    case "$arg" in
        --help|-h) usage; exit 0 ;;
        --rust-only) rust_only=1 ;;
        *) echo "test-all.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "test-all.sh: cargo not found; install Rust (rustup) first" >&2
    exit 1
fi

echo "== tier 1: cargo test --workspace"
start=$(date +%s)
cargo test --workspace --locked
echo "== tier 1 passed in $(( $(date +%s) - start )) s"

if [ "$rust_only" = 1 ]; then
    echo "== tier 2 (QEMU guest tests): skipped: --rust-only"
    exit 0
fi

echo "== tier 2: QEMU guest tests (scripts/qemu-tests.sh)"
scripts/qemu-tests.sh
