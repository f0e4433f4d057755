#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build the minimal x86_64 kernel: the nested test bed's second-level guest,
# and the pass-through bed's kernel without transparent huge pages (the
# iommufd conformance suite runs on it too). Under nested TCG every
# instruction counts: this kernel boots in about a second under
# single-level TCG, Debian's in about six.
set -eu

usage() {
    cat <<USAGE
usage: scripts/kernel/build-minimal-kernel.sh [--help] [--print-path] [--force] [--jobs N]

Builds from Debian's linux-source-6.12 (scripts/kernel/lib.sh, shared with
scripts/kernel/build-iommufd-kernel.sh): make allnoconfig, the options common
to the test kernels merged on top, make bzImage; no modules, no transparent
huge pages. Caches
  \${XDG_CACHE_HOME:-\$HOME/.cache}/vhost-user-iommu/kernel-min/<version>-<config-hash>/bzImage
(and vmlinux beside it, for a PVH boot without decompression). A second run
prints the cached path at once. The path is the last line on stdout.
After a build only the 3 most recently used builds stay (VUI_CACHE_KEEP=N; 0 keeps
all).

  --print-path   print the cached bzImage path (fail if not built) and exit
  --force        rebuild even if cached
  --jobs N       parallel build jobs (default: number of CPUs + 1)
Measured on 2 cores: about 4.5 minutes cold.
USAGE
}

NAME=build-minimal-kernel
CACHE_DIR=kernel-min
ABOUT="about 4.5 min on 2 cores"
# shellcheck source=scripts/kernel/lib.sh
. "$(dirname "$0")/lib.sh"
kernel_args "$@"
OPTIONS=$KERNEL_BASE_OPTIONS
kernel_build
