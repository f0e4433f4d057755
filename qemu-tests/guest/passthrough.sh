#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The pass-through test bed (needs the iommufd kernel of
# scripts/kernel/build-iommufd-kernel.sh, an intel-iommu and two edu
# devices). First the conformance suite, model against the kernel's
# iommufd; then the daemon in iommufd mode with the edu devices as its
# endpoints, driven by the Rust test front-end (guest-tools passthrough).
fail() { echo "VUI-FAIL $*"; exit 1; }
sleep 1
echo "VUI-LOG kernel $(uname -r)"
[ -c /dev/iommu ] || fail "no /dev/iommu (is this the iommufd kernel?)"
echo 1234 11e8 >/sys/bus/pci/drivers/vfio-pci/new_id || fail "vfio-pci new_id"
sleep 1
ls /dev/vfio/devices | sed 's/^/VUI-LOG vfio cdev: /'
set -- /dev/vfio/devices/vfio*
[ -c "$1" ] || fail "no VFIO cdev for the edu devices"

# The daemon's own command line on the real kernel: it starts in iommufd
# mode, a second daemon for the same device is refused with a hint, and
# SIGTERM ends the first cleanly.
/tests/vhost-user-iommu --mode iommufd --vfio "1=$1" --socket-path /tmp/cli.sock >/tmp/cli.out 2>&1 &
daemon=$!
i=0
while [ ! -S /tmp/cli.sock ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if /tests/vhost-user-iommu --mode iommufd --vfio "1=$1" --socket-path /tmp/cli2.sock >/tmp/cli2.out 2>&1; then
    echo "VUI-CHECK cli-second-daemon-refused NO"
else
    sed 's/^/VUI-LOG second daemon: /' /tmp/cli2.out
    grep -q 'hint:' /tmp/cli2.out && echo "VUI-CHECK cli-second-daemon-refused ok"
fi
kill -TERM "$daemon"
wait "$daemon"
drc=$?
sed 's/^/VUI-LOG daemon: /' /tmp/cli.out
grep -q 'Iommufd mode' /tmp/cli.out && [ "$drc" = 0 ] && echo "VUI-CHECK cli-iommufd-mode ok"

# Output is collected and printed afterwards: the kernel logs DMA faults on
# the console while the programs print.
/tests/iopt-conformance --device "$1" >/tmp/conformance.out 2>&1
crc=$?
cat /tmp/conformance.out
echo "VUI-CHECK conformance-rc $crc"

/tests/passthrough >/tmp/passthrough.out 2>&1
prc=$?
cat /tmp/passthrough.out

dmesg | grep -i 'dmar' | grep -i 'fault' | head -n 8 | sed 's/^/VUI-LOG dmesg: /'
if dmesg | grep -i 'dmar' | grep -qi 'fault'; then
    echo "VUI-CHECK pt-fault-logged yes"
else
    echo "VUI-CHECK pt-fault-logged NO"
    prc=1
fi
[ "$crc" = 0 ] && [ "$prc" = 0 ]
