#!/usr/bin/env python3
"""Peak memory (VmHWM, via /usr/bin/time's maximum RSS) of `rdma-x send`
and `rdma-x recv`: real QEMU 7.2 migrations of two guest sizes, and each
side facing a hostile peer (tests/fuzz/hostile-peer.c). Prints a markdown
table for docs/security.md. Not a test: figures, not pass/fail.
Usage: measure-memory.py BUILD_DIR
"""
import os
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from faults import Attempt  # noqa
from qmp import BIG_MEM, SMALL_MEM, Rig, free_port, log  # noqa

BUILD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else 'build')
RDMAX = os.path.join(BUILD, 'rdma-x')
HOSTILE = os.path.join(BUILD, 'tests', 'fuzz', 'rdmax-hostile')
TIME = '/usr/bin/time -f %M -o '


def kib(path):
    with open(path) as f:
        return int(f.read().strip().splitlines()[-1])


def migrations(rows):
    with Rig('memory', RDMAX) as rig:
        rig.failed = False
        for mem, mib in ((SMALL_MEM, 32), (BIG_MEM, 512)):
            wl = {'mode': 'sparse-random', 'mib': mib, 'rate': 30, 'report': 1}
            src = rig.guest('src-' + mem, workload=wl, mem=mem)
            src.wait_reports(2, timeout=120)
            pre = {w: '%s%s ' % (TIME, rig.path('%s-%s.kib' % (mem, w)))
                   for w in ('send', 'recv')}
            a = Attempt(rig, src, 'm-' + mem, prefix=pre, mem=mem,
                        send_extra='--stats-json %s' % rig.path(mem + '.json'))
            a.expect_completed(timeout=300)
            info = src.qmp.cmd('query-migrate')
            rows.append(('migration, guest %s, %d MiB dirtied' % (mem, mib),
                         info['ram']['transferred'] >> 20,
                         kib(rig.path('%s-send.kib' % mem)),
                         kib(rig.path('%s-recv.kib' % mem))))
            log(rows[-1])
            src.kill()
            a.dst.kill()


def hostile(rows):
    tmp = '/tmp/rdmax-mem-%d' % os.getpid()
    os.makedirs(tmp, exist_ok=True)
    # recv facing a hostile sender: 64 lanes, 64 MiB cache each (at the cap)
    for mode in ('stall', 'flood', 'flood-max', 'bomb'):
        port = free_port()
        t = os.path.join(tmp, 'recv-' + mode)
        r = subprocess.Popen(TIME.split() + [t, RDMAX, 'recv', '--listen',
                                              '127.0.0.1:%d' % port],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        time.sleep(0.3)
        h = subprocess.Popen([HOSTILE, 'send', '127.0.0.1:%d' % port, mode,
                              '64', str(64 << 20)], stderr=subprocess.DEVNULL)
        err = r.communicate(timeout=60)[1].decode().strip().splitlines()
        h.kill()
        h.wait()
        rows.append(('recv vs hostile sender: %s (exit %d: %s)' %
                     (mode, r.returncode, err[-1] if err else ''), '-', '-',
                     kib(t)))
        log(rows[-1])
    # send facing a hostile receiver, sending a real 231 MB stream
    stream = os.environ.get('MEM_STREAM')
    for mode in ('stall', 'flood') if stream else ():
        port = free_port()
        t = os.path.join(tmp, 'send-' + mode)
        h = subprocess.Popen([HOSTILE, 'recv', str(port), mode],
                             stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        with open(stream, 'rb') as f:
            s = subprocess.run(TIME.split() + [t, RDMAX, 'send', '--to',
                                               '127.0.0.1:%d' % port, '--lanes', '4'],
                               stdin=f, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=60)
        h.kill()
        h.wait()
        err = s.stderr.decode().strip().splitlines()
        rows.append(('send vs hostile receiver: %s (exit %d: %s)' %
                     (mode, s.returncode, err[-1] if err else ''), '-', kib(t), '-'))
        log(rows[-1])


def main():
    rows = []
    hostile(rows)
    if os.environ.get('MEM_QEMU', '1') == '1':
        migrations(rows)
    print('| case | MiB moved | send peak RSS (MiB) | recv peak RSS (MiB) |')
    print('|---|---|---|---|')
    for c, moved, s, r in rows:
        f = (lambda v: v if v == '-' else '%.1f' % (v / 1024))
        print('| %s | %s | %s | %s |' % (c, moved, f(s), f(r)))


if __name__ == '__main__':
    main()
