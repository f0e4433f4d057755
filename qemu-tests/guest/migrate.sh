#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Migration: DMA through the vIOMMU keeps verifying while the machine moves
# to a fresh QEMU and a fresh daemon. A pattern is written to the
# virtio-blk disk once; then every round drops the caches, reads it back
# through the vIOMMU and compares. The harness migrates after a few rounds.
ROUNDS=${VUI_ROUNDS:-30}
sleep 1
[ -b /dev/vda ] || { echo "VUI-FAIL no /dev/vda"; exit 1; }
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
want=$(md5sum /tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of=/dev/vda bs=1M count=8 conv=fsync 2>/dev/null || { echo "VUI-FAIL write"; exit 1; }
i=0
while [ "$i" -lt "$ROUNDS" ]; do
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || { echo "VUI-FAIL round $i: data differs"; exit 1; }
    echo "VUI-ROUND $i ok"
    i=$((i + 1))
    sleep 0.3
done
echo "VUI-CHECK migrate rounds=$ROUNDS"
