#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The guest benchmark where the initramfs has no fio (arm64: busybox only):
# busybox dd reads the virtio-blk disk behind the vIOMMU with O_DIRECT, one
# block at a time, for vui.secs=S seconds per job, and prints fio.sh's line
# per job for the host:
#   VUI-FIO job=NAME iops=N kibps=N lat_us=N ios=N
# (lat_us: the mean time per read, one in flight). Jobs: seq4k-qd1 (4 KiB
# reads), seq128k-qd1 (128 KiB reads); vui.jobs=A,B picks some. With
# vui.sync=1 it waits for the host's go before each job and after the last,
# as fio.sh does, on the second serial port (ttyAMA1 on arm64, else ttyS1).
fail() { echo "VUI-FAIL $*"; exit 1; }
SECS=${VUI_SECS:-5}
SYNC=${VUI_SYNC:-0}
JOBS=$(echo "${VUI_JOBS:-seq4k-qd1,seq128k-qd1}" | tr ',' ' ')
[ -b /dev/vda ] || fail "no /dev/vda"
echo "VUI-LOG busybox dd, $(nproc) CPU(s), iommu cmdline: $(tr ' ' '\n' </proc/cmdline | grep '^iommu' | tr '\n' ' ')"
dmesg | grep -E 'virtio_iommu|TLB invalidation' | sed 's/^/VUI-LOG dmesg: /'
grp=$(readlink /sys/block/vda/device/../iommu_group 2>/dev/null)
domain=none
[ -n "$grp" ] && domain=$(cat "/sys/kernel/iommu_groups/$(basename "$grp")/type")
echo "VUI-CHECK vda-domain $domain"

if [ "$SYNC" = 1 ]; then
    tty=/dev/ttyAMA1
    [ -c "$tty" ] || tty=/dev/ttyS1
    [ -c "$tty" ] || fail "vui.sync=1 but no second serial port"
    exec 3<>"$tty"
    stty raw -echo <&3 || fail "stty raw -echo on $tty failed"
fi
sync_point() {
    [ "$SYNC" = 1 ] || return 0
    echo "VUI-READY job=$1 up=$(cut -d' ' -f1 /proc/uptime)"
    read -r _ <&3 || fail "no go from the host for $1"
}

size=$(cat /sys/block/vda/size) # 512-byte sectors
rc=0
for job in $JOBS; do
    case "$job" in
        seq4k-qd1) bs=4096 per=256 ;;
        seq128k-qd1) bs=131072 per=32 ;;
        *) fail "unknown job $job" ;;
    esac
    blocks=$((size * 512 / bs))
    sync_point "$job"
    t0=$(cut -d' ' -f1 /proc/uptime)
    end=$(awk -v t="$t0" -v s="$SECS" 'BEGIN { print t + s }')
    ios=0 off=0 now=$t0
    while :; do
        dd if=/dev/vda of=/dev/null bs=$bs count=$per skip=$off iflag=direct 2>/dev/null ||
            { echo "VUI-FAIL dd $job at block $off"; rc=1; break; }
        ios=$((ios + per))
        off=$(((off + per) % (blocks - per)))
        now=$(cut -d' ' -f1 /proc/uptime)
        awk -v n="$now" -v e="$end" 'BEGIN { exit !(n < e) }' || break
    done
    awk -v job="$job" -v ios="$ios" -v bs="$bs" -v t0="$t0" -v t1="$now" 'BEGIN {
        s = t1 - t0; if (s <= 0) s = 0.01
        printf "VUI-FIO job=%s iops=%.1f kibps=%.0f lat_us=%.1f ios=%d\n", job, ios / s, ios * bs / 1024 / s, s * 1e6 / ios, ios
    }'
done
sync_point end
exit "$rc"
