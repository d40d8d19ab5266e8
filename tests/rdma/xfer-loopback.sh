#!/bin/sh
# xfer-loopback.sh RDMAX_XFER TRANSPORT [ADDR]: one echo run (both directions
# of each connection busy at once, 2 connections) and one byte-exact file
# carry through TRANSPORT. Exit 77 (skip) for rdma when the host has no RDMA
# device. ADDR defaults to $RDMAX_RDMA_TEST_ADDR, else 127.0.0.1.
set -u
xfer=$1 transport=$2 addr=${3:-${RDMAX_RDMA_TEST_ADDR:-127.0.0.1}}
tmp=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$tmp"' EXIT
pid=
if [ "$transport" = rdma ] && ! ibv_devices 2>/dev/null | awk 'NR > 2 && NF' | grep -q .; then
    echo "no RDMA device: skipped"
    exit 77
fi
port=$(( 20000 + $$ % 20000 ))

"$xfer" recv --transport "$transport" --listen "$addr:$port" --conns 2 --echo &
pid=$!
"$xfer" send --transport "$transport" --to "$addr:$port" --conns 2 --bytes 8M \
    --frame 300000 --echo || { echo "echo run failed"; exit 1; }
wait $pid || { echo "echo receiver failed"; exit 1; }

head -c 3000001 /dev/urandom > "$tmp/in"
"$xfer" recv --transport "$transport" --listen "$addr:$((port + 1))" --out "$tmp/out" &
pid=$!
"$xfer" send --transport "$transport" --to "$addr:$((port + 1))" --in "$tmp/in" \
    --frame 65537 || { echo "file run failed"; exit 1; }
wait $pid || { echo "file receiver failed"; exit 1; }
pid=
cmp "$tmp/in" "$tmp/out" || { echo "file differs"; exit 1; }
echo "ok"
