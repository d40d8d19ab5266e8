#!/usr/bin/env python3
"""e2e: a stopped guest migrated through rdma-x arrives bit for bit.

The source guest is stopped (`stop`) before `migrate`, so its RAM is frozen:
- the stream the source QEMU wrote (tee before `rdma-x send`) and the stream
  the destination QEMU read (tee after `rdma-x recv`) are byte-identical;
- the destination's guest RAM equals the source's (pmemsave on both);
- after `cont` the destination guest runs and its workload finds every page
  as it left it (verify_bad=0, one full pass over the region).
Usage: test-stopped-guest.py [RDMAX]   (or env RDMAX; default build/rdma-x)
"""
import os
import sys

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check_dst_verifies, check_identical, check_rdmax_ok,  # noqa
                 check, first_difference, free_port, is_listening, log,  # noqa
                 run_test, set_caps, set_params, wait_for, wait_migration,
                 wait_status)

WORKLOAD = {'mode': 'sparse-real', 'mib': 32, 'rate': 40, 'report': 0.5}


def body(rig):
    port = free_port()
    cap_src, cap_dst = rig.path('cap-src.bin'), rig.path('cap-dst.bin')
    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(2, timeout=40)

    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True})
        set_params(g.qmp, {'max-bandwidth': 10_000_000_000})
    src.qmp.cmd('stop')
    dst.qmp.cmd('migrate-incoming', uri=rig.recv_cmd(port, cap_dst))
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    src.qmp.cmd('migrate', uri=rig.send_cmd(port, cap_src))
    info, _ = wait_migration(src.qmp, 45)
    check(info['status'] == 'completed', 'source migration %s: %s' %
          (info['status'], info.get('error-desc', '')))
    log('migrated: total %s ms, %s bytes' % (
        info.get('total-time'), info.get('ram', {}).get('transferred')))

    # A stopped source leaves the destination paused (global runstate).
    wait_status(dst, ('paused',))
    check(src.status() == 'postmigrate', 'source status ' + src.status())
    check_rdmax_ok(rig)

    check_identical(cap_src, cap_dst)

    h_src = src.dump_ram(rig.path('ram-src.bin'))
    h_dst = dst.dump_ram(rig.path('ram-dst.bin'))
    d = first_difference(rig.path('ram-src.bin'), rig.path('ram-dst.bin'))
    check(d is None, 'guest RAM differs from byte 0x%x (page 0x%x)' %
          (d or 0, (d or 0) >> 12))
    check(h_src == h_dst, 'RAM hashes differ')
    for f in ('ram-src.bin', 'ram-dst.bin'):
        os.unlink(rig.path(f))
    log('guest RAM identical: sha256 %s' % h_src[:16])

    # The destination's console log starts empty: its guest runs on from
    # the source's last pass.
    before = src.reports()[-1]['passes']
    dst.qmp.cmd('cont')
    wait_status(dst, ('running',))
    wait_for(lambda: dst.reports() and
             dst.reports()[-1]['passes'] >= before + 2, 30,
             'destination workload to sweep the region')
    check(not dst.verify_failures(), 'destination guest: ' +
          '; '.join(dst.verify_failures()[:4]))
    check(dst.reports()[-1]['bad'] == 0, 'destination verify_bad > 0')
    log('destination guest verified: %s' % dst.reports()[-1])


if __name__ == '__main__':
    sys.exit(run_test('stopped-guest', body))
