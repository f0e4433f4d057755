#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Tier 2: the real-QEMU, real-Linux-guest tests (qemu-tests/).
set -eu

usage() {
    cat <<USAGE
usage: scripts/qemu-tests.sh [--help] [TEST-NAME-FILTER]

Builds (or reuses the cache of) the patched QEMU (scripts/qemu/build-qemu.sh,
~4 min cold), fetches the Debian guest kernel (scripts/guest/fetch-kernel.sh) and
builds the iommufd guest kernel of the pass-through test bed
(scripts/kernel/build-iommufd-kernel.sh, ~3.5 min cold; the test bed runs on
Debian's stock QEMU, scripts/qemu/install-stock-qemu.sh) and the minimal
kernel of the nested test bed's second-level guest
(scripts/kernel/build-minimal-kernel.sh, ~3.5 min cold), then runs the guest
tests of qemu-tests/ in release mode, one guest at a time. The nested test bed
(qemu-tests/tests/nested.rs, ~1.5 min a path under nested TCG) is skipped, with a
message saying so, when VUI_NESTED=0 is in the environment. The arm64 tier
(qemu-tests/tests/arm64.rs: the virt machine, qemu-system-aarch64 from
scripts/qemu/build-qemu.sh --target aarch64, ~2.5 min cold, and Debian's arm64
kernel from scripts/guest/fetch-kernel.sh --arch arm64) is skipped likewise
with VUI_ARM64=0.
Each test boots the guest behind QEMU's virtio-iommu-pci and behind
vhost-user-iommu (a few seconds per boot under TCG). Without a filter, a
smoke run of the guest benchmark follows (guest-bench --quick, ~1.5 min).
USAGE
}
case "${1:-}" in --help|-h) usage; exit 0 ;; esac

cd "$(dirname "$0")/.."
echo "== qemu-tests: QEMU"
scripts/qemu/build-qemu.sh >/dev/null
echo "== qemu-tests: guest kernel"
scripts/guest/fetch-kernel.sh >/dev/null
echo "== qemu-tests: Debian's stock QEMU (pass-through test bed)"
scripts/qemu/install-stock-qemu.sh >/dev/null
echo "== qemu-tests: iommufd guest kernel (pass-through test bed; ~3.5 min the first time)"
scripts/kernel/build-iommufd-kernel.sh >/dev/null
echo "== qemu-tests: minimal kernel (nested test bed's second level; ~3.5 min the first time)"
scripts/kernel/build-minimal-kernel.sh >/dev/null
if [ "${VUI_ARM64:-1}" = 0 ]; then
    echo "== qemu-tests: arm64 tier skipped (VUI_ARM64=0): no aarch64 QEMU, no arm64 kernel"
else
    echo "== qemu-tests: QEMU aarch64 (arm64 tier; ~2.5 min the first time)"
    scripts/qemu/build-qemu.sh --target aarch64 >/dev/null
    echo "== qemu-tests: arm64 guest kernel"
    scripts/guest/fetch-kernel.sh --arch arm64 >/dev/null
fi
echo "== qemu-tests: Debian's DPDK testpmd (vhost-user net test; it skips where apt has none)"
scripts/dpdk/fetch-testpmd.sh >/dev/null || echo "qemu-tests: no DPDK testpmd: the vhost-user net test skips"
echo "== qemu-tests: guests"
VUI_QEMU_TESTS=1 cargo test --release --locked -p qemu-tests -- --test-threads=1 --nocapture "$@"
if [ $# -eq 0 ]; then
    # A smoke run of the guest benchmark (a benchmark is not a test: its
    # figures are printed, not checked; it fails only if a guest does).
    echo "== qemu-tests: guest benchmark smoke (guest-bench --quick)"
    cargo run --release --locked -p qemu-tests --bin guest-bench -- --quick
fi
