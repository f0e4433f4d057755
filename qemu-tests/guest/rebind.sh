#!/bin/sh
# Test 5: unbind the disk's driver (the driver detaches the endpoint) and
# bind it again (attach); the disk must work afterwards.
sleep 1
dev=$(basename "$(readlink -f /sys/block/vda/device/..)")
[ -n "$dev" ] || { echo "VUI-FAIL no vda"; exit 1; }
echo "VUI-LOG disk is $dev"
echo "$dev" >/sys/bus/pci/drivers/virtio-pci/unbind || { echo "VUI-FAIL unbind"; exit 1; }
sleep 1
[ -b /dev/vda ] && { echo "VUI-FAIL vda still there"; exit 1; }
echo "$dev" >/sys/bus/pci/drivers/virtio-pci/bind || { echo "VUI-FAIL bind"; exit 1; }
sleep 1
[ -b /dev/vda ] || { echo "VUI-FAIL vda did not come back"; exit 1; }
VUI_MIB=8 /tests/dma.sh
