#!/usr/bin/env python3
"""e2e: QEMU 7.2 migrations with several channels through the unix front end.

  source QEMU  migrate unix:SRC -> capture relay -> rdma-x send --listen-unix S
  rdma-x recv --connect-unix D -> capture relay -> destination QEMU -incoming unix:DQ

Scenarios (argv[2]):
  multifd2      multifd, 2 channels, compression=none
  multifd4      multifd, 4 channels, compression=none
  multifd-zstd  multifd, 2 channels, QEMU's own zstd (carried opaque)
  multifd-zpd   multifd, 2 channels, zero-page-detection=multifd (QEMU 9.0+)
  postcopy      postcopy without preempt: the main channel and its return path only
  preempt       postcopy with the postcopy-preempt channel (no multifd)

The relays (lib/unixcap.py) record every connection on its own, so each
channel is checked byte for byte: connection i as the source QEMU wrote it
equals connection i as the destination QEMU read it, for every i; both
rdma-x exit 0; the stats count the channels; the destination guest's
self-check passes.
Usage: test-unix-channels.py RDMAX SCENARIO
"""
import json
import os
import subprocess
import sys

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check_dst_verifies, check, first_difference, free_port,  # noqa
                 is_listening, log, run_test, set_caps, set_params, wait_for,
                 wait_migration, wait_status)
from unixcap import UnixCapture  # noqa

SCENARIOS = {
    'multifd2': {'caps': {'multifd': True},
                 'params': {'multifd-channels': 2, 'multifd-compression': 'none'},
                 'channels': 2},
    'multifd4': {'caps': {'multifd': True},
                 'params': {'multifd-channels': 4, 'multifd-compression': 'none'},
                 'channels': 4},
    'multifd-zstd': {'caps': {'multifd': True},
                     'params': {'multifd-channels': 2, 'multifd-compression': 'zstd'},
                     'channels': 2},
    # 9.0+: zero pages are announced in the multifd packets, none on main.
    'multifd-zpd': {'caps': {'multifd': True},
                    'params': {'multifd-channels': 2, 'multifd-compression': 'none',
                               'zero-page-detection': 'multifd'},
                    'channels': 2},
    'postcopy': {'caps': {'postcopy-ram': True}, 'params': {}, 'channels': 0,
                 'postcopy': True},
    'preempt': {'caps': {'postcopy-ram': True, 'postcopy-preempt': True},
                'params': {}, 'channels': 1, 'postcopy': True},
}
WORKLOAD = {'mode': 'page-real', 'mib': 32, 'rate': 30, 'report': 0.5}


