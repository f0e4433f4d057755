#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The nested test bed's second-level guest (minimal kernel): its two edu
# devices are the first level's, given to it by the patched QEMU's vfio-pci
# behind vhost-user-iommu. edu-dma drives them through guest VFIO type1, so
# every MAP/UNMAP goes guest virtio-iommu -> daemon -> QEMU -> first-level
# VFIO -> the first level's intel-iommu.
#
# Then, on the second device, what guest VFIO cannot show: bypass identity
# (its group switched to an identity domain: Linux 6.12 sends ATTACH with
# VIRTIO_IOMMU_ATTACH_F_BYPASS) and detach (the device removed from Linux:
# viommu_release_device sends DETACH, the only DETACH 6.12 sends). The first
# level runs the daemon with --bypass false, so a detached endpoint is
# blocked (virtio 1.2 §5.13.5).
fail() { echo "VUI-FAIL $*"; exit 1; }
echo "VUI-LOG nested-l2 userspace at $(cut -d' ' -f1 /proc/uptime) s (kernel $(uname -r))"
dmesg | grep -iE 'virtio_iommu|viot' | sed 's/^/VUI-LOG l2 dmesg: /'
echo 1234 11e8 >/sys/bus/pci/drivers/vfio-pci/new_id || fail "vfio-pci new_id"
set --
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ] && set -- "$@" "$(basename "$d")"
done
[ $# = 2 ] || fail "want two edu devices, found: $*"
for bdf in "$@"; do
    echo "VUI-LOG l2 edu $bdf group $(basename "$(readlink /sys/bus/pci/devices/"$bdf"/iommu_group)")"
done
# Output is printed afterwards: fault lines may interleave on the console.
/tests/edu-dma suite "$1" "$2" >/tmp/suite.out 2>&1
rc=$?
cat /tmp/suite.out
/tests/edu-dma rates "$1" >/tmp/rates.out 2>&1 || rc=1
cat /tmp/rates.out
echo "VUI-LOG nested-l2 suite done at $(cut -d' ' -f1 /proc/uptime) s"

# Bypass identity: no driver, and a group type change (allowed only then:
# drivers/iommu/iommu.c iommu_group_store_type) to an identity domain.
B=$2 BDEV=/sys/bus/pci/devices/$2
GROUP=/sys/kernel/iommu_groups/$(basename "$(readlink "$BDEV/iommu_group")")
# The virtio-iommu endpoint ID of a PCI device is its requester ID.
bus=$(echo "$B" | cut -d: -f2) slot=$(echo "$B" | cut -d: -f3 | cut -d. -f1)
EP=$(printf '0x%x' $((0x$bus * 256 + 0x$slot * 8 + ${B##*.})))
echo "$B" >/sys/bus/pci/drivers/vfio-pci/unbind || fail "unbinding $B from vfio-pci"
echo "VUI-LOG nested-l2 $B (endpoint $EP) group $(basename "$GROUP"): $(cat "$GROUP/type") -> identity"
echo identity >"$GROUP/type" || fail "$GROUP/type identity"
/tests/edu-dma identity "$B" >/tmp/identity.out 2>&1 || rc=1
cat /tmp/identity.out
# Detach: sysfs remove releases the device from the IOMMU core, and the
# driver's release_device sends DETACH. Its DMA is then started through
# /dev/mem: its sysfs files are gone with it.
BAR0=$(head -n1 "$BDEV/resource" | cut -d' ' -f1)
echo "VUI-LOG nested-l2 removing $B (endpoint $EP, BAR0 $BAR0): DETACH"
echo 1 >"$BDEV/remove" || fail "removing $B"
/tests/edu-dma detached "$BAR0" >/tmp/detached.out 2>&1 || rc=1
cat /tmp/detached.out
echo "VUI-LOG nested-l2 identity and detach done at $(cut -d' ' -f1 /proc/uptime) s"
# Last: a mapping held while the first level stops the daemon. edu-dma
# keeps its container open (closing it would send UNMAPs to a vIOMMU
# that is gone); the guest powers off around it.
# Its lines go to the console as they come: the first level waits for them.
/tests/edu-dma hold "$1" 2>&1 | tee /tmp/hold.out &
i=0
while ! grep -q 'VUI-CHECK nested-vanished' /tmp/hold.out && [ "$i" -lt 2400 ]; do
    sleep 0.1
    i=$((i + 1))
done
grep -q 'VUI-CHECK nested-vanished-viommu-unmaps ok' /tmp/hold.out || rc=1
exit "$rc"
