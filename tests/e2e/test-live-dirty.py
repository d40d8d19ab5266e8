#!/usr/bin/env python3
"""e2e: live migration of a guest that dirties memory, through rdma-x.

Return path on (so the source completes only after the destination's SHUT).
The guest rewrites 8 bytes per page over random-filled memory while it
migrates; max-bandwidth is capped so precopy takes several rounds and resends
many pages. rdma-x runs with 3 lanes (E2E_LANES). Checks:
- the migration completes; the destination guest runs; the source is in
  postmigrate;
- the destination's workload sweeps its whole region twice after the switch
  and finds no lost write (no VERIFY-FAIL, verify_bad=0);
- the stream the source wrote and the one the destination read are
  byte-identical; rdma-x send and recv both exit 0, and their --stats-json
  files say result ok and count the stream's size.
Usage: test-live-dirty.py [RDMAX]   (or env RDMAX; default build/rdma-x)
"""
import os
import sys

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check_dst_verifies, check_identical, check_rdmax_ok,  # noqa
                 check_rdmax_stats, check, first_difference, free_port,  # noqa
                 is_listening, log, run_test, set_caps, set_params, wait_for,
                 wait_migration, wait_status)

WORKLOAD = {'mode': 'sparse-random', 'mib': 48, 'rate': 30, 'report': 0.5}
LANES = os.environ.get('E2E_LANES', '3')
# QEMU's own xbzrle on both sides (E2E_XBZRLE=1): rdma-x parses its XBZRLE records.
XBZRLE = os.environ.get('E2E_XBZRLE') == '1'
BW = 64 << 20


def body(rig):
    port = free_port()
    cap_src, cap_dst = rig.path('cap-src.bin'), rig.path('cap-dst.bin')
    stats = {w: rig.path(w + '-stats.json') for w in ('send', 'recv')}
    extra = {w: '' if rig.rdmax == 'socat' else
             '--lanes %s --progress --stats-json %s' % (LANES, stats[w])
             for w in ('send', 'recv')}
    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(3, timeout=40)

    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True, 'xbzrle': XBZRLE})
    if XBZRLE:
        set_params(src.qmp, {'xbzrle-cache-size': 32 << 20})
    # Capped a little above the dirty rate: precopy then needs several rounds,
    # so many pages travel again (rdma-x's delta path), yet it converges.
    set_params(src.qmp, {'max-bandwidth': BW})
    dst.qmp.cmd('migrate-incoming', uri=rig.recv_cmd(port, cap_dst, extra['recv']))
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    src.qmp.cmd('migrate', uri=rig.send_cmd(port, cap_src, extra['send']))
    info, _ = wait_migration(src.qmp, 45)
    check(info['status'] == 'completed', 'source migration %s: %s' %
          (info['status'], info.get('error-desc', '')))
    ram = info.get('ram', {})
    log('migrated: total %s ms, downtime %s ms, %s bytes, %s syncs' % (
        info.get('total-time'), info.get('downtime'), ram.get('transferred'),
        ram.get('dirty-sync-count')))
    if XBZRLE:
        x = info.get('xbzrle-cache', {})
        log('xbzrle: %s pages, %s bytes, cache miss rate %s' % (
            x.get('pages'), x.get('bytes'), x.get('cache-miss-rate')))
        check(x.get('pages', 0) > 0, 'QEMU sent no XBZRLE page: %s' % x)
    check(ram.get('dirty-sync-count', 0) >= 3,
          'migration did not iterate (dirty-sync-count %s)' %
          ram.get('dirty-sync-count'))

    wait_status(dst, ('running',))
    check(src.status() == 'postmigrate', 'source status ' + src.status())

    check_dst_verifies(src, dst)

    check_rdmax_ok(rig)
    a = check_identical(cap_src, cap_dst)
    if rig.rdmax != 'socat':
        check_rdmax_stats(rig, stats, a, timeout=0)


if __name__ == '__main__':
    sys.exit(run_test('live-dirty', body))
