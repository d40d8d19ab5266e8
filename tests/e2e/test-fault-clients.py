#!/usr/bin/env python3
"""Fault test (no QEMU needed): hostile clients do not keep a real sender out.

`rdma-x recv --psk-file K` listens; before and while a real `rdma-x send
--psk-file K --lanes 4` replays a recorded QEMU stream into it, hostile
clients keep connections open to it, reconnecting whenever dropped:
- silent ones (connect, say nothing),
- drippers (a plausible HELLO, one byte every 0.3 s: each read comes
  in time, the handshake never completes),
- garbage ones (random bytes, an HTTP request),
- a flood (a new silent connection every 50 ms, more than the receiver
  serves at once, so the oldest handshakes are dropped for newer ones).
The stream must come out byte-identical with both sides exiting 0, the
hostile connections must show up as refusals in recv's log, and recv's
file descriptors must stay bounded, and so must what the hostile clients
cost in memory: recv's RSS while only they talk to it, against its RSS
as an idle listener (the migration's own memory, the page caches, varies
with timing and is measured, with a generous cap, not compared). Runs in
~15 s.
The stream: ../shared/testdata/qemu-10.0 (or the 7.2 captures); skips (77)
when there is none.
Usage: test-fault-clients.py [RDMAX]
"""
import hashlib
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import TestFailure as Fail, check, free_port, log  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
ERR_LINE = re.compile(r'^rdma-x: error: .+$', re.M)
FD_MAX = 120          # 16 + 64 handshakes, 65 connections, stdio, listener
HOSTILE_RSS_MIB = 24  # what hostile clients may add to an idle listener's RSS
MIGRATION_RSS_MIB = 1024  # the whole run (page caches of a 257 MiB guest)


def hello_now():
    """A plausible rdma-x HELLO frame (wire v3) with a PSK (the CRC is left 0)."""
    p = struct.pack('>IHHHHIQIQiI', 0x52444d58, 3, 0, 0, 2, 4096, 42, 1,
                    64 << 20, 0, 0)
    p += b'\0' * (48 - len(p)) + os.urandom(32) + b'\0' * 32
    return struct.pack('>BBHII', 1, 0, 0, len(p), 0) + p


class Hostiles:
    """Threads that keep hostile connections open until stop()."""

    def __init__(self, port):
        self.port, self.stop_ev = port, threading.Event()
        self.threads, self.conns = [], 0
        self.lock = threading.Lock()

    def _connect(self):
        try:
            s = socket.create_connection(('127.0.0.1', self.port), timeout=5)
        except OSError:
            time.sleep(0.05)
            return None
        with self.lock:
            self.conns += 1
        return s

    def _loop(self, behave):
        while not self.stop_ev.is_set():
            s = self._connect()
            if s is None:
                continue
            try:
                behave(s)
            except OSError:
                pass     # dropped by the receiver: come back
            finally:
                s.close()
            self.stop_ev.wait(0.05)

    def silent(self, s):
        s.settimeout(0.2)
        while not self.stop_ev.is_set():
            try:
                if not s.recv(4096):
                    return
            except socket.timeout:
                pass

    def drip(self, s):
        for b in hello_now():
            if self.stop_ev.wait(0.3):
                return
            s.sendall(bytes([b]))

    def garbage(self, s):
        s.sendall(random.choice([b'GET / HTTP/1.1\r\nHost: x\r\n\r\n',
                                 os.urandom(3000), b'\x08' + os.urandom(11)]))
        self.silent(s)

    def flood(self):
        held = []
        while not self.stop_ev.wait(0.05):
            s = self._connect()
            if s is not None:
                held.append(s)
            held = held[-200:]
        for s in held:
            s.close()

    def start(self):
        plan = [self.silent] * 6 + [self.drip] * 4 + [self.garbage] * 3
        for behave in plan:
            self.threads.append(threading.Thread(target=self._loop,
                                                 args=(behave,), daemon=True))
        self.threads.append(threading.Thread(target=self.flood, daemon=True))
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(5)


def watch(pid, stats, phase, stop):
    """Record the highest fd count and VmRSS (KiB) of pid until stop, per
    phase (phase[0] is the current one's name)."""
    while not stop.is_set():
        s = stats.setdefault(phase[0], {'fds': 0, 'rss': 0})
        try:
            s['fds'] = max(s['fds'], len(os.listdir('/proc/%d/fd' % pid)))
            with open('/proc/%d/status' % pid) as f:
                for line in f:
                    if line.startswith('VmRSS:'):
                        s['rss'] = max(s['rss'], int(line.split()[1]))
        except OSError:
            pass
        stop.wait(0.02)


