#!/usr/bin/env python3
"""e2e: two migrations at once through one rdma-x service pair (slots).

  rdma-x send --serve --config send.conf   (listen-unix = A.sock, B.sock)
  rdma-x recv --serve --config recv.conf   (connect-unix = dstA.sock, dstB.sock;
                                            listen PORT and PORT+1)

Two source guests migrate at the same time, QEMU 7.2 multifd with 2
channels each, one through each slot:
1. while both are in flight (`rdma-x status` shows two migrations), A's
   destination QEMU is killed: A fails, its source guest keeps running;
   B completes and its destination guest verifies.
2. A again through the same slot of the same services: completes, verifies.
Each side logs one error line (A's, named by its slot, blaming the
destination QEMU that died), each slot its own
notes and --stats-json file, and both services are still running.
Usage: test-slots.py [RDMAX]
"""
import json
import os
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check, check_dst_verifies, check_keeps_running,  # noqa
                 is_listening, log,  # noqa
                 run_test, set_caps, set_params, wait_for, wait_migration,
                 wait_status)

WORKLOAD = {'mode': 'page-real', 'mib': 24, 'rate': 20, 'report': 0.5}
CAPS = {'return-path': True, 'multifd': True}
PARAMS = {'multifd-channels': 2, 'multifd-compression': 'none'}


def two_free_ports():
    """PORT and PORT+1, both free now (slot k listens on PORT+k)."""
    for _ in range(50):
        a = socket.socket()
        a.bind(('127.0.0.1', 0))
        port = a.getsockname()[1]
        b = socket.socket()
        try:
            b.bind(('127.0.0.1', port + 1))
            return port
        except OSError:
            continue
        finally:
            a.close()
            b.close()
    raise RuntimeError('no two consecutive free ports')


