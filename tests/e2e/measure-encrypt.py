#!/usr/bin/env python3
"""Cost of --psk-file and --encrypt: a QEMU stream replayed through
`rdma-x send | rdma-x recv` on loopback, plain / PSK / PSK+encrypt
interleaved RUNS times; prints best and median wall time and the median CPU
seconds of each side (docs/security.md). Not a test: figures.
Usage: measure-encrypt.py BUILD_DIR STREAM [RUNS] [SEND_OPTS...]
  (e.g. SEND_OPTS = --zstd-level -1 so every page byte is encrypted)
"""
import os
import socket
import statistics as st
import subprocess
import sys
import tempfile
import time


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu(path):
    u, s = open(path).read().split()[-2:]
    return float(u) + float(s)


def once(rdmax, stream, opts, send_opts, tmp):
    port = free_port()
    tr, ts = os.path.join(tmp, 'tr'), os.path.join(tmp, 'ts')
    r = subprocess.Popen(['/usr/bin/time', '-f', '%U %S', '-o', tr, rdmax, 'recv',
                          '--listen', '127.0.0.1:%d' % port] + opts,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    time.sleep(0.2)
    t0 = time.monotonic()
    with open(stream, 'rb') as f:
        s = subprocess.run(['/usr/bin/time', '-f', '%U %S', '-o', ts, rdmax, 'send',
                            '--to', '127.0.0.1:%d' % port, '--lanes', '2'] + opts +
                           send_opts, stdin=f, stdout=subprocess.DEVNULL)
    r.wait()
    wall = time.monotonic() - t0
    if s.returncode or r.returncode:
        sys.exit('run failed: send %d recv %d' % (s.returncode, r.returncode))
    return wall, cpu(ts), cpu(tr)


def main():
    build, stream = os.path.abspath(sys.argv[1]), sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 11
    send_opts = sys.argv[4:]
    rdmax = os.path.join(build, 'rdma-x')
    size = os.path.getsize(stream)
    with tempfile.TemporaryDirectory() as tmp:
        key = os.path.join(tmp, 'key')
        with open(key, 'w') as f:
            f.write(os.urandom(32).hex())
        os.chmod(key, 0o600)
        modes = [('plain', []), ('--psk-file', ['--psk-file', key]),
                 ('--psk-file --encrypt', ['--psk-file', key, '--encrypt'])]
        res = {m: [] for m, _ in modes}
        for _ in range(runs):
            for m, o in modes:
                res[m].append(once(rdmax, stream, o, send_opts, tmp))
    print('stream %s: %d bytes, %d runs, send %s' % (stream, size, runs,
                                                    ' '.join(send_opts)))
    print('| mode | best wall | MB/s best / median | CPU send / recv (median) |')
    print('|---|---|---|---|')
    for m, _ in modes:
        w = [x[0] for x in res[m]]
        print('| %s | %.3f s | %.0f / %.0f | %.2f s / %.2f s |' % (
            m, min(w), size / min(w) / 1e6, size / st.median(w) / 1e6,
            st.median(x[1] for x in res[m]), st.median(x[2] for x in res[m])))


if __name__ == '__main__':
    main()
