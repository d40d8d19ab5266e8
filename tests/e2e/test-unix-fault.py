#!/usr/bin/env python3
"""e2e: faults through the unix: front end; the source QEMU fails cleanly.

1. recv --connect-unix to a socket that is not a QEMU (it accepts and
   closes at once): the migration fails, the source guest keeps running,
   both rdma-x halves exit nonzero with one 'rdma-x: error:' line.
2. recv killed (SIGKILL) mid-migration with a real destination QEMU: the
   migration fails, the source guest keeps running, send exits nonzero.
3. pre-flight: recv --host-reserve larger than the host: the sender is
   refused at the handshake with the reason (guest RAM, caches, what is
   available), the migration fails, the source guest keeps running.
Usage: test-unix-fault.py [RDMAX]
"""
import os
import signal
import sys
import time

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check, check_keeps_running, check_one_error_line, free_port,  # noqa
                 is_listening, log, run_test, set_caps, set_params, unix_server,
                 wait_for, wait_migration)

WORKLOAD = {'mode': 'sparse-random', 'mib': 32, 'rate': 30, 'report': 0.5}


def not_qemu(path):
    """Accepts and closes at once."""
    return unix_server(path, lambda c: c.close())


def body(rig):
    p = rig.path
    bg = rig.spawn

    def one_error_line(name):
        check_one_error_line(p(name))

    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(2, timeout=40)
    set_caps(src.qmp, {'return-path': True})
    set_params(src.qmp, {'max-bandwidth': 16 << 20})

    # 1. the destination socket is not a QEMU
    port = free_port()
    ls = not_qemu(p('notqemu.sock'))
    recv = bg([rig.rdmax, 'recv', '--listen', '127.0.0.1:%d' % port,
               '--connect-unix', p('notqemu.sock')], 'recv1.err')
    # recv may already have failed (the socket closed on it): no wait
    # for its listener here; send then gives up after 3 s.
    send = bg([rig.rdmax, 'send', '--listen-unix', p('send1.sock'),
               '--to', '127.0.0.1:%d' % port, '--connect-timeout', '3'],
              'send1.err')
    wait_for(lambda: os.path.exists(p('send1.sock')), 10, 'send socket')
    src.qmp.cmd('migrate', uri='unix:' + p('send1.sock'))
    info, _ = wait_migration(src.qmp, 40)
    check(info['status'] == 'failed', 'migration 1: ' + info['status'])
    for n, pr in (('send1', send), ('recv1', recv)):
        rc = pr.wait(timeout=20)
        check(rc != 0, 'rdma-x %s exited 0' % n)
        one_error_line(n + '.err')
    ls.close()
    check_keeps_running(src)
    log('1: failed cleanly, source guest running')

    # 2. recv killed mid-migration
    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    set_caps(dst.qmp, {'return-path': True})
    dst.qmp.cmd('migrate-incoming', uri='unix:' + p('qemu-dst.sock'))
    port = free_port()
    recv = bg([rig.rdmax, 'recv', '--listen', '127.0.0.1:%d' % port,
               '--connect-unix', p('qemu-dst.sock')], 'recv2.err')
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    send = bg([rig.rdmax, 'send', '--listen-unix', p('send2.sock'),
               '--to', '127.0.0.1:%d' % port], 'send2.err')
    wait_for(lambda: os.path.exists(p('send2.sock')), 10, 'send socket')
    src.qmp.cmd('migrate', uri='unix:' + p('send2.sock'))
    time.sleep(1.0)
    recv.send_signal(signal.SIGKILL)
    info, _ = wait_migration(src.qmp, 40)
    check(info['status'] == 'failed', 'migration 2: ' + info['status'])
    rc = send.wait(timeout=20)
    check(rc != 0, 'rdma-x send exited 0')
    one_error_line('send2.err')
    check_keeps_running(src)
    log('2: failed cleanly, source guest running')

    # 3. pre-flight: the destination host cannot hold the guest
    # (no destination QEMU needed: nothing gets that far; a socket that holds on)
    held = unix_server(p('held.sock'), lambda c: c.recv(1))
    port = free_port()
    recv = bg([rig.rdmax, 'recv', '--listen', '127.0.0.1:%d' % port,
               '--connect-unix', p('held.sock'), '--host-reserve', '100000G'], 'recv3.err')
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    send = bg([rig.rdmax, 'send', '--listen-unix', p('send3.sock'),
               '--to', '127.0.0.1:%d' % port], 'send3.err')
    wait_for(lambda: os.path.exists(p('send3.sock')), 10, 'send socket')
    src.qmp.cmd('migrate', uri='unix:' + p('send3.sock'))
    info, _ = wait_migration(src.qmp, 40)
    check(info['status'] == 'failed', 'migration 3: ' + info['status'])
    check(send.wait(timeout=20) != 0, 'rdma-x send exited 0')
    one_error_line('send3.err')
    err = open(p('send3.err')).read()
    check('pre-flight: this host cannot take the guest' in err and 'GiB of guest RAM' in err,
          'send3: the reason: %s' % err)
    check(recv.poll() is None, 'recv exited on a refused sender')   # it still waits for one
    recv.kill()
    held.close()
    check_keeps_running(src)
    log('3: refused at the handshake, source guest running')


if __name__ == '__main__':
    sys.exit(run_test('unix-fault', body))
