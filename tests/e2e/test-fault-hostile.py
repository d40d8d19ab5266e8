#!/usr/bin/env python3
"""Fault test (no QEMU needed): a hostile peer that gets past the handshake
(tests/fuzz/hostile-peer.c) can neither crash nor balloon rdma-x.

`rdma-x recv` faces a sender claiming 64 lanes with 64 MiB of page cache
each that then stalls, floods every connection with 4 MiB garbage frames,
floods the lanes with garbage frames of the largest size a lane may carry,
or sends a zstd bomb; `rdma-x send` (sending a real QEMU stream) faces a
receiver that stalls or floods return-path frames; `rdma-x recv --serve
--connect-disks-unix` faces a disk connection that sends a zstd bomb, a
4 GiB zero run or 4 MiB frames (one error line for it, the service stays
up). Each must end with exit
1 and one `rdma-x: error:` line, within its timeout, with a peak RSS under
LIMIT_MIB. What 64 lanes allocate (rings, batch buffers, decoders) is
about 180 MiB once every byte is touched, as under meson's MALLOC_PERTURB_;
the page cache is mapped lazily and none of these attacks fills it. With
4 MiB frames held per lane (before recv capped lane frames at the batch
bound) the flood alone went past 400 MiB.
Usage: test-fault-hostile.py BUILD_DIR
"""
import os
import re
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(__file__))
from importlib import import_module  # noqa
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import unix_server  # noqa

hs = import_module('test-fault-handshake')
LIMIT_MIB = 256
ERR = re.compile(r'^rdma-x: error: .+$', re.M)


def measured(argv, **kw):
    with tempfile.NamedTemporaryFile() as t:
        r = subprocess.run(['/usr/bin/time', '-f', '%M', '-o', t.name] + argv,
                           stderr=subprocess.PIPE, timeout=60, **kw)
        kib = int(open(t.name).read().strip().splitlines()[-1])
    return r.returncode, r.stderr.decode(errors='replace'), kib / 1024


def nbd_sink(path):
    """A stand-in NBD server (the attacks never get past rdma-x): reads all."""
    def drain(c):
        while c.recv(65536):
            pass
    return unix_server(path, drain)


def disk_attacks(rdmax, hostile):
    """recv --serve --connect-disks-unix against a hostile disk connection:
    one error line for it, the service stays up, memory bounded."""
    fails = []
    with tempfile.TemporaryDirectory() as tmp:
        ls = nbd_sink(os.path.join(tmp, 'nbd.sock'))
        for mode in ('disk-bomb', 'disk-zero', 'disk-flood'):
            port = hs.free_port()
            errf = os.path.join(tmp, mode + '.err')
            with open(errf, 'w') as ef:
                r = subprocess.Popen([rdmax, 'recv', '--serve', '--listen', '127.0.0.1:%d' % port,
                                      '--connect-unix', os.path.join(tmp, 'none.sock'),
                                      '--connect-disks-unix', os.path.join(tmp, 'nbd.sock')],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=ef)
            time.sleep(0.3)
            subprocess.run([hostile, 'send', '127.0.0.1:%d' % port, mode],
                           stderr=subprocess.DEVNULL, timeout=60)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not ERR.search(open(errf).read()):
                time.sleep(0.1)
            alive = r.poll() is None
            hwm = 0
            try:
                for l in open('/proc/%d/status' % r.pid):
                    if l.startswith('VmHWM:'):
                        hwm = int(l.split()[1]) / 1024
            except OSError:
                pass
            r.kill()
            r.wait()
            errs = ERR.findall(open(errf).read())
            print('recv --serve vs hostile disk connection (%s): %s, peak %.1f MiB: %s'
                  % (mode, 'still serving' if alive else 'exited', hwm, errs), flush=True)
            if not alive or len(errs) != 1 or 'disk connection 1' not in errs[0] or \
                    hwm > LIMIT_MIB:
                fails.append('recv/' + mode)
        ls.close()
    return fails


def main():
    build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else 'build')
    rdmax = os.path.join(build, 'rdma-x')
    hostile = os.path.join(build, 'tests', 'fuzz', 'rdmax-hostile')
    if not os.path.exists('/usr/bin/time'):
        print('SKIP: /usr/bin/time (package time) missing')
        return 77
    fails = []
    for mode in ('stall', 'flood', 'flood-max', 'bomb'):
        port = hs.free_port()
        h = subprocess.Popen(['sh', '-c', 'sleep 0.3; exec "$@"', 'hostile',
                              hostile, 'send', '127.0.0.1:%d' % port, mode,
                              '64', str(64 << 20)], stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        rc, err, mib = measured([rdmax, 'recv', '--listen', '127.0.0.1:%d' % port],
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
        h.kill()
        h.wait()
        line = err.strip().splitlines()[-1:] or ['']
        print('recv vs hostile sender (%s): exit %d after %.1f s, peak %.1f MiB: %s'
              % (mode, rc, time.monotonic() - t0, mib, line[0]), flush=True)
        if rc != 1 or not ERR.search(err) or mib > LIMIT_MIB:
            fails.append('recv/' + mode)
    fails += disk_attacks(rdmax, hostile)
    with tempfile.TemporaryDirectory() as tmp:
        stream = hs.find_stream(tmp)
        for mode in ('stall', 'flood') if stream else ():
            port = hs.free_port()
            h = subprocess.Popen([hostile, 'recv', str(port), mode],
                                 stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            with open(stream, 'rb') as f:
                rc, err, mib = measured([rdmax, 'send', '--to', '127.0.0.1:%d' % port,
                                         '--lanes', '4'], stdin=f,
                                        stdout=subprocess.DEVNULL)
            h.kill()
            h.wait()
            line = err.strip().splitlines()[-1:] or ['']
            print('send vs hostile receiver (%s): exit %d, peak %.1f MiB: %s'
                  % (mode, rc, mib, line[0]), flush=True)
            if rc != 1 or not ERR.search(err) or mib > LIMIT_MIB:
                fails.append('send/' + mode)
    if fails:
        print('FAIL: %s' % ', '.join(fails))
        return 1
    print('PASS fault-hostile')
    return 0


if __name__ == '__main__':
    sys.exit(main())
