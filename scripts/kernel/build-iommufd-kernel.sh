#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build the x86_64 kernel of the pass-through and nested test beds' host
# (a guest with an intel-iommu and edu devices): iommufd, VFIO cdev and
# transparent huge pages, built in. Debian's own kernels do not enable
# CONFIG_IOMMUFD.
set -eu

usage() {
    cat <<USAGE
usage: scripts/kernel/build-iommufd-kernel.sh [--help] [--print-path] [--force] [--jobs N]

Builds from Debian's linux-source-6.12 (scripts/kernel/lib.sh, shared with
scripts/kernel/build-minimal-kernel.sh): make allnoconfig, the options common
to the test kernels, and what the test beds' host runs: transparent huge
pages (iommufd's IOVA allocator aligns to a huge page with them, to a page
without: the conformance suite checks both kernels), seccomp filters (the
daemon confines itself), high-resolution timers and a tickless idle (the
nested bed's QEMU). Caches
  \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/kernel/<version>-<config-hash>/bzImage
A second run prints the cached path at once. The path is the last line on stdout.
After a build only the 3 most recently used builds stay (VUI_CACHE_KEEP=N; 0 keeps
all).

  --print-path   print the cached bzImage path (fail if not built) and exit
  --force        rebuild even if cached
  --jobs N       parallel build jobs (default: number of CPUs + 1)
Measured on 2 cores: about 5 minutes cold.
USAGE
}

NAME=build-iommufd-kernel
CACHE_DIR=kernel
ABOUT="about 5 min on 2 cores"
# shellcheck source=scripts/kernel/lib.sh
. "$(dirname "$0")/lib.sh"
kernel_args "$@"
OPTIONS="$KERNEL_BASE_OPTIONS TRANSPARENT_HUGEPAGE SECCOMP SECCOMP_FILTER HIGH_RES_TIMERS
NO_HZ_IDLE INTEL_IOMMU_DEFAULT_ON"
kernel_build