def migrate(rdmax, tmp, stream, key, tag, hostile):
    port = free_port()
    out, err = os.path.join(tmp, tag + '.out'), os.path.join(tmp, tag + '.err')
    recv = subprocess.Popen([rdmax, 'recv', '--listen', '127.0.0.1:%d' % port,
                             '--psk-file', key],
                            stdin=subprocess.DEVNULL, stdout=open(out, 'wb'),
                            stderr=open(err, 'wb'))
    stats, phase, stop = {}, ['idle'], threading.Event()
    watcher = threading.Thread(target=watch, args=(recv.pid, stats, phase, stop),
                               daemon=True)
    watcher.start()
    h = None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(('127.0.0.1', port)).close()
                break
            except OSError:
                check(time.monotonic() < deadline, 'recv does not listen')
                time.sleep(0.05)
        time.sleep(0.5)         # the idle listener's RSS
        if hostile:
            phase[0] = 'hostile'
            h = Hostiles(port)
            h.start()
            time.sleep(2.5)     # every slot taken, drippers mid-HELLO
        phase[0] = 'migrating'
        t0 = time.monotonic()
        with open(stream, 'rb') as f:
            s = subprocess.run([rdmax, 'send', '--to', '127.0.0.1:%d' % port,
                                '--lanes', '4', '--psk-file', key], stdin=f,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=120)
        took = time.monotonic() - t0
        rc = recv.wait(timeout=60)
    finally:
        if h:
            h.stop()
        stop.set()
        watcher.join()
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    with open(err, errors='replace') as f:
        rerr = f.read()
    serr = s.stderr.decode(errors='replace')
    for ph in ('idle', 'hostile', 'migrating'):
        if ph in stats:
            log('%s: recv peak while %s: %d fds, %.1f MiB RSS' %
                (tag, ph, stats[ph]['fds'], stats[ph]['rss'] / 1024))
    log('%s: send %d, recv %d in %.1f s%s' % (tag, s.returncode, rc, took,
        '; %d hostile connections' % h.conns if h else ''))
    check(s.returncode == 0 and rc == 0, '%s: send exit %d (%s), recv exit %d (%s)'
          % (tag, s.returncode, serr.strip(), rc, rerr.strip()[-2000:]))
    with open(out, 'rb') as f1, open(stream, 'rb') as f2:
        check(hashlib.sha256(f1.read()).digest() == hashlib.sha256(f2.read()).digest(),
              '%s: stream differs' % tag)
    check(not ERR_LINE.search(rerr), '%s: recv logged an error: %s' % (tag, rerr))
    return stats, rerr, h.conns if h else 0


def find_stream(tmp):
    zs = os.path.join(os.environ.get('RDMAX_TESTDATA', os.path.join(
        TOP, '..', 'shared', 'testdata')), 'qemu-10.0', 'pc-10.0-linux-dirty.bin.zst')
    if os.path.exists(zs):
        out = os.path.join(tmp, 'stream.bin')
        subprocess.run(['zstd', '-q', '-d', '--long=27', '-f', zs, '-o', out], check=True)
        return out
    caps = os.environ.get('RDMAX_CAPTURES')
    c = os.path.join(caps, 'pc-7.2-linux-dirty.bin') if caps else ''
    return c if os.path.exists(c) else None


def main():
    rdmax = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                            os.path.join(TOP, 'build', 'rdma-x'))
    with tempfile.TemporaryDirectory(prefix='rdmax-clients-') as tmp:
        stream = find_stream(tmp)
        if not stream:
            print('SKIP: no recorded QEMU stream')
            return 77
        key = os.path.join(tmp, 'key')
        with open(key, 'wb') as f:
            subprocess.run([rdmax, 'keygen'], stdout=f, check=True)
        os.chmod(key, 0o600)
        try:
            migrate(rdmax, tmp, stream, key, 'alone', False)
            got, rerr, n = migrate(rdmax, tmp, stream, key, 'hostile', True)
            refusals = rerr.count('refused connection')
            log('  %d refusals logged, e.g.:' % refusals)
            for why in sorted(set(re.findall(r'refused connection from [^:]+:\d+: (.*)', rerr))):
                log('    ' + why[:100])
            check(refusals >= 13, 'hostile clients were not refused (%d)' % refusals)
            fds = max(v['fds'] for v in got.values())
            check(fds <= FD_MAX, 'recv held %d fds (bound %d)' % (fds, FD_MAX))
            idle, hot = got['idle']['rss'], got['hostile']['rss']
            check(idle > 0 and hot <= idle + HOSTILE_RSS_MIB * 1024,
                  'hostile clients took recv from %.1f to %.1f MiB RSS (bound +%d)' %
                  (idle / 1024, hot / 1024, HOSTILE_RSS_MIB))
            check(got['migrating']['rss'] <= MIGRATION_RSS_MIB * 1024,
                  'recv RSS %.1f MiB while migrating' % (got['migrating']['rss'] / 1024))
        except (Fail, subprocess.TimeoutExpired) as e:
            log('FAIL: %s' % e)
            return 1
    log('PASS fault-clients')
    return 0


if __name__ == '__main__':
    sys.exit(main())
