#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Test 5: an endpoint leaves its domain and comes back, and the disk works
# after each step. Linux 6.12's virtio-iommu driver sends
#   - ATTACH when the group's domain changes (unbind the driver, write the
#     group's sysfs `type`, bind again): DMA -> identity -> DMA, and
#   - DETACH when the device is released (PCI remove); a rescan probes it
#     again (PROBE, ATTACH to a fresh domain, MAPs).
# A driver unbind alone keeps the default domain, so sends nothing.
sleep 1
fail() { echo "VUI-FAIL $*"; exit 1; }
dev=$(basename "$(readlink -f /sys/block/vda/device/..)")
[ -n "$dev" ] || fail "no vda"
echo "VUI-LOG disk is $dev"
group() { basename "$(readlink "/sys/bus/pci/devices/$dev/iommu_group")"; }

retype() {
    echo "$dev" >/sys/bus/pci/drivers/virtio-pci/unbind || fail "unbind"
    sleep 1
    [ -b /dev/vda ] && fail "vda still there after unbind"
    echo "$1" >"/sys/kernel/iommu_groups/$(group)/type" || fail "group type $1"
    echo "$dev" >/sys/bus/pci/drivers/virtio-pci/bind || fail "bind"
    sleep 1
    [ -b /dev/vda ] || fail "vda did not come back"
    echo "VUI-LOG group $(group) type now $(cat "/sys/kernel/iommu_groups/$(group)/type")"
    VUI_MIB=8 /tests/dma.sh || exit 1
}
retype identity
retype DMA

echo 1 >"/sys/bus/pci/devices/$dev/remove" || fail "remove"
sleep 1
[ -e "/sys/bus/pci/devices/$dev" ] && fail "$dev still there after remove"
echo "VUI-LOG removed $dev"
echo 1 >/sys/bus/pci/rescan || fail "rescan"
sleep 1
[ -b /dev/vda ] || fail "vda did not come back after rescan"
echo "VUI-LOG rescanned: group $(group) type $(cat "/sys/kernel/iommu_groups/$(group)/type")"
VUI_MIB=8 /tests/dma.sh
