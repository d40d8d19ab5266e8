#!/usr/bin/env python3
"""Fault test (no QEMU needed): one lane goes silent.

A blackholed TCP flow (a dead ECMP/LAG member, a middlebox dropping one
connection) sends no FIN and no RST: without liveness checks on every
connection, both rdma-x sides waited for it forever. Here a relay
(tests/e2e/relay.py --blackhole) sits between `rdma-x send --lanes 2` and
`rdma-x recv`, both with --timeout 3, and a recorded QEMU stream is fed to
send slowly (~6 s), so lanes are idle for seconds at a time:
- without a blackhole the migration completes byte-identical: keep-alives
  on every lane keep idle lanes alive well past --timeout;
- with one lane blackholed one second in, both sides exit 1 within
  2 x --timeout of it, with one `rdma-x: error:` line each naming that
  lane (the same one on both sides; lanes connect in parallel, so which
  lane the relay's connection 3 carries is not fixed).
Usage: test-fault-blackhole.py [RDMAX]
"""
import hashlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import TestFailure as Fail, check, free_port, log  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'relay.py')
ERR_LINE = re.compile(r'^rdma-x: error: .+$', re.M)
TIMEOUT = 3


def wait_listen(port, what):
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(('127.0.0.1', port)).close()
            return
        except OSError:
            check(time.monotonic() < deadline, '%s does not listen' % what)
            time.sleep(0.05)


def feed(pipe, data, seconds):
    """Write data into pipe evenly over about seconds, then close it."""
    chunk = max(4096, len(data) // int(seconds * 10))
    try:
        for i in range(0, len(data), chunk):
            pipe.write(data[i:i + chunk])
            pipe.flush()
            time.sleep(0.1)
    except (BrokenPipeError, ValueError, OSError):
        pass
    try:
        pipe.close()
    except OSError:
        pass


def run(rdmax, tmp, data, tag, blackhole):
    rport, lport = free_port(), free_port()
    out = os.path.join(tmp, tag + '.out')
    rlog = os.path.join(tmp, tag + '.relay')
    procs = []
    try:
        recv = subprocess.Popen([rdmax, 'recv', '--listen', '127.0.0.1:%d' % rport,
                                 '--timeout', str(TIMEOUT)],
                                stdin=subprocess.DEVNULL, stdout=open(out, 'wb'),
                                stderr=open(out + '.recv.err', 'wb'))
        procs.append(recv)
        # the probe below is connection 0 of the relay, so it goes first
        relay_args = [sys.executable, RELAY, '--listen', str(lport), '--to',
                      '127.0.0.1:%d' % rport, '--log', rlog]
        if blackhole:
            relay_args += ['--blackhole', '3:1.0']  # probe 0, control 1, lanes 2 and 3
        relay = subprocess.Popen(relay_args)
        procs.append(relay)
        wait_listen(lport, 'relay')
        send = subprocess.Popen([rdmax, 'send', '--to', '127.0.0.1:%d' % lport,
                                 '--lanes', '2', '--timeout', str(TIMEOUT)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=open(out + '.send.err', 'wb'))
        procs.append(send)
        feeder = threading.Thread(target=feed, args=(send.stdin, data, 6), daemon=True)
        feeder.start()
        ends = {}

        def reap(name, p):
            p.wait(timeout=60)
            with open(out + '.' + name + '.err', errors='replace') as f:
                ends[name] = (p.returncode, time.monotonic(), f.read())
        ts = [threading.Thread(target=reap, args=(n, p)) for n, p in
              (('send', send), ('recv', recv))]
        for t in ts:
            t.start()
        hole_at = None
        while any(t.is_alive() for t in ts):
            if blackhole and hole_at is None and os.path.exists(rlog):
                with open(rlog) as f:
                    if 'blackholed' in f.read():
                        hole_at = time.monotonic()
            time.sleep(0.02)
        for t in ts:
            t.join()
        feeder.join(5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for name in ('send', 'recv'):
        rc, t, err = ends[name]
        log('  %s: exit %d%s: %s' % (name, rc, ' %.1f s after the blackhole' %
                                     (t - hole_at) if hole_at else '', err.strip()))
    with open(out, 'rb') as f:
        got = f.read()
    return ends, hole_at, got


def main():
    rdmax = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                            os.path.join(TOP, 'build', 'rdma-x'))
    zs = os.path.join(os.environ.get('RDMAX_TESTDATA', os.path.join(
        TOP, '..', 'shared', 'testdata')), 'qemu-10.0', 'pc-10.0-idle-bios.bin.zst')
    if not os.path.exists(zs):
        print('SKIP: no QEMU stream (%s)' % zs)
        return 77
    data = subprocess.run(['zstd', '-q', '-d', '--long=27', '-c', zs], check=True,
                          stdout=subprocess.PIPE).stdout
    with tempfile.TemporaryDirectory(prefix='rdmax-blackhole-') as tmp:
        try:
            log('slow stream, idle lanes, no blackhole:')
            ends, _, got = run(rdmax, tmp, data, 'alive', False)
            check(ends['send'][0] == 0 and ends['recv'][0] == 0,
                  'migration without a fault failed')
            check(hashlib.sha256(got).digest() == hashlib.sha256(data).digest(),
                  'stream differs')
            log('  identical')
            log('one lane blackholed after 1 s:')
            ends, hole_at, _ = run(rdmax, tmp, data, 'hole', True)
            check(hole_at is not None, 'the relay never blackholed the lane')
            named = set()
            for name in ('send', 'recv'):
                rc, t, err = ends[name]
                lines = err.strip().splitlines()
                check(rc == 1, '%s exited %d' % (name, rc))
                check(len(ERR_LINE.findall(err)) == 1 and ERR_LINE.match(lines[-1]),
                      '%s: not one error line: %r' % (name, err))
                m = re.search(r'lane (\d+) .*silent', lines[-1])
                check(m, '%s: reason does not name the silent lane: %s' % (name, lines[-1]))
                named.add(m.group(1))
                check(t - hole_at <= 2 * TIMEOUT,
                      '%s took %.1f s after the blackhole (limit 2 x --timeout = %d s)'
                      % (name, t - hole_at, 2 * TIMEOUT))
            check(len(named) == 1, 'the two sides name different lanes: %s' % named)
        except (Fail, subprocess.TimeoutExpired) as e:
            log('FAIL: %s' % e)
            return 1
    log('PASS fault-blackhole')
    return 0


if __name__ == '__main__':
    sys.exit(main())
