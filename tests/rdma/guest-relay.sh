#!/bin/sh
# Runs inside the Soft-RoCE guest for tests/rdma/test-migration-rxe.py: a real
# QEMU migration whose stream crosses rxe. Host QEMUs reach this guest through
# QEMU user networking (hostfwd to 10.0.2.15):
#   source QEMU -> exec:socat -> :5001 -> rdma-x send --transport rdma
#       == rxe0 (10.99.0.1) ==> rdma-x recv --transport rdma -> :5002 <- exec:socat <- destination QEMU
# (the return path flows back the same way). Console markers:
#   RDMAX-RELAY-READY            both relays listen
#   RDMAX-RELAY-DONE send_rc=N recv_rc=N
#   RDMAX-RELAY-LOG <line>       rdma-x's stderr
IP=10.99.0.1
echo 1 > /proc/sys/kernel/printk
for m in crc32_generic rdma_rxe rdma_ucm dummy virtio_pci virtio_net; do
    modprobe "$m" || echo "RDMAX-RELAY-LOG modprobe $m failed"
done
/usr/bin/ip link set lo up
/usr/bin/ip addr add $IP/24 dev dummy0 && /usr/bin/ip link set dummy0 up
/usr/bin/rdma link add rxe0 type rxe netdev dummy0
/usr/bin/ip addr add 10.0.2.15/24 dev eth0 && /usr/bin/ip link set eth0 up
sleep 1
lanes=${RDMAX_T_lanes:-2}
# wrappers: socat's address syntax splits on ':' (HOST:PORT)
cat > /tmp/recv.sh <<EOT
#!/bin/sh
exec rdma-x recv --transport rdma --listen $IP:7070 --lanes $lanes --stats-json /tmp/recv.json 2> /tmp/recv.err
EOT
cat > /tmp/send.sh <<EOT
#!/bin/sh
exec rdma-x send --transport rdma --to $IP:7070 --lanes $lanes --stats-json /tmp/send.json 2> /tmp/send.err
EOT
chmod 755 /tmp/recv.sh /tmp/send.sh
socat TCP-LISTEN:5002,reuseaddr EXEC:/tmp/recv.sh 2> /tmp/socat-recv.err &
rpid=$!
socat TCP-LISTEN:5001,reuseaddr EXEC:/tmp/send.sh 2> /tmp/socat-send.err &
spid=$!
i=0
while [ $i -lt 50 ] && ! { netstat -ltn 2>/dev/null | grep -q ':5001 ' &&
                           netstat -ltn 2>/dev/null | grep -q ':5002 '; }; do
    usleep 100000
    i=$((i + 1))
done
echo "RDMAX-RELAY-READY"
wait $spid
src=$?
wait $rpid
rrc=$?
# socat's status is its child's when the child failed
for f in /tmp/send.json /tmp/recv.json; do
    [ -f $f ] && echo "RDMAX-RELAY-STATS $(basename $f .json) $(tr -d ' \n' < $f | cut -c1-400)"
done
cat /tmp/socat-send.err /tmp/socat-recv.err /tmp/send.err /tmp/recv.err 2>/dev/null |
    tail -n 20 | sed 's/^/RDMAX-RELAY-LOG /'
echo "RDMAX-RELAY-DONE send_rc=$src recv_rc=$rrc"
