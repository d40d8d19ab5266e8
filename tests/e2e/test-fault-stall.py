#!/usr/bin/env python3
"""e2e fault test: the link cut, and each peer stalled (SIGSTOP).

The two QEMUs run in two network namespaces made for this test, joined by
a veth pair; rdma-x carries the migration over that link.
- link cut: `ip link set ... down` on both ends in the bulk phase. Nothing
  arrives and nothing is refused, so only the keep-alive timeout
  (--timeout, default 5 s) can notice: both rdma-x must give up with a
  reason, the source QEMU mark the migration failed and keep its guest.
- recv stopped: send must notice the silence and fail the migration; the
  destination QEMU (stuck behind its stopped recv) never runs the guest.
- send stopped: recv must notice and fail, so the destination QEMU gives
  up; once send is continued it must fail at once, so the source QEMU
  fails the migration and resumes its guest.
After each fault (the link mended) a second migration over the same link
must complete and its destination verify its memory.
Usage: test-fault-stall.py [RDMAX]   (or env RDMAX; default build/rdma-x)
Needs root (ip netns); skips (77) without it.
"""
import os
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from faults import WORKLOAD, Attempt, migrate_ok  # noqa
from qmp import SKIP, check, log, run_test  # noqa

BW = 16 << 20
SILENT = r'silent for too long|connection closed|checksum'


class Link:
    """Two namespaces joined by a veth pair; only this test's addresses."""

    def __init__(self):
        tag = '%d' % (os.getpid() % 100000)
        self.ns = ('rdmaxfa' + tag, 'rdmaxfb' + tag)
        self.dev = ('rxfa' + tag, 'rxfb' + tag)
        self.addr = ('10.231.0.1', '10.231.0.2')
        for n in self.ns:
            self.ip('netns', 'add', n)
        self.ip('link', 'add', self.dev[0], 'type', 'veth', 'peer', 'name',
                self.dev[1])
        for i in (0, 1):
            self.ip('link', 'set', self.dev[i], 'netns', self.ns[i])
            self.ip('-n', self.ns[i], 'addr', 'add', self.addr[i] + '/30',
                    'dev', self.dev[i])
            self.ip('-n', self.ns[i], 'link', 'set', 'lo', 'up')
        self.up()

    @staticmethod
    def ip(*args):
        subprocess.run(('ip',) + args, check=True)

    def wrapper(self, i):
        return ('ip', 'netns', 'exec', self.ns[i])

    def up(self):
        for i in (0, 1):
            self.ip('-n', self.ns[i], 'link', 'set', self.dev[i], 'up')

    def cut(self):
        for i in (0, 1):
            self.ip('-n', self.ns[i], 'link', 'set', self.dev[i], 'down')
        log('link cut')

    def close(self):
        for n in self.ns:
            subprocess.run(('ip', 'netns', 'del', n), stderr=subprocess.DEVNULL)


def body(rig):
    if os.geteuid() != 0:
        print('SKIP: network namespaces need root')
        sys.exit(SKIP)
    link = Link()
    try:
        run(rig, link)
    finally:
        link.close()


def run(rig, link):
    side = [0]      # namespace of the current source guest

    def kw():
        # the destination always goes to the other namespace: over the link
        d = 1 - side[0]
        return dict(send_to=link.addr[d], listen=link.addr[d],
                    dst_wrapper=link.wrapper(d))

    def hop(src, tag):
        dst = migrate_ok(rig, src, tag, **kw())
        side[0] = 1 - side[0]
        return dst

    src = rig.guest('src', workload=WORKLOAD, wrapper=link.wrapper(0))
    src.wait_reports(2, timeout=40)

    # 1. link cut in the bulk phase
    a = Attempt(rig, src, 'cut', bw=BW, **kw())
    a.wait_moved(8 << 20)
    link.cut()
    t0 = time.monotonic()
    a.expect_failed(reasons={'send': SILENT, 'recv': SILENT})
    log('link cut noticed and handled in %.1f s' % (time.monotonic() - t0))
    link.up()
    src = hop(src, 'retry-cut')

    # 2. recv stopped: send must notice the silence
    a = Attempt(rig, src, 'stop-recv', bw=BW, **kw())
    a.wait_moved(8 << 20)
    a.signal('recv', signal.SIGSTOP)
    a.expect_failed(killed=('recv',), reasons={'send': r'silent for too long'})
    src = hop(src, 'retry-stop-recv')

    # 3. send stopped: recv must notice; send fails once continued
    a = Attempt(rig, src, 'stop-send', bw=BW, **kw())
    a.wait_moved(8 << 20)
    pids = a.signal('send', signal.SIGSTOP)
    rc = a.rc('recv', timeout=20)
    err = a.stderr('recv')
    log('stop-send: recv exit %d: %s' % (rc, err.strip()))
    check(rc != 0 and 'silent for too long' in err,
          'recv did not report the stalled sender: %s' % err)
    st = src.qmp.cmd('query-migrate')['status']
    check(st in ('active', 'failed'), 'source migration %s' % st)
    for p in pids:
        os.kill(p, signal.SIGCONT)
    log('stop-send: send continued')
    a.expect_failed(within=15)
    src = hop(src, 'retry-stop-send')


if __name__ == '__main__':
    sys.exit(run_test('fault-stall', body))
