#!/usr/bin/env bash
# Two network namespaces joined by a veth pair whose source end is shaped
# with tbf: the "link" of the migration benchmark (scripts/bench, scripts/demo).
# See shared/reference/test-environment.md section D: tbf 1gbit gives
# 956-961 Mbit/s of TCP goodput for ~5 % CPU; 10gbit eats the 2 cores.
#
#   netns.sh up NAME RATE      create NAME-src (10.200.0.1, dev NAME-s) and
#                              NAME-dst (10.200.0.2, dev NAME-d); shape
#                              src->dst with `tbf rate RATE` (e.g. 1gbit,
#                              500mbit, or "none" for an unshaped veth)
#   netns.sh down NAME         delete both namespaces (and with them the veth)
#   netns.sh counters NAME     "src_tx dst_tx" bytes of the two veth ends
#
# Only the namespaces named here are touched; the host's own network is
# never changed. NAME must be short (the veth names are NAME-s / NAME-d,
# 15 characters at most). Needs root.
set -euo pipefail

NETNS_SRC_IP=10.200.0.1
NETNS_DST_IP=10.200.0.2

netns_up() {
    local name=$1 rate=${2:-1gbit}
    netns_down "$name" 2>/dev/null || true
    ip netns add "$name-src"
    ip netns add "$name-dst"
    ip link add "$name-s" netns "$name-src" type veth peer name "$name-d" netns "$name-dst"
    ip -n "$name-src" addr add $NETNS_SRC_IP/24 dev "$name-s"
    ip -n "$name-dst" addr add $NETNS_DST_IP/24 dev "$name-d"
    ip -n "$name-src" link set lo up
    ip -n "$name-dst" link set lo up
    ip -n "$name-src" link set "$name-s" up
    ip -n "$name-dst" link set "$name-d" up
    if [ "$rate" != none ]; then
        # burst 1 MB, queue bounded to 50 ms: the settings measured in D
        tc -n "$name-src" qdisc add dev "$name-s" root tbf rate "$rate" \
            burst 1000000 latency 50ms
    fi
}

netns_down() {
    local name=$1 rc=0
    ip netns del "$name-src" 2>/dev/null || rc=1
    ip netns del "$name-dst" 2>/dev/null || rc=1
    return $rc
}

netns_counters() {
    local name=$1
    echo "$(ip netns exec "$name-src" cat /sys/class/net/"$name-s"/statistics/tx_bytes)" \
         "$(ip netns exec "$name-dst" cat /sys/class/net/"$name-d"/statistics/tx_bytes)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    cmd=${1:-}
    shift || true
    case "$cmd" in
        up) netns_up "$@" ;;
        down) netns_down "$@" ;;
        counters) netns_counters "$@" ;;
        *) echo "usage: $0 up NAME [RATE|none] | down NAME | counters NAME" >&2; exit 2 ;;
    esac
fi
