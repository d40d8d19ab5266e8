#!/usr/bin/env python3
"""A TCP relay for fault tests: sits between `rdma-x send` and `rdma-x recv`
and can corrupt one byte of what the sender sends.

  relay.py --listen PORT --to HOST:PORT [--flip CONN:OFFSET] [--log FILE]

Every accepted connection is relayed to --to, both ways, byte for byte.
Connections are numbered in the order they are accepted (0 is the control
connection, 1..N the lanes of `rdma-x send`). With --flip CONN:OFFSET the
byte at OFFSET of connection CONN's sender-to-receiver stream is XORed with
0x01 (one flipped bit), once; the log then says `flipped conn=C offset=O
byte=0xAA->0xAB`, so a test can check the flip really happened.
Runs until killed. Python 3 standard library only.
"""
import argparse
import socket
import sys
import threading


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--listen', type=int, required=True)
    ap.add_argument('--to', required=True)
    ap.add_argument('--flip', default=None)
    ap.add_argument('--log', default=None)
    a = ap.parse_args()
    host, port = a.to.rsplit(':', 1)
    flip_conn, flip_off = (None, None)
    if a.flip:
        c, o = a.flip.split(':')
        flip_conn, flip_off = int(c), int(o)
    logf = open(a.log, 'a', buffering=1) if a.log else sys.stderr
    lock = threading.Lock()

    def log(msg):
        with lock:
            logf.write(msg + '\n')

    def pump(src, dst, conn, corrupt):
        off = 0
        try:
            while True:
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
                dst.sendall(data)
        except OSError:
            pass
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
        threading.Thread(target=pump, args=(cs, ss, conn, conn == flip_conn),
                         daemon=True).start()
        threading.Thread(target=pump, args=(ss, cs, conn, False),
                         daemon=True).start()


if __name__ == '__main__':
    main()
