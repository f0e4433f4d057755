#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Test 2/3: DMA through the vIOMMU: write 64 MiB of a pattern to the
# virtio-blk disk, drop the caches, read it back, compare checksums.
MIB=${VUI_MIB:-64}
sleep 1
dmesg | grep -E 'virtio_iommu|iommu group|DMA domain' | sed 's/^/VUI-LOG dmesg: /'
echo "VUI-LOG iommu cmdline: $(tr ' ' '\n' </proc/cmdline | grep '^iommu' | tr '\n' ' ')"
[ -b /dev/vda ] || { echo "VUI-FAIL no /dev/vda"; exit 1; }
grp=$(readlink /sys/block/vda/device/../iommu_group 2>/dev/null || readlink /sys/block/vda/device/iommu_group 2>/dev/null)
echo "VUI-LOG vda iommu group: ${grp:-none}"
[ -f "/sys/kernel/iommu_groups/$(basename "${grp:-x}")/type" ] &&
    echo "VUI-LOG group type: $(cat "/sys/kernel/iommu_groups/$(basename "$grp")/type")"
dd if=/dev/urandom of=/tmp/pattern bs=1M count="$MIB" 2>/dev/null
want=$(md5sum /tmp/pattern | cut -d' ' -f1)
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/tmp/pattern of=/dev/vda bs=1M count="$MIB" conv=fsync 2>/dev/null || { echo "VUI-FAIL write"; exit 1; }
sync
echo 3 >/proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M count="$MIB" 2>/dev/null | md5sum | cut -d' ' -f1)
end=$(cut -d' ' -f1 /proc/uptime)
echo "VUI-CHECK md5 wrote=$want read=$got ($MIB MiB, ${start}s..${end}s uptime)"
[ "$want" = "$got" ] || { echo "VUI-FAIL data differs"; exit 1; }
