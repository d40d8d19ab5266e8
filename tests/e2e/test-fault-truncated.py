#!/usr/bin/env python3
"""Fault test (no QEMU needed): a stream that stops inside the device state.

When the source QEMU cancels a migration (migrate_cancel) or dies during
the device-state tail, rdma-x send sees its stdin end early. The tail is
carried unparsed, so only QEMU's end-of-stream marker (footer, EOF, and
the VMDESC in precopy) tells a finished stream from a cut one. A real QEMU
stream (../shared/testdata) is cut inside its device state and inside its
VMDESC and replayed through `rdma-x send | rdma-x recv` on loopback: both
must exit 1 with one `rdma-x: error:` line, send's saying the source QEMU
closed the stream inside the device state, recv's passing that on. The
whole stream must still come out byte-identical (exit 0 on both).
Usage: test-fault-truncated.py [RDMAX]
"""
import hashlib
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import TestFailure as Fail, check, free_port  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
ERR_LINE = re.compile(r'^rdma-x: error: .+$', re.M)


def eof_before_vmdesc(data):
    """Offset of QEMU's EOF byte (0x00) before the VMDESC ending data."""
    i = len(data) - 6
    while i > 6:
        i = data.rfind(b'\x00\x06', 0, i)
        if i < 0:
            break
        n = struct.unpack('>I', data[i + 2:i + 6])[0]
        if i + 6 + n == len(data) and data[i + 6:i + 7] == b'{':
            return i
    raise Fail('no EOF + VMDESC at the end of the stream')


def replay(rdmax, tmp, data, tag):
    """send < data | recv; (send rc, send stderr, recv rc, recv stderr, out)."""
    port = free_port()
    src, out = os.path.join(tmp, tag + '.in'), os.path.join(tmp, tag + '.out')
    with open(src, 'wb') as f:
        f.write(data)
    recv = subprocess.Popen([rdmax, 'recv', '--listen', '127.0.0.1:%d' % port],
                            stdin=subprocess.DEVNULL, stdout=open(out, 'wb'),
                            stderr=subprocess.PIPE)
    try:
        with open(src, 'rb') as f:
            s = subprocess.run([rdmax, 'send', '--to', '127.0.0.1:%d' % port,
                                '--lanes', '2'], stdin=f,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=60)
        rerr = recv.communicate(timeout=30)[1]
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    with open(out, 'rb') as f:
        got = f.read()
    return (s.returncode, s.stderr.decode(errors='replace'), recv.returncode,
            rerr.decode(errors='replace'), got)


def one_error(err, want, who):
    lines = err.strip().splitlines()
    check(len(ERR_LINE.findall(err)) == 1 and lines and ERR_LINE.match(lines[-1]),
          '%s: not one "rdma-x: error:" line: %r' % (who, err))
    check(re.search(want, lines[-1]), '%s: reason %r does not match %r' %
          (who, lines[-1], want))


def main():
    rdmax = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                            os.path.join(TOP, 'build', 'rdma-x'))
    zs = os.path.join(os.environ.get('RDMAX_TESTDATA', os.path.join(
        TOP, '..', 'shared', 'testdata')), 'qemu-10.0', 'pc-10.0-idle-bios.bin.zst')
    if not os.path.exists(zs):
        print('SKIP: no QEMU stream (%s)' % zs)
        return 77
    with tempfile.TemporaryDirectory(prefix='rdmax-truncated-') as tmp:
        stream = os.path.join(tmp, 'stream.bin')
        subprocess.run(['zstd', '-q', '-d', '--long=27', '-f', zs, '-o', stream],
                       check=True)
        with open(stream, 'rb') as f:
            data = f.read()
        eof = eof_before_vmdesc(data)
        try:
            for tag, cut in (('device-state', eof - 3000), ('before-eof', eof),
                             ('vmdesc', eof + 5000), ('last-byte', len(data) - 1)):
                t0 = time.monotonic()
                src_rc, src_err, dst_rc, dst_err, _ = replay(rdmax, tmp, data[:cut], tag)
                print('%s: cut at %d of %d: send %d, recv %d (%.1f s)\n  send: %s\n  recv: %s'
                      % (tag, cut, len(data), src_rc, dst_rc, time.monotonic() - t0,
                         src_err.strip(), dst_err.strip()), flush=True)
                check(src_rc == 1 and dst_rc == 1, '%s: exits %d / %d, want 1 / 1'
                      % (tag, src_rc, dst_rc))
                want = r'source QEMU closed the stream.*inside the device state'
                one_error(src_err, want, 'send')
                one_error(dst_err, r'sender: ' + want, 'recv')
            src_rc, src_err, dst_rc, dst_err, got = replay(rdmax, tmp, data, 'whole')
            check(src_rc == 0 and dst_rc == 0, 'whole stream: exits %d / %d: %s %s'
                  % (src_rc, dst_rc, src_err, dst_err))
            check(hashlib.sha256(got).digest() == hashlib.sha256(data).digest(),
                  'whole stream differs')
            print('whole stream: identical, both exit 0')
        except (Fail, subprocess.TimeoutExpired) as e:
            print('FAIL: %s' % e)
            return 1
    print('PASS fault-truncated')
    return 0


if __name__ == '__main__':
    sys.exit(main())
