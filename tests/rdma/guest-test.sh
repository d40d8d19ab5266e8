#!/bin/sh
# Runs inside the Soft-RoCE test guest (scripts/test-rdma boots it; the
# initramfs comes from scripts/guest/build-initrd-rdma). Real verbs traffic
# on rdma_rxe over dummy0, all in this one boot:
#   setup       rdma_rxe + rdma_cm, rxe0 on dummy0 (10.99.0.1, GID 1 = RoCEv2/IPv4)
#   ib_write_bw perftest's RDMA WRITE bandwidth on the same device: the yardstick
#   xfer-*      rdmax-xfer through the rdma ops table: throughput (1 and 4
#               connections, events and busy polling), echo (both directions
#               of each connection at once), a byte-exact file carry
#   stream-*    each recorded QEMU stream in /streams through
#               rdma-x send --transport rdma -> rdma-x recv, sha256 compared
#   kill-*      the receiver killed mid-stream: the sender must exit non-zero
#               with a reason within KILL_LIMIT seconds
# Console lines for the host (scripts/test-rdma parses them):
#   RDMAX-RDMA-RESULT <test> PASS|FAIL [key=value ...]
#   RDMAX-RDMA-LOG <test> <a line of a failing command's stderr>
#   RDMAX-RDMA-DONE
# Kernel command line: rdmax.only=a,b (test groups: ibbw,xfer,streams,kill),
# rdmax.xferbytes=NM (MiB per throughput run, default 64M), rdmax.rounds=N
# (ib_write_bw/rdmax-xfer pairs, default 3).
IP=10.99.0.1
KILL_LIMIT=5
XFER_BYTES=${RDMAX_T_xferbytes:-64M}
ONLY=${RDMAX_T_only:-ibbw,xfer,streams,reject,kill}
port=7100

result() { echo "RDMAX-RDMA-RESULT $*"; }
logtail() { # test file
    [ -s "$2" ] && tail -n 8 "$2" | while IFS= read -r l; do echo "RDMAX-RDMA-LOG $1 $l"; done
}
want() { case ",$ONLY," in *",$1,"*) return 0 ;; esac; return 1; }
now_cs() { awk '{ split($1, a, "."); printf "%d\n", a[1] * 100 + a[2] }' /proc/uptime; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 100 }'; }
next_port() { port=$((port + 1)); }
fsize() { stat -c %s "$1" 2>/dev/null || echo 0; }

# ---- setup ------------------------------------------------------------------
echo 1 > /proc/sys/kernel/printk # keep kernel lines out of the markers
ok=1
: > /tmp/setup.err
for m in crc32_generic rdma_rxe rdma_ucm dummy; do # rxe needs a crc32 shash
    modprobe "$m" >> /tmp/setup.err 2>&1 || { ok=0; echo "modprobe $m failed" >> /tmp/setup.err; }
done
{ /usr/bin/ip link set lo up && /usr/bin/ip addr add $IP/24 dev dummy0 &&
    /usr/bin/ip link set dummy0 up &&
    /usr/bin/rdma link add rxe0 type rxe netdev dummy0; } >> /tmp/setup.err 2>&1 ||
    { ok=0; echo "rxe0 on dummy0 failed; modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')" \
          >> /tmp/setup.err; }
sleep 1
ibv_devinfo -d rxe0 > /tmp/devinfo 2>&1 || ok=0
state=$(awk '/state:/ { print $2; exit }' /tmp/devinfo)
mtu=$(awk '/active_mtu:/ { print $2; exit }' /tmp/devinfo)
if [ $ok = 1 ] && [ "$state" = PORT_ACTIVE ]; then
    result setup PASS device=rxe0 netdev=dummy0 ip=$IP port_state=$state active_mtu=$mtu \
        cpus=$(grep -c ^processor /proc/cpuinfo) memlock=$(ulimit -l)
else
    result setup FAIL port_state=$state
    logtail setup /tmp/setup.err
    logtail setup /tmp/devinfo
    echo "RDMAX-RDMA-DONE"
    exit 1
fi

