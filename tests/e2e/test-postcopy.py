#!/usr/bin/env python3
"""e2e: postcopy migration through rdma-x's exec: channel.

postcopy-ram (and return-path) on both sides. Precopy runs bandwidth-capped
so it cannot finish on its own; once some RAM has moved the test calls
`migrate-start-postcopy`. From then on the destination guest runs and faults
missing pages in through page requests on the return path (REQ_PAGES relayed
by rdma-x recv -> send). Checks:
- status passes through postcopy-active and ends completed;
- the destination guest runs and its workload finds no lost write over two
  full sweeps of its region;
- both captured streams are byte-identical; send and recv exit 0.
Usage: test-postcopy.py [RDMAX]   (or env RDMAX; default build/rdma-x)
"""
import os
import sys

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check_dst_verifies, check_identical, check_rdmax_ok,  # noqa
                 check, first_difference, free_port, is_listening, log,  # noqa
                 run_test, set_caps, set_params, wait_for, wait_migration,
                 wait_status)

WORKLOAD = {'mode': 'page-real', 'mib': 48, 'rate': 40, 'report': 0.5}
PRECOPY_BW = 24 << 20       # below the guest's dirty rate: never converges


def body(rig):
    port = free_port()
    cap_src, cap_dst = rig.path('cap-src.bin'), rig.path('cap-dst.bin')
    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(3, timeout=40)

    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True, 'postcopy-ram': True})
    set_params(src.qmp, {'max-bandwidth': PRECOPY_BW,
                         'max-postcopy-bandwidth': 0})
    dst.qmp.cmd('migrate-incoming', uri=rig.recv_cmd(port, cap_dst))
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    src.qmp.cmd('migrate', uri=rig.send_cmd(port, cap_src))

    # Let precopy move a share of RAM (the first pass over the region).
    def moved():
        i = src.qmp.cmd('query-migrate')
        return (i.get('ram', {}).get('transferred', 0) > 40 << 20 or
                i['status'] not in ('setup', 'active'))
    wait_for(moved, 30, 'precopy to move 40 MiB')
    st = src.qmp.cmd('query-migrate')['status']
    check(st == 'active', 'migration is %s before postcopy started' % st)
    src.qmp.cmd('migrate-start-postcopy')
    log('postcopy started')
    info, seen = wait_migration(src.qmp, 45)
    check(info['status'] == 'completed', 'source migration %s: %s' %
          (info['status'], info.get('error-desc', '')))
    check('postcopy-active' in seen, 'never in postcopy-active: %s' % seen)
    ram = info.get('ram', {})
    log('migrated: total %s ms, downtime %s ms, %s bytes, %s postcopy '
        'requests' % (info.get('total-time'), info.get('downtime'),
                      ram.get('transferred'), ram.get('postcopy-requests')))

    wait_status(dst, ('running',))
    check_dst_verifies(src, dst)

    check_rdmax_ok(rig)
    check_identical(cap_src, cap_dst)


if __name__ == '__main__':
    sys.exit(run_test('postcopy', body))
