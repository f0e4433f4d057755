#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The iommufd conformance suite alone, on a kernel built without transparent
# huge pages (the nested test bed's minimal kernel): the model of such a
# kernel against it, with an edu device on vfio-pci for the device cases.
fail() { echo "VUI-FAIL $*"; exit 1; }
sleep 1
thp=no
[ -d /sys/kernel/mm/transparent_hugepage ] && thp=yes
echo "VUI-LOG kernel $(uname -r), transparent huge pages: $thp"
[ -c /dev/iommu ] || fail "no /dev/iommu (is this a kernel with IOMMUFD?)"
echo 1234 11e8 >/sys/bus/pci/drivers/vfio-pci/new_id || fail "vfio-pci new_id"
sleep 1
set -- /dev/vfio/devices/vfio*
[ -c "$1" ] || fail "no VFIO cdev for the edu device"
/tests/iopt-conformance --device "$1" >/tmp/conformance.out 2>&1
crc=$?
cat /tmp/conformance.out
echo "VUI-CHECK conformance-rc $crc"
[ "$crc" = 0 ]