def body(rig, name):
    sc = SCENARIOS[name]
    port = free_port()
    p = rig.path
    src_sock, send_sock = p('qemu-src.sock'), p('send.sock')
    recv_sock, dst_sock = p('recv.sock'), p('qemu-dst.sock')
    bg = rig.spawn

    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(3, timeout=40)
    caps = dict(sc['caps'], **{'return-path': True})
    for g in (src, dst):
        set_caps(g.qmp, caps)
        if sc['params']:
            set_params(g.qmp, sc['params'])
    # Postcopy: a capped precopy that cannot converge, then the switch.
    set_params(src.qmp, {'max-bandwidth': (24 << 20) if sc.get('postcopy') else (64 << 20)})
    dst.qmp.cmd('migrate-incoming', uri='unix:' + dst_sock)
    wait_for(lambda: os.path.exists(dst_sock), 15, 'destination QEMU')
    cap_dst = UnixCapture(recv_sock, dst_sock, p('cap-dst'))
    recv = bg([rig.rdmax, 'recv', '--listen', '127.0.0.1:%d' % port,
               '--connect-unix', recv_sock, '--lanes', '2',
               '--stats-json', p('recv.json')], 'recv.err')
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    send = bg([rig.rdmax, 'send', '--listen-unix', send_sock,
               '--to', '127.0.0.1:%d' % port, '--lanes', '2',
               '--stats-json', p('send.json')], 'send.err')
    wait_for(lambda: os.path.exists(send_sock), 10, 'rdma-x send socket')
    cap_src = UnixCapture(src_sock, send_sock, p('cap-src'))
    src.qmp.cmd('migrate', uri='unix:' + src_sock)
    if sc.get('postcopy'):
        def moved():
            i = src.qmp.cmd('query-migrate')
            return (i.get('ram', {}).get('transferred', 0) > 24 << 20 or
                    i['status'] not in ('setup', 'active'))
        wait_for(moved, 40, 'precopy to move 24 MiB')
        st = src.qmp.cmd('query-migrate')['status']
        check(st == 'active', 'migration is %s before postcopy started' % st)
        src.qmp.cmd('migrate-start-postcopy')
        log('postcopy started')
    info, seen = wait_migration(src.qmp, 90)
    check(info['status'] == 'completed', 'source migration %s: %s' %
          (info['status'], info.get('error-desc', '')))
    if sc.get('postcopy'):
        check('postcopy-active' in seen, 'never in postcopy-active: %s' % seen)
    ram = info.get('ram', {})
    log('migrated: total %s ms, downtime %s ms, %s bytes (%s multifd)' % (
        info.get('total-time'), info.get('downtime'), ram.get('transferred'),
        ram.get('multifd-bytes')))
    wait_status(dst, ('running',))
    check(src.status() == 'postmigrate', 'source status ' + src.status())
    for who, pr in (('send', send), ('recv', recv)):
        rc = pr.wait(timeout=30)
        check(rc == 0, 'rdma-x %s exit %d: %s' %
              (who, rc, open(p(who + '.err')).read()))
    cap_src.close()
    cap_dst.close()
    check(not cap_src.errors and not cap_dst.errors,
          'relay errors: %s' % (cap_src.errors + cap_dst.errors))
    n = sc['channels'] + 1
    check(cap_src.count == n, 'source QEMU opened %d connections, expected %d' %
          (cap_src.count, n))
    check(cap_dst.count == n, 'destination QEMU got %d connections, expected %d' %
          (cap_dst.count, n))
    for i in range(n):
        a, b = cap_src.path(i), cap_dst.path(i)
        d = first_difference(a, b)
        check(d is None, 'channel %d differs: %s' % (i, d))
    log('channels byte-exact: %s bytes' % cap_src.sizes())
    for who in ('send', 'recv'):
        st = json.load(open(p(who + '.json')))
        check(st.get('qemu_channels') == sc['channels'],
              '%s stats: %s QEMU channels, expected %d' %
              (who, st.get('qemu_channels'), sc['channels']))
        check(st.get('channel_bytes') == sum(cap_src.sizes()[1:]),
              '%s stats: %s channel bytes, captured %d' %
              (who, st.get('channel_bytes'), sum(cap_src.sizes()[1:])))
    # compression=none: the pages go through rdma-x's codec; QEMU-compressed
    # channels and the preempt channel are carried opaque.
    codec = json.load(open(p('send.json')))['channel_codec']
    coded = sc['params'].get('multifd-compression') == 'none'
    check((codec['pages'] > 0) == coded,
          'channel codec pages %d with %s' % (codec['pages'], sc['params']))
    log('channel codec: %d pages, %d -> %d bytes, hit rate %.3f, tiers %s' % (
        codec['pages'], codec['page_bytes'], codec['batch_bytes'], codec['cache_hit_rate'],
        {k: v['pages'] for k, v in codec['tiers'].items()}))
    for pr in rig.procs:
        try:
            pr.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    check_dst_verifies(src, dst)


if __name__ == '__main__':
    scenario = sys.argv.pop(2) if len(sys.argv) > 2 else 'multifd2'
    if scenario not in SCENARIOS:
        sys.exit('unknown scenario %s (one of %s)' % (scenario, ', '.join(SCENARIOS)))
    sys.exit(run_test('unix-' + scenario, lambda rig: body(rig, scenario)))
