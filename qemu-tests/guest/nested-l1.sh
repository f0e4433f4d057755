#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The nested test bed's first level (issue 12): an intel-iommu guest with
# the iommufd kernel and two edu devices on vfio-pci runs the daemon and the
# patched QEMU, whose second-level guest (nested-l2.sh) gets both edu
# devices. VUI_PATH (vui.path=) picks who owns the devices' DMA mappings:
#   qemu-owned    legacy VFIO type1 container in QEMU, fed by the mirror
#                 through QEMU's IOMMU notifiers (daemon in emulated mode)
#   daemon-owned  QEMU binds the devices to its iommufd (iommufd=) and
#                 forwards them to the daemon (--mode iommufd, no --vfio),
#                 whose kernel IOASes carry the guest's mappings
# On both, the daemon runs with --bypass false: Linux 6.12 never writes the
# config's bypass field, and the second level checks that a detached
# endpoint is blocked (with bypass on it would bypass, virtio 1.2 §5.13.5).
# The second level gets 192 MiB, less than the edu device's 28-bit DMA
# reach, so that a bypassing DMA can aim outside its RAM.
fail() { echo "VUI-FAIL $*"; exit 1; }
up() { cut -d' ' -f1 /proc/uptime; }
PATH_KIND=${VUI_PATH:-qemu-owned}
echo "VUI-LOG nested-l1 userspace at $(up) s, path $PATH_KIND"
echo 1234 11e8 >/sys/bus/pci/drivers/vfio-pci/new_id || fail "vfio-pci new_id"
sleep 0.5
set --
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ] && set -- "$@" "$(basename "$d")"
done
[ $# = 2 ] || fail "want two edu devices, found: $*"
EDU1=$1 EDU2=$2
for bdf in "$@"; do
    echo "VUI-LOG l1 edu $bdf group $(basename "$(readlink /sys/bus/pci/devices/"$bdf"/iommu_group)")"
done

case "$PATH_KIND" in
    qemu-owned)
        DAEMON_ARGS="--bypass false"
        VFIO_ARGS="-device vfio-pci,host=$EDU1 -device vfio-pci,host=$EDU2"
        ;;
    daemon-owned)
        [ -c /dev/iommu ] || fail "no /dev/iommu (is this the iommufd kernel?)"
        DAEMON_ARGS="--bypass false --mode iommufd"
        VFIO_ARGS="-object iommufd,id=ifd0 -device vfio-pci,host=$EDU1,iommufd=ifd0
            -device vfio-pci,host=$EDU2,iommufd=ifd0"
        ;;
    *) fail "unknown path $PATH_KIND" ;;
esac

# shellcheck disable=SC2086 # DAEMON_ARGS is a word list
RUST_LOG=info /tests/vhost-user-iommu --socket-path /tmp/vui.sock \
    --mirror-socket /tmp/vui-mirror.sock $DAEMON_ARGS >/tmp/daemon.out 2>&1 &
daemon=$!
i=0
while [ ! -S /tmp/vui.sock ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -S /tmp/vui.sock ] || { cat /tmp/daemon.out; fail "the daemon did not start"; }

faults() { dmesg | grep -i dmar | grep -ci fault; }
f0=$(faults)
MEM=192M
t0=$(up)
# The console file exists before the follower below opens it: QEMU's
# redirection happens in the background job, and busybox `tail -f` gives up
# on a file that is not there yet (the whole second level's output was lost
# that way once).
: >/tmp/l2.out
# shellcheck disable=SC2086 # VFIO_ARGS is a word list
/usr/bin/qemu-system-x86_64 -M q35 -accel tcg -smp 1 -m $MEM -nodefaults \
    -display none -serial stdio -no-reboot -L /fw \
    -object memory-backend-memfd,id=mem,size=$MEM,share=on -numa node,memdev=mem \
    -chardev socket,id=c0,path=/tmp/vui.sock \
    -chardev socket,id=m0,path=/tmp/vui-mirror.sock,reconnect-ms=1000 \
    -device vhost-user-iommu,chardev=c0,mirror=m0 \
    $VFIO_ARGS -trace vhost_user_iommu_attach -trace vhost_user_iommu_detach \
    -kernel /l2/bzImage -initrd /l2/initrd.gz \
    -append "console=ttyS0 panic=-1 loglevel=4 iommu.strict=1 vfio_iommu_type1.allow_unsafe_interrupts=1 vui.test=nested-l2.sh" \
    </dev/null >>/tmp/l2.out 2>&1 &
