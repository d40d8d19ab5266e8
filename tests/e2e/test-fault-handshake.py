#!/usr/bin/env python3
"""Fault test (no QEMU needed): who may talk to `rdma-x recv`.

One `rdma-x recv --psk-file K` listens; then, one after another:
- a sender without a key, a sender with the wrong key, a sender asking for
  --encrypt: each refused, exiting 1 with a one-line reason;
- a client speaking garbage (an HTTP request), a client speaking the old
  wire protocol v1, a client that connects and says nothing: each gets an
  ERROR frame with the reason (or is dropped after the handshake timeout);
- a client that gives up with a hostile ERROR reason (control characters,
  a forged log line, too long), and a fake receiver refusing `rdma-x send`
  with one: both logs show it printable and capped;
and after all of them a correct sender still gets through: the stream
comes out byte for byte and both sides exit 0. The refusals must be in
recv's log, one line each. A second listener checks the same with
--encrypt on both sides, and that a key file readable by others and a
passphrase instead of a key are refused, while `rdma-x keygen` output and
32 binary random bytes work.
The stream is a real QEMU migration stream (../shared/testdata, or the 7.2
captures of scripts/test); skips (77) when there is none.
Usage: test-fault-handshake.py [RDMAX]
"""
import glob
import hashlib
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
ERR_LINE = re.compile(r'^rdma-x: error: .+$', re.M)


def crc32c(data, crc=0):
    table = crc32c.table
    if not table:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
    crc ^= 0xffffffff
    for b in data:
        crc = table[(crc ^ b) & 0xff] ^ (crc >> 8)
    return crc ^ 0xffffffff


crc32c.table = []


def frame(ftype, payload, channel=0):
    hdr = struct.pack('>BBHI', ftype, 0, channel, len(payload))
    return hdr + struct.pack('>I', crc32c(hdr + payload)) + payload


def hello_v1():
    """What an rdma-x speaking wire protocol v1 sent first (48 bytes)."""
    p = struct.pack('>IHHHHIQIQi', 0x52444d58, 1, 0, 0, 2, 4096, 42, 0,
                    64 << 20, 0)
    return frame(1, p + b'\0' * (48 - len(p)))


WIRE_VERSION = 3   # transport/wire.h RDMAX_WIRE_VERSION


def hello_now(features, lanes=2, role=0, lane=0, session=42):
    """A HELLO of this wire version (112 bytes): the fields of transport/wire.c."""
    p = struct.pack('>IHHHHIQIQiI', 0x52444d58, WIRE_VERSION, role, lane, lanes, 4096,
                    session, features, 64 << 20, 0, 0)
    p += b'\0' * (48 - len(p)) + os.urandom(32) + b'\0' * 32
    return frame(1, p)


def read_frame(s):
    """One frame from socket s: (type, payload)."""
    def exact(n):
        b = b''
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c:
                raise Fail('connection closed inside a frame')
            b += c
        return b
    hdr = exact(12)
    return hdr[0], exact(struct.unpack('>I', hdr[4:8])[0])


# What a hostile peer puts in an ERROR reason: a forged log line, a terminal
# escape, NUL, high bytes, and more than is logged.
HOSTILE = (b'evil\nrdma-x: error: forged line\r\x1b[2J\x00\xff\x07' +
           b'A' * 400)   # handshake frames are at most 511 bytes


def printable_line(text, what):
    """text (one rdma-x stderr line, the newline cut off) holds no control
    or non-ASCII character and is capped."""
    check(all(0x20 <= ord(ch) <= 0x7e for ch in text),
          '%s: unsanitised peer text: %r' % (what, text))
    check(len(text) < 400, '%s: peer text not capped (%d chars)' %
          (what, len(text)))
    check('forged line' in text and '...' in text,
          '%s: reason lost: %r' % (what, text))


def hostile_error_text(rdmax, port, stream, key):
    """A peer's ERROR text is sanitised before rdma-x logs it: a client that
    gives up with a hostile reason after the receiver's HELLO_ACK, and a
    fake receiver that refuses the sender with one."""
    s = socket.create_connection(('127.0.0.1', port), timeout=10)
    s.sendall(hello_now(features=1))
    t, _ = read_frame(s)
    check(t == 2, 'no HELLO_ACK for a HELLO with a PSK (frame %d)' % t)
    s.sendall(frame(8, HOSTILE))
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    s.close()

    ls = socket.socket()
    ls.bind(('127.0.0.1', 0))
    ls.listen(4)
    fake = ls.getsockname()[1]

    def serve():
        c, _ = ls.accept()
        try:
            read_frame(c)
            c.sendall(frame(8, HOSTILE))
            c.shutdown(socket.SHUT_WR)
            while c.recv(4096):
                pass
        except (OSError, Fail):
            pass
        c.close()
    import threading
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    rc, err = send(rdmax, fake, stream, ['--psk-file', key])
    th.join(10)
    ls.close()
    lines = err.strip().split('\n')
    log('  send refused by a fake receiver: exit %d: %r' % (rc, err[:120]))
    check(rc == 1 and len(lines) == 1 and ERR_LINE.match(lines[0]),
          'not one error line: %r' % err)
    printable_line(lines[0], 'send')


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def log(*a):
    print(*a, flush=True)


