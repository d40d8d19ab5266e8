#!/usr/bin/env python3
"""A TCP relay for fault tests: sits between `rdma-x send` and `rdma-x recv`
and can corrupt one byte of what the sender sends, or blackhole a connection.

  relay.py --listen PORT --to HOST:PORT [--flip CONN:OFFSET]
           [--blackhole CONN:SECONDS] [--delay MS] [--log FILE]

Every accepted connection is relayed to --to, both ways, byte for byte.
Connections are numbered in the order they are accepted (0 is the control
connection, 1..N the lanes of `rdma-x send`). With --flip CONN:OFFSET the
byte at OFFSET of connection CONN's sender-to-receiver stream is XORed with
0x01 (one flipped bit), once; the log then says `flipped conn=C offset=O
byte=0xAA->0xAB`, so a test can check the flip really happened. With
--blackhole CONN:SECONDS, SECONDS after connection CONN was accepted the
relay stops forwarding it in both directions and stops reading it, but
keeps both sockets open (no FIN, no RST): a silent path, like a dead
ECMP member or middlebox; the log then says `blackholed conn=C`. With
--delay MS every byte is held MS milliseconds in each direction (a link
with an RTT of 2 x MS; this kernel has no netem).
Runs until killed. Python 3 standard library only.
"""
import argparse
import queue
import select
import socket
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--listen', type=int, required=True)
    ap.add_argument('--to', required=True)
    ap.add_argument('--flip', default=None)
    ap.add_argument('--blackhole', default=None)
    ap.add_argument('--delay', type=float, default=0)
    ap.add_argument('--log', default=None)
    a = ap.parse_args()
    host, port = a.to.rsplit(':', 1)
    flip_conn, flip_off = (None, None)
    if a.flip:
        c, o = a.flip.split(':')
        flip_conn, flip_off = int(c), int(o)
    hole_conn, hole_after = (None, None)
    if a.blackhole:
        c, t = a.blackhole.split(':')
        hole_conn, hole_after = int(c), float(t)
    holes = {}   # conn -> threading.Event, set once it is blackholed
    logf = open(a.log, 'a', buffering=1) if a.log else sys.stderr
    lock = threading.Lock()

    def log(msg):
        with lock:
            logf.write(msg + '\n')

    def delayed(dst, q):
        """Forward what q holds to dst once its time came."""
        broken = False
        while True:
            due, data = q.get()
            if data is None:
                return
            left = due - time.monotonic()
            if left > 0 and not broken:
                time.sleep(left)
            try:
                if not broken:
                    dst.sendall(data)
            except OSError:
                broken = True   # keep draining, so the pump never blocks

    def pump(src, dst, conn, corrupt):
        off = 0
        hole = holes.get(conn)
        q = fwd = None
        if a.delay > 0:
            q = queue.Queue(maxsize=256)    # bounded: back-pressure stays
            fwd = threading.Thread(target=delayed, args=(dst, q), daemon=True)
            fwd.start()
        try:
            while True:
                # poll, so a blackhole takes effect between reads
                while hole is not None and \
                        not select.select([src], [], [], 0.05)[0]:
                    if hole.is_set():
                        break
                if hole is not None and hole.is_set():
                    while True:     # silent forever, both sockets open
                        threading.Event().wait(3600)
                data = src.recv(65536)
                if not data:
                    break
                if corrupt and off <= flip_off < off + len(data):
                    i = flip_off - off
                    b = bytearray(data)
                    old = b[i]
                    b[i] ^= 0x01
                    data = bytes(b)
                    log('flipped conn=%d offset=%d byte=0x%02x->0x%02x' %
                        (conn, flip_off, old, b[i]))
                off += len(data)
                if q is not None:
                    q.put((time.monotonic() + a.delay / 1000.0, data))
                else:
                    dst.sendall(data)
        except OSError:
            pass
        if q is not None:
            q.put((0, None))
            fwd.join()
        # pass the close on: half-close first, then both
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass

    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(('127.0.0.1', a.listen))
    ls.listen(128)
    log('listening on %d, relaying to %s' % (a.listen, a.to))
    n = 0
    while True:
        cs, peer = ls.accept()
        conn = n
        n += 1
        try:
            ss = socket.create_connection((host, int(port)))
        except OSError as e:
            log('conn %d: cannot reach %s: %s' % (conn, a.to, e))
            cs.close()
            continue
        for s in (cs, ss):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log('conn %d from %s:%d' % (conn, peer[0], peer[1]))
        if conn == hole_conn:
            ev = holes[conn] = threading.Event()

            def blackhole(ev=ev, conn=conn):
                ev.set()
                log('blackholed conn=%d' % conn)
            threading.Timer(hole_after, blackhole).start()
        threading.Thread(target=pump, args=(cs, ss, conn, conn == flip_conn),
                         daemon=True).start()
        threading.Thread(target=pump, args=(ss, cs, conn, False),
                         daemon=True).start()


if __name__ == '__main__':
    main()