# ---- ib_write_bw vs the rdma transport, interleaved ----------------------------
# The host is shared and TCG is noisy: ROUNDS pairs of (ib_write_bw, rdmax-xfer
# over one connection), each XFER_BYTES, back to back; the ratio is the median
# of the per-pair ratios. rdmax-xfer runs --no-check here (ib_write_bw does not
# touch its data either); the echo and file runs below check every byte.
median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print 0 }'; }
ibw_once() {
    next_port
    ib_write_bw -d rxe0 -x 1 -s 1048576 -n $IBW_ITERS -F -p $port > /tmp/ibbw-s.log 2>&1 &
    spid=$!
    sleep 1
    timeout 120 ib_write_bw -d rxe0 -x 1 -s 1048576 -n $IBW_ITERS -F -p $port $IP \
        > /tmp/ibbw-c.log 2>&1
    rc=$?
    wait $spid
    # columns: #bytes #iterations BW-peak BW-average MsgRate (MB = 2^20 B)
    [ $rc = 0 ] && awk '$1 == 1048576 && NF >= 5 { print $4; exit }' /tmp/ibbw-c.log
}
xfer() { # name, then rdmax-xfer send options; sets mib
    name=$1
    shift
    next_port
    rdmax-xfer recv --listen $IP:$port $RECV_OPTS > /tmp/xr.log 2>&1 &
    rpid=$!
    timeout 300 rdmax-xfer send --to $IP:$port "$@" > /tmp/xs.out 2> /tmp/xs.log
    rc=$?
    wait $rpid
    rrc=$?
    line=$(grep '^XFER ' /tmp/xs.out)
    mib=$(echo "$line" | sed -n 's/.*MiBps=\([0-9.]*\).*/\1/p')
    if [ $rc = 0 ] && [ $rrc = 0 ] && echo "$line" | grep -q 'check=ok'; then
        [ -n "$QUIET" ] || result "$name" PASS ${line#XFER } \
            ratio_to_ib_write_bw=$(awk -v a="${mib:-0}" -v b="$ibbw" \
                'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
        return 0
    fi
    result "$name" FAIL rc=$rc recv_rc=$rrc ${line#XFER }
    logtail "$name" /tmp/xs.log
    logtail "$name" /tmp/xr.log
    mib=
    return 1
}
ROUNDS=${RDMAX_T_rounds:-3}
IBW_ITERS=$(( $(echo "$XFER_BYTES" | sed 's/[Mm]$//') ))
ibbw=0
if want ibbw; then
    ibs= xs= rs= bad=0
    i=0
    while [ $i -lt $ROUNDS ]; do
        i=$((i + 1))
        b=$(ibw_once)
        [ -n "$b" ] || { bad=1; logtail ib_write_bw /tmp/ibbw-c.log; break; }
        RECV_OPTS=
        QUIET=1 xfer xfer-1conn --bytes $XFER_BYTES --frame 1M --no-check || { bad=2; break; }
        ibs="$ibs $b" xs="$xs $mib"
        rs="$rs $(awk -v a="$mib" -v b="$b" 'BEGIN { printf "%.3f", a / b }')"
    done
    if [ $bad = 0 ]; then
        ibbw=$(echo $ibs | median)
        result ib_write_bw PASS MiBps=$ibbw runs=$(echo $ibs | tr ' ' ',') size=1048576 \
            iters=$IBW_ITERS
        result xfer-1conn PASS MiBps=$(echo $xs | median) runs=$(echo $xs | tr ' ' ',') \
            bytes=$XFER_BYTES frame=1048576 ratio_to_ib_write_bw=$(echo $rs | median) \
            ratios=$(echo $rs | tr ' ' ',')
    elif [ $bad = 1 ]; then
        result ib_write_bw FAIL
    fi
fi

# ---- rdmax-xfer: more of the transport, through its ops table ----------------
if want xfer; then
    # the pool an unprivileged process gets under an 8 MiB RLIMIT_MEMLOCK
    RECV_OPTS="--pinned-max 6M"
    xfer xfer-1conn-6M --pinned-max 6M --bytes $XFER_BYTES --frame 1M --no-check
    RECV_OPTS="--conns 4"
    xfer xfer-4conn --conns 4 --bytes $(( IBW_ITERS / 4 ))M --frame 1M --no-check
    RECV_OPTS="--busy-poll"
    xfer xfer-1conn-busypoll --busy-poll --bytes $XFER_BYTES --frame 1M --no-check
    RECV_OPTS="--conns 2 --echo"
    xfer xfer-echo-2conn --conns 2 --echo --bytes 16M --frame 200000
    RECV_OPTS="--out /tmp/xfer-out.bin"
    head -c 5000003 /dev/urandom > /tmp/xfer-in.bin
    xfer xfer-file --in /tmp/xfer-in.bin --frame 777777
    if ! cmp -s /tmp/xfer-in.bin /tmp/xfer-out.bin; then
        result xfer-file-compare FAIL reason=output_differs
    else
        result xfer-file-compare PASS bytes=$(fsize /tmp/xfer-out.bin)
    fi
    rm -f /tmp/xfer-in.bin /tmp/xfer-out.bin

    # The sender starts first: connect() must retry until the listener is up.
    next_port
    rdmax-xfer send --to $IP:$port --bytes 4M > /tmp/xs.out 2> /tmp/xs.log &
    spid=$!
    sleep 2
    rdmax-xfer recv --listen $IP:$port > /tmp/xr.log 2>&1
    rrc=$?
    wait $spid
    rc=$?
    if [ $rc = 0 ] && [ $rrc = 0 ] && grep -q 'check=ok' /tmp/xs.out; then
        result xfer-connect-retry PASS listener_started_after_s=2
    else
        result xfer-connect-retry FAIL rc=$rc recv_rc=$rrc
        logtail xfer-connect-retry /tmp/xs.log
    fi

    # Registered memory is bounded: 100K holds two connections of the smallest
    # pool (6 x 8 KiB); the third is refused with a message that says what to
    # raise.
    next_port
    rdmax-xfer recv --listen $IP:$port --conns 4 > /tmp/xr.log 2>&1 &
    rpid=$!
    rdmax-xfer send --to $IP:$port --conns 4 --bytes 1M --pinned-max 100K > /tmp/xs.out \
        2> /tmp/xs.log
    rc=$?
    kill $rpid 2> /dev/null
    wait $rpid 2> /dev/null
    if [ $rc != 0 ] && grep -q 'pinned-memory budget exhausted.*raise the bound' /tmp/xs.log; then
        result xfer-pinned-limit PASS refused_with="$(grep -m1 -o 'pinned-memory budget exhausted' /tmp/xs.log | tr ' ' '_')"
    else
        result xfer-pinned-limit FAIL rc=$rc
        logtail xfer-pinned-limit /tmp/xs.log
    fi

    # An unprivileged sender under a small RLIMIT_MEMLOCK: ibv_reg_mr fails and
    # the message says how to raise the limit.
    next_port
    rdmax-xfer recv --listen $IP:$port > /tmp/xr.log 2>&1 &
    rpid=$!
    (ulimit -l 128 && su -s /bin/sh nobody -c \
        "rdmax-xfer send --to $IP:$port --bytes 1M --pinned-max 6M" > /tmp/xs.out 2> /tmp/xs.log)
    rc=$?
    kill $rpid 2> /dev/null
    wait $rpid 2> /dev/null
    if [ $rc != 0 ] && grep -q 'ibv_reg_mr.*RLIMIT_MEMLOCK.*ulimit -l' /tmp/xs.log; then
        result xfer-memlock PASS message="$(grep -m1 -o 'ibv_reg_mr([^:]*): [A-Za-z ]*' /tmp/xs.log | tr ' ' '_')"
    else
        result xfer-memlock FAIL rc=$rc
        logtail xfer-memlock /tmp/xs.log
    fi
fi

# ---- rdma-x carries recorded QEMU streams ------------------------------------
# /streams/MANIFEST: name size sha256, one per line; /streams/<name>.zst
big=
if want streams && [ -f /streams/MANIFEST ]; then
    while read -r name size sum; do
        [ -n "$name" ] || continue
        t="stream-$name"
        if ! zstd -q -d --long=27 -f "/streams/$name.zst" -o /tmp/in.bin 2> /tmp/zstd.err; then
            result "$t" FAIL reason=zstd
            logtail "$t" /tmp/zstd.err
            continue
        fi
        next_port
        rdma-x recv --transport rdma --listen $IP:$port < /dev/null > /tmp/out.bin \
            2> /tmp/recv.err &
        rpid=$!
        t0=$(now_cs)
        rdma-x send --transport rdma --to $IP:$port --stats-json /tmp/send.json \
            < /tmp/in.bin > /dev/null 2> /tmp/send.err
        rc=$?
        t1=$(now_cs)
        wait $rpid
        rrc=$?
        got=$(sha256sum /tmp/out.bin | cut -d' ' -f1)
        s=$(secs "$t0" "$t1")
        mbps=$(awk -v n="$size" -v s="$s" 'BEGIN { if (s > 0) printf "%.1f", n / s / 1e6; else print 0 }')
        wire=$(sed -n 's/.*"bytes_wire": *\([0-9]*\).*/\1/p' /tmp/send.json 2>/dev/null)
        lanes=$(sed -n 's/.*"lanes": *\([0-9]*\).*/\1/p' /tmp/send.json 2>/dev/null)
        if [ $rc = 0 ] && [ $rrc = 0 ] && [ "$got" = "$sum" ]; then
            result "$t" PASS bytes=$size secs=$s stream_MBps=$mbps wire_bytes=${wire:-n/a} lanes=${lanes:-?} \
                sha256=match
        else
            result "$t" FAIL send_rc=$rc recv_rc=$rrc bytes=$size out_bytes=$(fsize /tmp/out.bin) \
                sha256=$( [ "$got" = "$sum" ] && echo match || echo MISMATCH)
            logtail "$t" /tmp/send.err
            logtail "$t" /tmp/recv.err
        fi
        rm -f /tmp/out.bin
        # keep the smallest input for the transport auto test
        if [ ! -f /tmp/small.bin ] || [ "$size" -lt "$(fsize /tmp/small.bin)" ]; then
            cp /tmp/in.bin /tmp/small.bin
        fi
        # keep the largest input for the kill test
        if [ "$size" -gt "$(fsize /tmp/big.bin)" ]; then
            mv /tmp/in.bin /tmp/big.bin
        else
            rm -f /tmp/in.bin
        fi
    done < /streams/MANIFEST
elif want streams; then
    result streams FAIL reason=no_/streams/MANIFEST
fi

# ---- a connection refused during CM accept does not end the receiver -----------
# ib_write_bw -R is a real RDMA CM client with its own private data, not an
# rdma-x HELLO: the receiver must reject that one connection, keep listening,
# and then carry a real sender's stream byte-identical.
if want reject && [ -f /tmp/small.bin ]; then
    next_port
    rdma-x recv --transport rdma --listen $IP:$port --timeout 20 < /dev/null > /tmp/out.bin \
        2> /tmp/recv.err &
    rpid=$!
    sleep 1
    timeout 20 ib_write_bw -d rxe0 -R -p $port -n 5 $IP > /tmp/ibr.log 2>&1
    irc=$?
    sleep 1
    if ! kill -0 $rpid 2>/dev/null; then
        wait $rpid
        result reject-foreign-cm FAIL reason=receiver_ended_after_the_rejected_client rc=$?
        logtail reject-foreign-cm /tmp/recv.err
    else
        rdma-x send --transport rdma --to $IP:$port < /tmp/small.bin > /dev/null 2> /tmp/send.err
        rc=$?
        wait $rpid
        rrc=$?
        if [ $irc != 0 ] && [ $rc = 0 ] && [ $rrc = 0 ] && cmp -s /tmp/small.bin /tmp/out.bin; then
            result reject-foreign-cm PASS foreign_client_rc=$irc \
                said="$(grep -m1 'rdma-x' /tmp/recv.err | cut -c1-120 | tr ' ' '_')" \
                client_said="$(grep -m1 -i 'fail\|reject\|error\|unable' /tmp/ibr.log | cut -c1-80 | tr ' ' '_')" \
                then_stream=identical
        else
            result reject-foreign-cm FAIL foreign_client_rc=$irc send_rc=$rc recv_rc=$rrc
            logtail reject-foreign-cm /tmp/recv.err
            logtail reject-foreign-cm /tmp/send.err
        fi
    fi
    rm -f /tmp/out.bin
fi

# ---- --transport auto picks rdma here, and tcp when the receiver has none ------
auto_test() { # name, recv transport, expected transport
    t=$1
    next_port
    rdma-x recv --transport "$2" --listen $IP:$port --stats-json /tmp/arecv.json < /dev/null \
        > /tmp/aout.bin 2> /tmp/arecv.err &
    rpid=$!
    sleep 0.5
    rdma-x send --transport auto --to $IP:$port --stats-json /tmp/asend.json \
        < /tmp/small.bin > /dev/null 2> /tmp/asend.err
    rc=$?
    wait $rpid
    rrc=$?
    used=$(sed -n 's/.*"transport": *"\([a-z]*\)".*/\1/p' /tmp/asend.json 2>/dev/null)
    rused=$(sed -n 's/.*"transport": *"\([a-z]*\)".*/\1/p' /tmp/arecv.json 2>/dev/null)
    note=$(grep -o 'transport auto: [a-z]*' /tmp/asend.err | head -1 | tr ' ' '_')
    if [ $rc = 0 ] && [ $rrc = 0 ] && cmp -s /tmp/small.bin /tmp/aout.bin &&
        [ "$used" = "$3" ] && [ "$rused" = "$3" ] && [ -n "$note" ]; then
        result "$t" PASS send=$used recv=$rused said=$note
    else
        result "$t" FAIL send_rc=$rc recv_rc=$rrc send=$used recv=$rused expected=$3
        logtail "$t" /tmp/asend.err
        logtail "$t" /tmp/arecv.err
    fi
    rm -f /tmp/aout.bin
}
if want streams && [ -f /tmp/small.bin ]; then
    auto_test auto-rdma auto rdma
    auto_test auto-fallback-tcp tcp tcp
fi

# ---- --psk-file --encrypt over the rdma transport ------------------------------
if want streams && [ -f /tmp/big.bin ]; then
    t=stream-encrypted-rdma
    head -c 32 /dev/urandom > /tmp/psk && chmod 600 /tmp/psk
    next_port
    rdma-x recv --transport rdma --listen $IP:$port --psk-file /tmp/psk --encrypt \
        < /dev/null > /tmp/eout.bin 2> /tmp/erecv.err &
    rpid=$!
    t0=$(now_cs)
    rdma-x send --transport rdma --to $IP:$port --psk-file /tmp/psk --encrypt \
        < /tmp/big.bin > /dev/null 2> /tmp/esend.err
    rc=$?
    t1=$(now_cs)
    wait $rpid
    rrc=$?
    if [ $rc = 0 ] && [ $rrc = 0 ] && cmp -s /tmp/big.bin /tmp/eout.bin; then
        result "$t" PASS bytes=$(fsize /tmp/big.bin) secs=$(secs "$t0" "$t1") identical=yes
    else
        result "$t" FAIL send_rc=$rc recv_rc=$rrc
        logtail "$t" /tmp/esend.err
        logtail "$t" /tmp/erecv.err
    fi
    rm -f /tmp/eout.bin
fi

# ---- the receiver dies mid-stream --------------------------------------------
kill_test() { # name, receiver command, sender command (strings)
    name=$1
    rm -f /tmp/kout.bin
    sh -c "$2" < /dev/null > /tmp/kout.bin 2> /tmp/krecv.err &
    rpid=$!
    sh -c "exec $3" > /dev/null 2> /tmp/ksend.err &
    spid=$!
    # wait until data flows (1 MB arrived), at most 30 s
    i=0
    while [ "$(fsize /tmp/kout.bin)" -lt 1000000 ] && [ $i -lt 300 ]; do
        usleep 100000
        i=$((i + 1))
    done
    arrived=$(fsize /tmp/kout.bin)
    kill -9 $rpid
    t0=$(now_cs)
    (sleep 20; kill -9 $spid 2> /dev/null) &
    wpid=$!
    wait $spid
    rc=$?
    t1=$(now_cs)
    kill $wpid 2> /dev/null
    wait $rpid 2> /dev/null
    s=$(secs "$t0" "$t1")
    reason=$(grep -m1 'error' /tmp/ksend.err | tr ' ' '_' | cut -c1-160)
    fast=$(awk -v s="$s" -v l=$KILL_LIMIT 'BEGIN { print (s <= l) ? 1 : 0 }')
    if [ "$arrived" -ge 1000000 ] && [ $rc != 0 ] && [ $rc != 137 ] && [ "$fast" = 1 ] &&
        [ -n "$reason" ]; then
        result "$name" PASS sender_rc=$rc exit_after_s=$s bytes_before_kill=$arrived \
            reason=$reason
    else
        result "$name" FAIL sender_rc=$rc exit_after_s=$s bytes_before_kill=$arrived \
            limit_s=$KILL_LIMIT reason=${reason:-none}
        logtail "$name" /tmp/ksend.err
    fi
    rm -f /tmp/kout.bin
}
if want kill; then
    next_port
    kill_test kill-xfer "exec rdmax-xfer recv --listen $IP:$port --out -" \
        "rdmax-xfer send --to $IP:$port --bytes 0 --frame 1M"
    if [ -f /tmp/big.bin ]; then
        next_port
        kill_test kill-rdma-x "exec rdma-x recv --transport rdma --listen $IP:$port" \
            "rdma-x send --transport rdma --to $IP:$port < /tmp/big.bin"
    else
        result kill-rdma-x FAIL reason=no_stream_input
    fi
fi
rm -f /tmp/big.bin
echo "RDMAX-RDMA-DONE"