def find_stream(tmp):
    zs = sorted(glob.glob(os.path.join(
        os.environ.get('RDMAX_TESTDATA', os.path.join(TOP, '..', 'shared',
                                                      'testdata')),
        'qemu-10.0', 'pc-10.0-idle-bios.bin.zst')))
    if zs:
        out = os.path.join(tmp, 'stream.bin')
        subprocess.run(['zstd', '-q', '-d', '--long=27', '-f', zs[0], '-o', out],
                       check=True)
        return out
    caps = os.environ.get('RDMAX_CAPTURES')
    for c in sorted(glob.glob(os.path.join(caps or '/nonexistent', '*.bin'))):
        return c
    return None


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    p = s.getsockname()[1]
    s.close()
    return p


def raw_client(port, data, wait=10):
    """Connect, send data, return the ERROR reason the listener answered
    (b'' when it closed without one)."""
    s = socket.create_connection(('127.0.0.1', port), timeout=wait)
    if data:
        s.sendall(data)
    buf = b''
    try:
        while True:
            b = s.recv(4096)
            if not b:
                break
            buf += b
    except socket.timeout:
        raise Fail('listener kept a client waiting %d s' % wait)
    except ConnectionResetError:
        pass
    s.close()
    if len(buf) >= 12 and buf[0] == 8:
        n = struct.unpack('>I', buf[4:8])[0]
        return buf[12:12 + n].decode(errors='replace')
    return ''


RECEIVERS = []


class Recv:
    def __init__(self, rdmax, tmp, tag, extra):
        self.port = free_port()
        self.out = os.path.join(tmp, tag + '.out')
        self.err = os.path.join(tmp, tag + '.err')
        self.p = subprocess.Popen([rdmax, 'recv', '--listen',
                                   '127.0.0.1:%d' % self.port] + extra,
                                  stdin=subprocess.DEVNULL,
                                  stdout=open(self.out, 'wb'),
                                  stderr=open(self.err, 'wb'))
        RECEIVERS.append(self.p)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(('127.0.0.1', self.port)).close()
                break   # (that probe is refused as "no valid handshake")
            except OSError:
                check(time.monotonic() < deadline, 'recv does not listen')
                time.sleep(0.05)

    def stderr(self):
        with open(self.err) as f:
            return f.read()


def send(rdmax, port, stream, extra):
    with open(stream, 'rb') as f:
        r = subprocess.run([rdmax, 'send', '--to', '127.0.0.1:%d' % port,
                            '--lanes', '2'] + extra, stdin=f,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=60)
    return r.returncode, r.stderr.decode(errors='replace')


def refused(rdmax, port, stream, extra, want):
    rc, err = send(rdmax, port, stream, extra)
    log('  send %s -> exit %d: %s' % (' '.join(extra) or '(no key)', rc,
                                      err.strip()))
    check(rc == 1, 'refused sender exited %d' % rc)
    # Notes (e.g. which transport auto chose) may come first; the failure is
    # one error line, and the last one.
    lines = err.strip().splitlines()
    check(len(ERR_LINE.findall(err)) == 1 and lines and ERR_LINE.match(lines[-1]),
          'not one "rdma-x: error:" line, last: %r' % err)
    check(re.search(want, err), 'reason does not match %r: %s' % (want, err))


def sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def body(rdmax, tmp):
    stream = find_stream(tmp)
    if not stream:
        print('SKIP: no QEMU stream to send')
        return 77
    key, key2, loose, weak, binary = (os.path.join(tmp, k) for k in (
        'key', 'key2', 'loose', 'weak', 'binary'))
    for k in (key, loose):
        with open(k, 'w') as f:
            f.write(os.urandom(32).hex() + '\n')
    with open(key2, 'wb') as f:     # rdma-x keygen makes keys
        subprocess.run([rdmax, 'keygen'], stdout=f, check=True)
    with open(weak, 'w') as f:      # a passphrase, not a key
        f.write('correct horse battery staple\n')
    with open(binary, 'wb') as f:   # head -c 32 /dev/urandom
        f.write(os.urandom(32))
    for k in (key, key2, loose, weak, binary):
        os.chmod(k, 0o600)
    os.chmod(loose, 0o644)
    with open(key2) as f:
        check(re.fullmatch(r'[0-9a-f]{64}\n', f.read()), 'rdma-x keygen output')

    log('listener with --psk-file')
    r = Recv(rdmax, tmp, 'psk', ['--psk-file', key])
    refused(rdmax, r.port, stream, [], r'authentication required')
    refused(rdmax, r.port, stream, ['--psk-file', key2],
            r'authentication failed.*(wrong --psk-file|does not hold)')
    refused(rdmax, r.port, stream, ['--psk-file', key, '--encrypt'],
            r'encryption mismatch')
    why = raw_client(r.port, b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
    log('  garbage client got: %r' % why)
    check('no valid rdma-x handshake' in why, 'garbage: %r' % why)
    why = raw_client(r.port, hello_v1())
    log('  v1 client got: %r' % why)
    check('wire protocol v1' in why and 'v3' in why, 'old version: %r' % why)
    hostile_error_text(rdmax, r.port, stream, key)
    t0 = time.monotonic()
    why = raw_client(r.port, b'')
    log('  silent client dropped after %.1f s: %r' % (time.monotonic() - t0, why))
    check(time.monotonic() - t0 < 5, 'silent client held the listener')
    # a silent client still connected must not starve the real sender
    quiet = socket.create_connection(('127.0.0.1', r.port))
    rc, err = send(rdmax, r.port, stream, ['--psk-file', key])
    quiet.close()
    check(rc == 0, 'correct sender after the hostile ones: exit %d: %s' % (rc, err))
    check(r.p.wait(timeout=30) == 0, 'recv exit %s: %s' % (r.p.returncode,
                                                          r.stderr()))
    check(sha(r.out) == sha(stream), 'stream differs after the refusals')
    lines = [l for l in r.stderr().splitlines() if 'refused connection' in l]
    log('  recv log: %d refusals' % len(lines))
    for l in lines:
        log('    ' + l)
    check(len(lines) >= 8, 'refusals missing from the recv log')
    gave_up = [l for l in lines if 'sender gave up: evil' in l]
    check(len(gave_up) == 1, 'hostile ERROR text: %r' % gave_up)
    printable_line(gave_up[0], 'recv')

    log('listener with --psk-file --encrypt')
    r = Recv(rdmax, tmp, 'enc', ['--psk-file', key, '--encrypt'])
    refused(rdmax, r.port, stream, ['--psk-file', key], r'encryption mismatch')
    rc, err = send(rdmax, r.port, stream, ['--psk-file', key, '--encrypt'])
    check(rc == 0, 'encrypted sender: exit %d: %s' % (rc, err))
    check(r.p.wait(timeout=30) == 0, 'recv exit %s' % r.p.returncode)
    check(sha(r.out) == sha(stream), 'encrypted stream differs')
    log('  encrypted stream identical')

    log('key file checks')
    refused(rdmax, 9, stream, ['--psk-file', loose], r'readable by others')
    refused(rdmax, 9, stream, ['--psk-file', os.path.join(tmp, 'none')],
            r'cannot read the key file')
    refused(rdmax, 9, stream, ['--psk-file', weak],
            r'not a high-entropy key.*rdma-x keygen >.*head -c 32 /dev/urandom')
    r = Recv(rdmax, tmp, 'binary', ['--psk-file', binary])
    rc, err = send(rdmax, r.port, stream, ['--psk-file', binary])
    check(rc == 0, 'binary key: exit %d: %s' % (rc, err))
    check(r.p.wait(timeout=30) == 0, 'recv exit %s' % r.p.returncode)
    log('  a weak key refused, a 32-byte binary key works')
    r = subprocess.run([rdmax, 'send', '--to', '127.0.0.1:9', '--encrypt'],
                       stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    check(r.returncode == 2 and b'--encrypt needs --psk-file' in r.stderr,
          '--encrypt without a key: %r' % r.stderr)
    return 0


def main():
    rdmax = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                            os.environ.get('RDMAX', os.path.join(TOP, 'build',
                                                                 'rdma-x')))
    with tempfile.TemporaryDirectory(prefix='rdmax-handshake-') as tmp:
        try:
            rc = body(rdmax, tmp)
        except (Fail, subprocess.TimeoutExpired) as e:
            log('FAIL: %s' % e)
            return 1
        finally:
            for p in RECEIVERS:     # a failed check must not leave listeners
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if rc == 0:
        log('PASS fault-handshake')
    return rc


if __name__ == '__main__':
    sys.exit(main())
