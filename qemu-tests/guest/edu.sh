#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Test 4: guest userspace VFIO. The edu device, behind the vIOMMU, is bound
# to vfio-pci; edu-dma maps a buffer through VFIO type1, runs DMA both ways,
# unmaps, and checks that a DMA to the unmapped IOVA wrote nothing. The
# vIOMMU's fault event must reach the guest driver (it logs it).
sleep 1
echo 1234 11e8 >/sys/bus/pci/drivers/vfio-pci/new_id || { echo "VUI-FAIL vfio-pci new_id"; exit 1; }
sleep 1
ls /dev/vfio | sed 's/^/VUI-LOG vfio: /'
# The fault is logged on the console while edu-dma prints: keep its lines
# whole by printing them afterwards.
/tests/edu-dma >/tmp/edu-dma.out 2>&1
rc=$?
cat /tmp/edu-dma.out
sleep 1
dmesg | grep -i 'fault' | sed 's/^/VUI-LOG dmesg: /'
if dmesg | grep -qi 'virtio_iommu.*fault from EP'; then
    echo "VUI-CHECK fault-reported yes"
else
    echo "VUI-CHECK fault-reported NO"
    [ "$rc" = 0 ] && rc=1
fi
exit "$rc"