qemu=$!
# The second level's console, as it comes (its status line renamed: the
# first level's is the one that counts), every line of it: relayed by line
# number until /tmp/l2.done appears, then the rest. (busybox `tail -f`
# looks once a second: killed half a second after QEMU exited, it lost
# the last lines of the second level, the check the test waits for among
# them.)
relay() {
    sent=0
    while :; do
        [ -e /tmp/l2.done ] && last=1 || last=0
        have=$(wc -l </tmp/l2.out)
        if [ "$last" = 1 ]; then
            sed -n "$((sent + 1)),\$p" /tmp/l2.out
            break
        fi
        if [ "$have" -gt "$sent" ]; then
            sed -n "$((sent + 1)),${have}p" /tmp/l2.out
            sent=$have
        fi
        sleep 0.2
    done | sed 's/VUI-GUEST-DONE/L2-GUEST-DONE/; s/^/L2| /'
}
rm -f /tmp/l2.done
relay &
follow=$!

# The held mapping: once the second level holds it, stop the daemon; its
# DMA must stop landing (QEMU drops the mirrored state, unmapping from VFIO).
# Deadlines are on this guest's clock: nested TCG is slow.
deadline=$(echo "$t0" | awk '{print int($1) + 900}')
tu=""
while kill -0 "$qemu" 2>/dev/null && ! grep -q 'nested-hold: mapped' /tmp/l2.out &&
    [ "$(up | cut -d. -f1)" -lt "$deadline" ]; do
    [ -z "$tu" ] && grep -q 'nested-l2 userspace' /tmp/l2.out && tu=$(up) &&
        echo "VUI-LOG nested-l1 QEMU start to L2 userspace: $(echo "$t0 $tu" | awk '{printf "%.1f", $2 - $1}') s"
    sleep 0.2
done
f1=$(faults)
if grep -q 'nested-hold: mapped' /tmp/l2.out; then
    echo "VUI-LOG nested-l1 stopping the daemon at $(up) s"
    kill -TERM "$daemon"
    wait "$daemon"
    echo "VUI-LOG nested-l1 daemon exited $?"
else
    echo "VUI-LOG nested-l1 the second level never held its mapping"
fi
deadline=$(( $(up | cut -d. -f1) + 240 ))
while kill -0 "$qemu" 2>/dev/null && [ "$(up | cut -d. -f1)" -lt "$deadline" ]; do sleep 0.2; done
kill -KILL "$qemu" 2>/dev/null && echo "VUI-LOG nested-l1 QEMU killed (did not exit)"
wait "$qemu"
qrc=$?
t1=$(up)
f2=$(faults)
: >/tmp/l2.done
wait "$follow"
sed 's/^/VUI-LOG daemon: /' /tmp/daemon.out | tail -n 20
echo "VUI-LOG nested-l1 QEMU exited $qrc; second level ran $(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}') s"

rc=0
l2rc=$(sed -n 's/.*VUI-GUEST-DONE rc=\([0-9]*\).*/\1/p' /tmp/l2.out | tail -n1)
echo "VUI-CHECK nested-l2-rc ${l2rc:-none}"
[ "${l2rc:-x}" = 0 ] || rc=1

# The second level's unmapped and read-only DMAs were refused by this
# kernel's IOMMU: DMAR faults at the IOVAs it printed.
dmesg | grep -i dmar | grep -i fault | sed 's/^/VUI-LOG l1 dmesg: /' | head -n 12
echo "VUI-LOG nested-l1 DMAR faults: $f0 before, $f1 after the suite, $f2 at the end"
unmapped=$(sed -n 's/.*DMA to unmapped IOVA 0x\([0-9a-f]*\).*/\1/p' /tmp/l2.out | head -n1)
if [ -n "$unmapped" ] && dmesg | grep -i dmar | grep -i fault -A1 | grep -qi "fault addr 0x$unmapped"; then
    echo "VUI-CHECK nested-l1-dmar-fault-at-unmapped-iova yes"
