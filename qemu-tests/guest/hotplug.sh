#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Memory hot-plug under DMA through the vIOMMU: a pattern is written to the
# virtio-blk disk once; every round onlines any memory block the harness
# hot-added (as ZONE_MOVABLE, which user-memory allocations try first, so
# the next reads' buffers land in the new memory), reads the pattern back
# through the vIOMMU with O_DIRECT (the disk DMAs straight into dd's
# buffer) and compares. The harness adds a DIMM
# after a few rounds and removes it (ACPI eject: the kernel offlines it) a
# few rounds later; QEMU sends the daemon a new memory table each time.
ROUNDS=${VUI_ROUNDS:-40}
sleep 1
[ -b /dev/vda ] || { echo "VUI-FAIL no /dev/vda"; exit 1; }
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
want=$(md5sum /tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of=/dev/vda bs=1M count=8 conv=fsync 2>/dev/null || { echo "VUI-FAIL write"; exit 1; }
movable() {
    awk '/^Node .* zone +Movable/ { m = 1; next } /^Node/ { m = 0 } m && / present / { print $2; exit }' /proc/zoneinfo
}
i=0
while [ "$i" -lt "$ROUNDS" ]; do
    onlined=0
    for s in /sys/devices/system/memory/memory*/state; do
        if [ "$(cat "$s")" = offline ]; then
            echo online_movable >"$s" 2>/dev/null && onlined=$((onlined + 1))
        fi
    done
    [ "$onlined" = 0 ] || echo "VUI-LOG onlined $onlined memory blocks; movable pages $(movable)"
    got=$(dd if=/dev/vda iflag=direct bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || { echo "VUI-FAIL round $i: data differs"; exit 1; }
    echo "VUI-ROUND $i ok movable=$(movable) memtotal=$(awk '/MemTotal/ { print $2 }' /proc/meminfo)"
    i=$((i + 1))
    sleep 0.3
done
echo "VUI-CHECK hotplug rounds=$ROUNDS"
