#!/usr/bin/env python3
"""Lane set-up over a link with latency (no QEMU needed).

Lanes used to connect one after another, 2 round trips each with a PSK,
all under one --timeout on the receiver: at 64 lanes any RTT above ~26 ms
failed. Here a relay (tests/e2e/relay.py --delay 25: 50 ms RTT; this
kernel has no netem) sits between `rdma-x send --psk-file K --lanes N` and
`rdma-x recv --psk-file K`, with the default --timeout of 5 s, for N = 16
and 64: set-up must succeed and a recorded QEMU stream come out
byte-identical. The time to the first byte at the receiver is reported.
Usage: test-lanes-latency.py [RDMAX]
"""
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import free_port  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'relay.py')
DELAY_MS = 25


def wait_listen(port):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(('127.0.0.1', port)).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def run(rdmax, tmp, stream, key, lanes):
    rport, lport = free_port(), free_port()
    out = os.path.join(tmp, 'out-%d' % lanes)
    procs = []
    try:
        recv = subprocess.Popen([rdmax, 'recv', '--listen', '127.0.0.1:%d' % rport,
                                 '--psk-file', key], stdin=subprocess.DEVNULL,
                                stdout=open(out, 'wb'), stderr=subprocess.PIPE)
        procs.append(recv)
        relay = subprocess.Popen([sys.executable, RELAY, '--listen', str(lport), '--to',
                                  '127.0.0.1:%d' % rport, '--delay', str(DELAY_MS),
                                  '--log', os.path.join(tmp, 'relay-%d.log' % lanes)])
        procs.append(relay)
        if not wait_listen(lport):
            return 'relay does not listen'
        t0 = time.monotonic()
        with open(stream, 'rb') as f:
            s = subprocess.run([rdmax, 'send', '--to', '127.0.0.1:%d' % lport,
                                '--lanes', str(lanes), '--psk-file', key], stdin=f,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=120)
        took = time.monotonic() - t0
        rerr = recv.communicate(timeout=30)[1].decode(errors='replace')
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print('--lanes %d over %d ms RTT: send %d, recv %d, %.1f s' %
          (lanes, 2 * DELAY_MS, s.returncode, recv.returncode, took), flush=True)
    if s.returncode != 0 or recv.returncode != 0:
        return 'send: %s recv: %s' % (s.stderr.decode(errors='replace').strip(),
                                      rerr.strip()[-1000:])
    with open(out, 'rb') as f1, open(stream, 'rb') as f2:
        if hashlib.sha256(f1.read()).digest() != hashlib.sha256(f2.read()).digest():
            return 'stream differs'
    return None


def main():
    rdmax = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                            os.path.join(TOP, 'build', 'rdma-x'))
    zs = os.path.join(os.environ.get('RDMAX_TESTDATA', os.path.join(
        TOP, '..', 'shared', 'testdata')), 'qemu-10.0', 'pc-10.0-idle-bios.bin.zst')
    if not os.path.exists(zs):
        print('SKIP: no QEMU stream (%s)' % zs)
        return 77
    with tempfile.TemporaryDirectory(prefix='rdmax-latency-') as tmp:
        stream = os.path.join(tmp, 'stream.bin')
        subprocess.run(['zstd', '-q', '-d', '--long=27', '-f', zs, '-o', stream], check=True)
        key = os.path.join(tmp, 'key')
        with open(key, 'wb') as f:
            subprocess.run([rdmax, 'keygen'], stdout=f, check=True)
        os.chmod(key, 0o600)
        for lanes in (16, 64):
            why = run(rdmax, tmp, stream, key, lanes)
            if why:
                print('FAIL: --lanes %d: %s' % (lanes, why))
                return 1
    print('PASS lanes-latency')
    return 0


if __name__ == '__main__':
    sys.exit(main())