def body(rig):
    p = rig.path
    port = two_free_ports()
    src_sock = {'A': p('A.sock'), 'B': p('B.sock')}
    dst_sock = {'A': p('dstA.sock'), 'B': p('dstB.sock')}
    with open(p('send.conf'), 'w') as f:
        f.write('listen-unix = %s\nlisten-unix = %s\nto = 127.0.0.1:%d\nlanes = 2\n'
                'stats-json = %s\nstatus-socket = %s\n' %
                (src_sock['A'], src_sock['B'], port, p('send.json'), p('send.status')))
    with open(p('recv.conf'), 'w') as f:
        f.write('listen = 127.0.0.1:%d\nconnect-unix = %s\nconnect-unix = %s\n'
                'connect-timeout = 20\nstats-json = %s\nstatus-socket = %s\n' %
                (port, dst_sock['A'], dst_sock['B'], p('recv.json'), p('recv.status')))
    recv = rig.spawn([rig.rdmax, 'recv', '--serve', '--config', p('recv.conf')], 'recv.err')
    wait_for(lambda: is_listening(port) and is_listening(port + 1), 15,
             'rdma-x recv to listen on both slot ports')
    send = rig.spawn([rig.rdmax, 'send', '--serve', '--config', p('send.conf')], 'send.err')
    wait_for(lambda: all(os.path.exists(s) for s in src_sock.values()), 10,
             'rdma-x send sockets')

    def services_up():
        check(send.poll() is None, 'send service exited: ' + open(p('send.err')).read())
        check(recv.poll() is None, 'recv service exited: ' + open(p('recv.err')).read())

    def notes(name, slot):
        tag = 'rdma-x: note: %s: migration' % src_sock[slot] if name == 'send.err' else \
              'rdma-x: note: %s: migration' % dst_sock[slot]
        return [l.split(': migration ')[1] for l in open(p(name)).read().splitlines()
                if l.startswith(tag)]

    def status(side):
        r = subprocess.run([rig.rdmax, 'status', p(side + '.status'), '--json'],
                           capture_output=True, text=True, timeout=10)
        check(r.returncode == 0, 'rdma-x status %s: %s' % (side, r.stderr))
        return json.loads(r.stdout)

    def start(slot, src, name, bw):
        dst = rig.guest(name, workload=WORKLOAD, incoming='defer')
        for g in (src, dst):
            set_caps(g.qmp, CAPS)
            set_params(g.qmp, PARAMS)
        set_params(src.qmp, {'max-bandwidth': bw})
        if os.path.exists(dst_sock[slot]):
            os.unlink(dst_sock[slot])   # left by a killed destination
        dst.qmp.cmd('migrate-incoming', uri='unix:' + dst_sock[slot])
        wait_for(lambda: os.path.exists(dst_sock[slot]), 15, 'destination QEMU ' + name)
        src.qmp.cmd('migrate', uri='unix:' + src_sock[slot])
        return dst

    srcA = rig.guest('srcA', workload=WORKLOAD)
    srcB = rig.guest('srcB', workload=WORKLOAD)
    srcA.wait_reports(2, timeout=60)
    srcB.wait_reports(2, timeout=60)
    # both slow enough to be in flight together when A is cut
    dstA = start('A', srcA, 'dstA', 6 << 20)
    dstB = start('B', srcB, 'dstB', 8 << 20)

    def both_in_flight():
        for side in ('send', 'recv'):
            st = status(side)
            ms = st.get('migrations') or []
            if st['slots'] != 2 or sorted(m['slot'] for m in ms) != [1, 2] or \
                    any(m['stats']['channel_bytes'] < 2 << 20 for m in ms):
                return False
        return st
    st = wait_for(both_in_flight, 40, 'rdma-x status to show both migrations in flight')
    log('recv status, both in flight: %s' %
        ', '.join('slot %d %s %.1f MiB' % (m['slot'], m['socket'],
                                           m['stats']['channel_bytes'] / 1048576.0)
                  for m in st['migrations']))
    infoB = srcB.qmp.cmd('query-migrate')
    check(infoB['status'] == 'active', 'B must still run when A is cut: ' + infoB['status'])
    dstA.kill()
    info, _ = wait_migration(srcA.qmp, 40)
    check(info['status'] == 'failed', 'A: ' + info['status'])
    check_keeps_running(srcA)
    log('A: failed cleanly, its source guest running')
    set_params(srcB.qmp, {'max-bandwidth': 64 << 20})   # now let B converge
    info, _ = wait_migration(srcB.qmp, 120)
    check(info['status'] == 'completed', 'B (beside the failed A): %s: %s' %
          (info['status'], info.get('error-desc', '')))
    wait_status(dstB, ('running',))
    check_dst_verifies(srcB, dstB)
    log('B: completed beside the failed A, destination verified')
    wait_for(lambda: all(len(notes(n, s)) >= 1 for n in ('send.err', 'recv.err')
                         for s in 'AB'), 20, 'both services to finish both migrations')
    services_up()

    # 2. A again, through the same slot
    time.sleep(0.5)
    dstA2 = start('A', srcA, 'dstA2', 64 << 20)
    info, _ = wait_migration(srcA.qmp, 120)
    check(info['status'] == 'completed', 'A again: %s: %s' %
          (info['status'], info.get('error-desc', '')))
    wait_status(dstA2, ('running',))
    check_dst_verifies(srcA, dstA2)
    wait_for(lambda: len(notes('send.err', 'A')) >= 2 and len(notes('recv.err', 'A')) >= 2,
             20, 'both services to finish A again')
    services_up()
    log('A again: completed through the same slot, verified')

    for name in ('send.err', 'recv.err'):
        check(notes(name, 'A') == ['1 failed; ready for the next one',
                                   '2 done; ready for the next one'] and
              notes(name, 'B') == ['1 done; ready for the next one'],
              '%s: A %s, B %s' % (name, notes(name, 'A'), notes(name, 'B')))
    errors = [l for l in open(p('send.err')).read().splitlines() if 'rdma-x: error:' in l]
    check(len(errors) == 1 and errors[0].startswith('rdma-x: error: %s: ' % src_sock['A']),
          'send: one error line, A\'s, named by its slot; got %r' % errors)
    # the reason blames the destination QEMU that died, not the source that then failed
    check('receiver: destination QEMU' in errors[0], 'send: the reason: %r' % errors[0])
    log('send: %s' % errors[0])
    for side, files in (('send', ('send.json.1', 'send.json.2')),
                        ('recv', ('recv.json.1', 'recv.json.2'))):
        got = [json.load(open(p(f)))['result'] for f in files]
        check(got == ['ok', 'ok'], '%s stats per slot: %r' % (side, got))
        st = status(side)
        check(st['migrations_done'] == 2 and st['migrations_failed'] == 1 and
              st['migrations'] == [], '%s status at the end: %s' % (side, st))


if __name__ == '__main__':
    sys.exit(run_test('slots', body))
