#!/usr/bin/env python3
"""e2e fault test: `rdma-x send` or `rdma-x recv` killed (SIGKILL) in each
phase of a migration: setup, bulk (RAM iterating) and at switchover (the
source stopped in pre-switchover, only the device state left to send).

Each fault must end as a *failed* migration: the source QEMU says failed
and its guest keeps running with its memory intact (the workload keeps
verifying), the surviving rdma-x exits non-zero with one `rdma-x: error:`
line, and the destination QEMU never runs the guest. Right after each
fault a second migration of the same guest must complete, and the
destination guest must verify its memory; it is the source of the next
fault.
Usage: test-fault-kill.py [RDMAX]   (or env RDMAX; default build/rdma-x)
"""
import os
import signal
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from faults import WORKLOAD, Attempt, migrate_ok  # noqa
from qmp import log, run_test, wait_for  # noqa

BW = 16 << 20   # bulk: slow enough to still be iterating at the kill
PHASES = os.environ.get('E2E_FAULT_PHASES', 'setup,bulk,switchover').split(',')
SIDES = os.environ.get('E2E_FAULT_SIDES', 'send,recv').split(',')


def fault(rig, src, side, phase):
    tag = 'kill-%s-%s' % (side, phase)
    other = 'recv' if side == 'send' else 'send'
    if phase == 'setup':
        # as soon as send has connected (killed before, recv would have no
        # peer to lose: it keeps listening, as a destination should)
        a = Attempt(rig, src, tag, bw=BW)
        wait_for(lambda: a.connected('send'), 10, 'send to connect',
                 interval=0.01)
        a.signal(side, signal.SIGKILL)
    elif phase == 'bulk':
        a = Attempt(rig, src, tag, bw=BW)
        a.wait_moved(8 << 20)
        a.signal(side, signal.SIGKILL)
    else:
        a = Attempt(rig, src, tag, caps={'pause-before-switchover': True})
        a.wait_pre_switchover()
        a.signal(side, signal.SIGKILL)
        # let the survivor notice first, then let QEMU go on: it must fail
        a.rc(other)
        a.release_switchover()
    a.expect_failed(killed=(side,))


def body(rig):
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(2, timeout=40)
    n = 0
    for phase in PHASES:
        for side in SIDES:
            fault(rig, src, side, phase)
            n += 1
            src = migrate_ok(rig, src, 'retry-%d' % n)
    # QEMU closing its side
    if os.environ.get('E2E_FAULT_QEMU', '1') == '1':
        a = Attempt(rig, src, 'qemu-cancel', bw=BW)
        a.wait_moved(8 << 20)
        src.qmp.cmd('migrate_cancel')
        a.expect_failed(status='cancelled', reasons={
            'send': 'source QEMU closed the stream', 'recv': 'sender: '})
        src = migrate_ok(rig, src, 'retry-cancel')
        a = Attempt(rig, src, 'qemu-dst-killed', bw=BW)
        a.wait_moved(8 << 20)
        os.kill(a.dst.proc.pid, signal.SIGKILL)
        log('qemu-dst-killed: killed the destination QEMU')
        a.expect_failed(reasons={'recv': 'destination QEMU', 'send': 'receiver: '})
        src = migrate_ok(rig, src, 'retry-dst-killed')
        n += 2
    log('%d faults, each followed by a verified migration' % n)


if __name__ == '__main__':
    sys.exit(run_test('fault-kill', body))
