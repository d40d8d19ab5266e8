#!/usr/bin/env python3
"""e2e: a live QEMU 7.2 migration through the unix: front end.

  source QEMU  migrate unix:SRC -> socat -r cap-src -> rdma-x send --listen-unix S
  rdma-x recv --connect-unix D -> socat -r cap-dst -> destination QEMU -incoming unix:DQ

with return-path on. Checks: both rdma-x exit 0, the stream the source QEMU
wrote equals the stream the destination QEMU read (socat -r dumps the
forward direction only), and the destination guest's self-check passes.
Usage: test-unix.py [RDMAX]
"""
import os
import subprocess
import sys

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check_dst_verifies, check_identical, check, free_port,  # noqa
                 is_listening, log, run_test, set_caps, set_params, wait_for,
                 wait_migration, wait_status)

WORKLOAD = {'mode': 'sparse-random', 'mib': 32, 'rate': 30, 'report': 0.5}


def body(rig):
    port = free_port()
    p = rig.path
    cap_src, cap_dst = p('cap-src.bin'), p('cap-dst.bin')
    src_sock, send_sock = p('qemu-src.sock'), p('send.sock')
    recv_sock, dst_sock = p('recv.sock'), p('qemu-dst.sock')
    bg = rig.spawn

    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(3, timeout=40)
    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True})
    set_params(src.qmp, {'max-bandwidth': 64 << 20})
    dst.qmp.cmd('migrate-incoming', uri='unix:' + dst_sock)
    wait_for(lambda: os.path.exists(dst_sock), 15, 'destination QEMU')
    bg(['socat', '-b65536', '-r', cap_dst,
        'UNIX-LISTEN:' + recv_sock, 'UNIX-CONNECT:' + dst_sock],
       'socat-dst.err')
    wait_for(lambda: os.path.exists(recv_sock), 10, 'socat dst')
    recv = bg([rig.rdmax, 'recv', '--listen', '127.0.0.1:%d' % port,
               '--connect-unix', recv_sock, '--lanes', '2'], 'recv.err')
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    send = bg([rig.rdmax, 'send', '--listen-unix', send_sock,
               '--to', '127.0.0.1:%d' % port, '--lanes', '2'], 'send.err')
    wait_for(lambda: os.path.exists(send_sock), 10, 'rdma-x send socket')
    bg(['socat', '-b65536', '-r', cap_src,
        'UNIX-LISTEN:' + src_sock, 'UNIX-CONNECT:' + send_sock],
       'socat-src.err')
    wait_for(lambda: os.path.exists(src_sock), 10, 'socat src')
    src.qmp.cmd('migrate', uri='unix:' + src_sock)
    info, _ = wait_migration(src.qmp, 60)
    check(info['status'] == 'completed', 'source migration %s: %s' %
          (info['status'], info.get('error-desc', '')))
    log('migrated: total %s ms, %s bytes' % (
        info.get('total-time'), info.get('ram', {}).get('transferred')))
    wait_status(dst, ('running',))
    check(src.status() == 'postmigrate', 'source status ' + src.status())
    for name, pr in (('send', send), ('recv', recv)):
        rc = pr.wait(timeout=20)
        check(rc == 0, 'rdma-x %s exit %d: %s' %
              (name, rc, open(p(name + '.err')).read()))
    for pr in rig.procs:
        try:
            pr.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    check_identical(cap_src, cap_dst)
    check_dst_verifies(src, dst)


if __name__ == '__main__':
    sys.exit(run_test('unix', body))
