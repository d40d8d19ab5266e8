#!/usr/bin/env python3
"""e2e: `rdma-x recv` killed (SIGKILL) in the middle of a migration.

Nothing may be lost: the source QEMU must see the failure promptly and mark
the migration `failed`, the source guest must keep running (and keep passing
its own memory check), and `rdma-x send` must exit non-zero with a one-line
`rdma-x: error: ...` on stderr; the destination must not run a guest from
the broken stream. Precopy is bandwidth-capped below the guest's
dirty rate so the migration is still in flight when recv dies.
Usage: test-recv-killed.py [RDMAX]   (or env RDMAX; default build/rdma-x)
"""
import os
import re
import signal
import sys
import time

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check, free_port, is_listening, log, run_test,  # noqa
                 set_caps, set_params, wait_for, wait_migration)

WORKLOAD = {'mode': 'sparse-random', 'mib': 48, 'rate': 40, 'report': 0.5}
BW = 16 << 20


def body(rig):
    port = free_port()
    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(2, timeout=40)

    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True})
    set_params(src.qmp, {'max-bandwidth': BW})
    dst.qmp.cmd('migrate-incoming', uri=rig.recv_cmd(port))
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    src.qmp.cmd('migrate', uri=rig.send_cmd(port))

    def moved():
        i = src.qmp.cmd('query-migrate')
        check(i['status'] in ('setup', 'active'),
              'migration %s before the kill' % i['status'])
        return i.get('ram', {}).get('transferred', 0) > 16 << 20
    wait_for(moved, 30, 'migration to move 16 MiB')

    recv = rig.relay_pids(dst, 'recv')
    check(recv, 'no rdma-x recv process under the destination QEMU')
    for p in recv:
        os.kill(p, signal.SIGKILL)
    t_kill = time.monotonic()
    log('killed rdma-x recv (pid %s)' % recv)

    info, _ = wait_migration(src.qmp, 20)
    dt = time.monotonic() - t_kill
    check(info['status'] == 'failed', 'source migration ended %s, not failed'
          % info['status'])
    log('source migration failed %.1f s after the kill: %s' %
        (dt, info.get('error-desc', '')))
    check(dt < 10, 'source took %.1f s to notice' % dt)
    check(src.status() == 'running', 'source guest is %s' % src.status())

    rc = rig.rc('send')
    err = rig.stderr_of('send')
    log('rdma-x send exit %d, stderr: %s' % (rc, err.strip()[-300:]))
    check(rc != 0, 'rdma-x send exited 0 after its peer was killed')
    check(re.search(r'^rdma-x: error: .+', err, re.M),
          'no "rdma-x: error: ..." line on send stderr')

    # the destination never runs a guest from a broken stream
    try:
        dst_state = dst.status()
    except Exception:           # QEMU exits after a failed incoming load
        dst_state = 'exited'
    check(dst_state != 'running', 'destination guest runs after a broken '
          'stream')
    log('destination: %s' % dst_state)

    # the source guest keeps running and its memory stays intact
    n = len(src.reports())
    src.wait_reports(n + 3, timeout=20)
    check(not src.verify_failures(), 'source guest: ' +
          '; '.join(src.verify_failures()[:4]))
    check(src.reports()[-1]['bad'] == 0, 'source verify_bad > 0')


if __name__ == '__main__':
    sys.exit(run_test('recv-killed', body))
