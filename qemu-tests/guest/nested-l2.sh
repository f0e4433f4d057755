#!/bin/sh
# The nested test bed's second-level guest (minimal kernel): its two edu
# devices are the first level's, given to it by the patched QEMU's vfio-pci
# behind vhost-user-iommu. edu-dma drives them through guest VFIO type1, so
# every MAP/UNMAP goes guest virtio-iommu -> daemon -> QEMU -> first-level
# VFIO -> the first level's intel-iommu.
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
