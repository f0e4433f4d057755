#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Test 1: the virtio-iommu driver binds, the endpoints get IOMMU groups, and
# each group's reserved_regions shows the MSI window the device reported.
sleep 1
dmesg | grep -i 'virtio_iommu' | sed 's/^/VUI-LOG /'
dmesg | grep -qi 'virtio_iommu virtio[0-9]*: ' || { echo "VUI-FAIL driver did not probe"; exit 1; }
# vui.msi=START-LAST (as reserved_regions prints them): the machine's window;
# default x86's.
want="$(echo "${VUI_MSI:-0x00000000fee00000-0x00000000feefffff}" | tr '-' ' ') msi"
found=0
for g in /sys/kernel/iommu_groups/*; do
    [ -d "$g" ] || continue
    devs=$(ls "$g/devices" | tr '\n' ' ')
    echo "VUI-GROUP $(basename "$g"): $devs"
    sed "s/^/VUI-RESV $(basename "$g"): /" "$g/reserved_regions"
    if grep -q "$want" "$g/reserved_regions"; then
        found=$((found + 1))
    fi
done
echo "VUI-CHECK groups-with-msi=$found ($want)"
[ "$found" -gt 0 ] || { echo "VUI-FAIL no group reports the MSI window"; exit 1; }
