#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The guest benchmark (qemu-tests/src/bin/guest-bench/): fio reads the
# virtio-blk disk behind the vIOMMU with O_DIRECT, one job after another,
# and hands the host fio's JSON output (--output-format=json, with the
# completion latency percentiles 50, 99 and 99.9), one line per job:
#   VUI-FIO-JSON job=NAME {...}
# (fio's JSON with its indentation dropped and its lines joined; the host
# reads read.iops, .bw, .total_ios, .lat_ns.mean, .clat_ns.percentile).
# Kernel parameters: vui.secs=S (per job, default 5), vui.jobs=A,B (default
# all of rand4k-qd1, rand4k-qd32, seq128k-qd1), vui.sync=1 (see below).
# Needs the initramfs of build-initramfs.sh --with-fio.
#
# With vui.sync=1 (guest-bench boots several guests at once and starts
# their jobs together), before each job and once after the last the guest
# prints
#   VUI-READY job=NAME up=S   (NAME = the job, or "end" after the last;
#                              S = the guest's uptime in seconds)
# and waits for a line on its second serial port, /dev/ttyS1, which the
# host writes once every guest is ready. Without it the jobs run back to
# back.
fail() { echo "VUI-FAIL $*"; exit 1; }
SECS=${VUI_SECS:-5}
SYNC=${VUI_SYNC:-0}
JOBS=$(echo "${VUI_JOBS:-rand4k-qd1,rand4k-qd32,seq128k-qd1}" | tr ',' ' ')
FIO=/usr/bin/fio
[ -x "$FIO" ] || fail "no $FIO (build the initramfs with --with-fio)"
[ -b /dev/vda ] || fail "no /dev/vda"
echo "VUI-LOG $($FIO --version), $(nproc) CPU(s), iommu cmdline: $(tr ' ' '\n' </proc/cmdline | grep '^iommu' | tr '\n' ' ')"
dmesg | grep -E 'virtio_iommu|TLB invalidation' | sed 's/^/VUI-LOG dmesg: /'
# The domain of the disk's group: DMA (strict), DMA-FQ (lazy), or none
# without a vIOMMU.
grp=$(readlink /sys/block/vda/device/../iommu_group 2>/dev/null)
domain=none
[ -n "$grp" ] && domain=$(cat "/sys/kernel/iommu_groups/$(basename "$grp")/type")
echo "VUI-CHECK vda-domain $domain"

# The host's go arrives on ttyS1 (QEMU's second -serial): held open on fd 3
# for the whole run, raw and without echo, so that a line the host writes is
# read as it is and nothing goes back to it.
if [ "$SYNC" = 1 ]; then
    [ -c /dev/ttyS1 ] || fail "vui.sync=1 but no /dev/ttyS1"
    (: <>/dev/ttyS1) 2>/dev/null || fail "vui.sync=1 but /dev/ttyS1 does not open (no second serial port?)"
    exec 3<>/dev/ttyS1
    stty raw -echo <&3 || fail "stty raw -echo on /dev/ttyS1 failed"
fi

# Wait for the host's go before $1 (a job, or "end"), with vui.sync=1.
sync_point() {
    [ "$SYNC" = 1 ] || return 0
    echo "VUI-READY job=$1 up=$(cut -d' ' -f1 /proc/uptime)"
    read -r _ <&3 || fail "no go from the host for $1 on /dev/ttyS1"
}

rc=0
for job in $JOBS; do
    case "$job" in
        rand4k-qd1) args="--rw=randread --bs=4k --ioengine=psync --iodepth=1" ;;
        rand4k-qd32) args="--rw=randread --bs=4k --ioengine=libaio --iodepth=32" ;;
        seq128k-qd1) args="--rw=read --bs=128k --ioengine=psync --iodepth=1" ;;
        *) fail "unknown job $job" ;;
    esac
    sync_point "$job"
    # shellcheck disable=SC2086 # one word per option
    $FIO --name="$job" --filename=/dev/vda --readonly --direct=1 $args \
        --time_based --runtime="$SECS" --norandommap --randrepeat=0 \
        --clocksource=clock_gettime --percentile_list=50:99:99.9 \
        --output-format=json --output=/tmp/fio.json >/tmp/fio.out 2>/tmp/fio.err
    frc=$?
    if [ "$frc" != 0 ] || ! grep -q '"jobs"' /tmp/fio.json 2>/dev/null; then
        sed 's/^/VUI-LOG fio: /' /tmp/fio.out /tmp/fio.err /tmp/fio.json 2>/dev/null
        echo "VUI-FAIL fio $job exited $frc"
        rc=1
        continue
    fi
    # The whole JSON on one line of its own, after the job's name.
    printf 'VUI-FIO-JSON job=%s %s\n' "$job" "$(sed 's/^[[:space:]]*//' /tmp/fio.json | tr -d '\n')"
done
sync_point end
exit "$rc"
