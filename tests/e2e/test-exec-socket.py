#!/usr/bin/env python3
"""e2e: rdma-x whose stdin and stdout are one socket (socat EXEC:).

Wrappers such as socat's EXEC: (and the RDMA relay in tests/rdma) give
the child one socketpair as both stdin and stdout. rdma-x must then
behave as with QEMU's two pipes: when the destination closes its return
path, send must not half-close that shared socket (socat takes the EOF
as the end, closes the connection and kills send before it finished).
A live guest is migrated with return-path on through
    source QEMU -> exec:socat - EXEC:send.sh -> rdma-x send
    rdma-x recv <- EXEC:recv.sh <- exec:socat - <- destination QEMU
and both halves must exit 0 having written their --stats-json, the
streams must be identical and the destination guest must verify.
Usage: test-exec-socket.py [RDMAX]   (or env RDMAX; default build/rdma-x)
"""
import os
import shutil
import sys

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check_dst_verifies, check_identical, check,  # noqa
                 check_rdmax_stats, free_port, is_listening, log, run_test,
                 set_caps, set_params, sh_quote, wait_for, wait_migration)

WORKLOAD = {'mode': 'sparse-real', 'mib': 32, 'rate': 40, 'report': 0.5}


def wrapper(rig, name, argv):
    """A script socat can EXEC: (its address syntax splits on ':')."""
    p = rig.path(name + '.sh')
    with open(p, 'w') as f:
        f.write('#!/bin/sh\nexec %s 2>%s\n' % (
            ' '.join(sh_quote(a) for a in argv), sh_quote(rig.path(name + '.err'))))
    os.chmod(p, 0o755)
    return p


def body(rig):
    check(shutil.which('socat'), 'socat is not installed (scripts/setup installs it)')
    port = free_port()
    cap_src, cap_dst = rig.path('cap-src.bin'), rig.path('cap-dst.bin')
    sj, rj = rig.path('send.json'), rig.path('recv.json')
    send = wrapper(rig, 'send', [rig.rdmax, 'send', '--to', '127.0.0.1:%d' % port,
                                 '--stats-json', sj])
    recv = wrapper(rig, 'recv', [rig.rdmax, 'recv', '--listen', '127.0.0.1:%d' % port,
                                 '--stats-json', rj])
    q = sh_quote
    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(2, timeout=40)
    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True})
        set_params(g.qmp, {'max-bandwidth': 10_000_000_000})
    dst.qmp.cmd('migrate-incoming', uri='exec:socat - EXEC:%s | tee -p %s' % (
        q(recv), q(cap_dst)))
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    src.qmp.cmd('migrate', uri='exec:tee %s | socat - EXEC:%s' % (q(cap_src), q(send)))
    info, _ = wait_migration(src.qmp, 60)
    check(info['status'] == 'completed', 'source migration %s: %s' %
          (info['status'], info.get('error-desc', '')))
    log('migrated: total %s ms, downtime %s ms' % (info.get('total-time'),
                                                   info.get('downtime')))
    a = check_identical(cap_src, cap_dst)
    check_rdmax_stats(rig, {'send': sj, 'recv': rj}, a)
    check_dst_verifies(src, dst)


if __name__ == '__main__':
    sys.exit(run_test('exec-socket', body))
