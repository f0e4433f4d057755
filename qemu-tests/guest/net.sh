#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# vhost-user net behind the vIOMMU: the guest's virtio-net NIC, served by
# DPDK's testpmd (icmpecho: it answers ARP and ping for any address), pings
# through it. One round per vui.rounds entry, SIZE:COUNT:INTERVAL (bytes of
# payload, echoes, seconds between them); each round prints
#   VUI-PING size=.. sent=.. received=.. p50=.. p99=.. max=.. secs=.. (ms)
# VUI_EXPECT=none: no reply may come (the back-end's DMA is refused).
# VUI_PATTERN=XX: the payload byte of every ping (busybox ping -p), for a
# back-end that checks the data it read.
ROUNDS=${VUI_ROUNDS:-56:20:0.05}
sleep 1
dmesg | grep -E 'virtio_net|virtio_iommu|iommu group' | sed 's/^/VUI-LOG dmesg: /'
# The NIC's driver may probe late (it waits for its IOMMU's).
dev='' tries=0
while [ -z "$dev" ] && [ "$tries" -lt 15 ]; do
    for n in /sys/class/net/*; do
        [ "${n##*/}" = lo ] || [ ! -e "$n" ] || dev=${n##*/}
    done
    [ -n "$dev" ] || sleep 1
    tries=$((tries + 1))
done
[ -n "$dev" ] || { echo "VUI-FAIL no network interface"; exit 1; }
grp=$(readlink "/sys/class/net/$dev/device/../iommu_group" 2>/dev/null)
echo "VUI-LOG $dev iommu group: ${grp:-none}"
ip addr add 10.0.2.15/24 dev "$dev"
ip link set "$dev" up
# The host starts testpmd's forwarding (a core polling) only now.
echo "VUI-NET-UP"
sleep 2

total=0
for r in $(echo "$ROUNDS" | tr ',' ' '); do
    size=${r%%:*}; rest=${r#*:}; count=${rest%%:*}; interval=${rest#*:}
    start=$(cut -d' ' -f1 /proc/uptime)
    # -w: a deadline, so a round without replies ends too.
    deadline=$(awk -v c="$count" -v i="$interval" 'BEGIN { printf "%d", c * i * 2 + 5 }')
    ping -c "$count" -i "$interval" -s "$size" -w "$deadline" ${VUI_PATTERN:+-p "$VUI_PATTERN"} \
        10.0.2.2 >/tmp/ping.out 2>&1
    end=$(cut -d' ' -f1 /proc/uptime)
    grep -o 'time=[0-9.]*' /tmp/ping.out | cut -d= -f2 | sort -n >/tmp/rtt
    got=$(wc -l </tmp/rtt)
    sent=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' /tmp/ping.out)
    pct() { [ "$got" -gt 0 ] && sed -n "$(((got * $1 + 99) / 100))p" /tmp/rtt || echo -; }
    echo "VUI-PING size=$size sent=${sent:-0} received=$got p50=$(pct 50) p99=$(pct 99)" \
        "max=$(tail -n1 /tmp/rtt) secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')"
    total=$((total + got))
done
echo "VUI-LOG $dev rx_packets=$(cat "/sys/class/net/$dev/statistics/rx_packets") tx_packets=$(cat "/sys/class/net/$dev/statistics/tx_packets")"
# The host reads the back-end's counters while the NIC is still up.
echo "VUI-NET-HOLD"
sleep "${VUI_HOLD:-0}"
if [ "${VUI_EXPECT:-replies}" = none ]; then
    [ "$total" -eq 0 ] || { echo "VUI-FAIL $total replies came through a refused back-end"; exit 1; }
    echo "VUI-CHECK no-reply"
else
    [ "$total" -gt 0 ] || { echo "VUI-FAIL no reply"; exit 1; }
    echo "VUI-CHECK replies=$total"
fi