else
    echo "VUI-CHECK nested-l1-dmar-fault-at-unmapped-iova NO (${unmapped:-no IOVA printed})"
    rc=1
fi
# Bypass identity: the second level's DMA outside its RAM, untranslated,
# reaches this kernel's IOMMU as that address, which maps nothing there.
# Detach: its endpoint blocked, the DMA to a page of its RAM faults here.
fault_at() { # CHECK-NAME SED-PATTERN-OF-THE-L2-LINE
    a=$(sed -n "s/.*$2 0x\([0-9a-f]*\).*/\1/p" /tmp/l2.out | head -n1)
    if [ -n "$a" ] && dmesg | grep -i dmar | grep -i fault -A1 | grep -qi "fault addr 0x$a"; then
        echo "VUI-CHECK $1 yes"
    else
        echo "VUI-CHECK $1 NO (${a:-no address printed})"
        rc=1
    fi
}
fault_at nested-l1-dmar-fault-outside-l2-ram "identity DMA outside guest RAM, to"
fault_at nested-l1-dmar-fault-after-detach "DMA of the detached endpoint to guest-physical"
# What the second level's driver did with the endpoint, as QEMU's mirror
# saw it (the daemon publishes attachments on both paths).
ep=$(sed -n 's/.*VUI-LOG nested-l2 removing .* (endpoint \(0x[0-9a-f]*\),.*/\1/p' /tmp/l2.out | head -n1)
grep -E "vhost_user_iommu_(attach|detach) endpoint=${ep:-none} " /tmp/l2.out | sed 's/^/VUI-LOG l2 qemu: /'
if [ -n "$ep" ] && grep -q "vhost_user_iommu_attach endpoint=$ep domain=[0-9]* bypass=1" /tmp/l2.out; then
    echo "VUI-CHECK nested-l1-saw-bypass-attach yes"
else
    echo "VUI-CHECK nested-l1-saw-bypass-attach NO (endpoint ${ep:-unknown})"
    rc=1
fi
# Detached: the last record for the endpoint leaves its bypass domain (a
# move between domains is a detach followed by an attach).
bdom=$(sed -n "s/.*vhost_user_iommu_attach endpoint=$ep domain=\([0-9]*\) bypass=1.*/\1/p" /tmp/l2.out | tail -n1)
last=$(grep -E "vhost_user_iommu_(attach|detach) endpoint=$ep " /tmp/l2.out | tail -n1)
if [ -n "$ep" ] && [ -n "$bdom" ] && echo "$last" | grep -Eq "vhost_user_iommu_detach endpoint=$ep domain=$bdom([^0-9]|\$)"; then
    echo "VUI-CHECK nested-l1-saw-detach yes"
else
    echo "VUI-CHECK nested-l1-saw-detach NO (endpoint ${ep:-unknown}, last: ${last:-none})"
    rc=1
fi
if [ "$f2" -gt "$f1" ]; then
    echo "VUI-CHECK nested-l1-dmar-fault-after-daemon-exit yes"
else
    echo "VUI-CHECK nested-l1-dmar-fault-after-daemon-exit NO"
    rc=1
fi

# QEMU is gone: its container released the groups (a group opens once), and
# a fresh container here sees nothing of the second level's mappings.
/tests/edu-dma "$EDU1" >/tmp/l1-edu.out 2>&1
erc=$?
sed 's/^/VUI-LOG l1 edu-dma: /' /tmp/l1-edu.out
if [ "$erc" = 0 ]; then
    echo "VUI-CHECK nested-l1-qemu-exit-released ok"
else
    echo "VUI-CHECK nested-l1-qemu-exit-released FAILED ($erc)"
    rc=1
fi
echo "VUI-LOG nested-l1 done at $(up) s"
exit "$rc"
