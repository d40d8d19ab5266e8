#!/usr/bin/env python3
"""e2e: one rdma-x service per host (--serve, --config) carries migration after migration.

  rdma-x send --serve --config send.conf   (listen-unix = S)
  rdma-x recv --serve --config recv.conf   (connect-unix = D)

The same two processes carry, one after another, QEMU 7.2 multifd
migrations (2 channels, return-path):
1. guest A: src -> dst1; completes, dst1's guest verifies.
2. the guest again, dst1 -> dst2, and dst2 is killed mid-migration: the
   migration fails, dst1's guest keeps running, both services stay up.
3. dst1 -> dst3 through the same services: completes, dst3 verifies.
Both services log each outcome and are still running at the end.
A key file that every migration would refuse stops the service at start
(one error line, exit 1) instead of failing migration after migration.
`rdma-x status` on their --status-socket: idle before, the migration in
flight (bytes, rate) during 2, two done and one failed at the end.
Usage: test-serve.py [RDMAX]
"""
import json
import os
import subprocess
import sys
import time

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check, check_dst_verifies, check_keeps_running, free_port,  # noqa
                 is_listening, log,  # noqa
                 run_test, set_caps, set_params, wait_for, wait_migration,
                 wait_status)

WORKLOAD = {'mode': 'page-real', 'mib': 32, 'rate': 30, 'report': 0.5}
CAPS = {'return-path': True, 'multifd': True}
PARAMS = {'multifd-channels': 2, 'multifd-compression': 'none'}


def body(rig):
    p = rig.path
    port = free_port()
    send_sock, dst_sock = p('send.sock'), p('qemu-dst.sock')
    with open(p('send.conf'), 'w') as f:
        f.write('# the source host\nlisten-unix = %s\nto = 127.0.0.1:%d\n'
                'lanes = 2\nstatus-socket = %s\n' % (send_sock, port, p('send.status')))
    with open(p('recv.conf'), 'w') as f:
        f.write('listen = 127.0.0.1:%d\nconnect-unix = %s\n'
                'connect-timeout = 20   # QEMU may come later\n'
                'status-socket = %s\n' % (port, dst_sock, p('recv.status')))
    # a key file every migration would refuse: the service does not start
    with open(p('bad.key'), 'w') as f:
        f.write('00' * 32 + '\n')
    os.chmod(p('bad.key'), 0o644)
    r = subprocess.run([rig.rdmax, 'recv', '--serve', '--config', p('recv.conf'),
                        '--psk-file', p('bad.key')], capture_output=True, text=True, timeout=10)
    lines = r.stderr.strip().splitlines()
    check(r.returncode == 1 and len(lines) == 1 and 'readable by others' in lines[0],
          'a bad key file must stop the service at start: rc %d, %r' % (r.returncode, lines[:3]))
    log('bad key file: %s' % lines[0])
    recv = rig.spawn([rig.rdmax, 'recv', '--serve', '--config', p('recv.conf')], 'recv.err')
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    send = rig.spawn([rig.rdmax, 'send', '--serve', '--config', p('send.conf')], 'send.err')
    wait_for(lambda: os.path.exists(send_sock), 10, 'rdma-x send socket')

    def services_up():
        check(send.poll() is None, 'send service exited: ' + open(p('send.err')).read())
        check(recv.poll() is None, 'recv service exited: ' + open(p('recv.err')).read())

    def notes(name):
        return [l for l in open(p(name)).read().splitlines() if 'rdma-x: note: migration' in l]

    def start(src, name, bw):
        dst = rig.guest(name, workload=WORKLOAD, incoming='defer')
        for g in (src, dst):
            set_caps(g.qmp, CAPS)
            set_params(g.qmp, PARAMS)
        set_params(src.qmp, {'max-bandwidth': bw})
        if os.path.exists(dst_sock):
            os.unlink(dst_sock)   # left by a killed destination
        dst.qmp.cmd('migrate-incoming', uri='unix:' + dst_sock)
        wait_for(lambda: os.path.exists(dst_sock), 15, 'destination QEMU')
        src.qmp.cmd('migrate', uri='unix:' + send_sock)
        return dst

    def complete(src, dst, n):
        info, _ = wait_migration(src.qmp, 90)
        check(info['status'] == 'completed', 'migration %d: %s: %s' %
              (n, info['status'], info.get('error-desc', '')))
        wait_status(dst, ('running',))
        check_dst_verifies(src, dst)
        wait_for(lambda: len(notes('send.err')) >= n and len(notes('recv.err')) >= n,
                 20, 'both services to finish migration %d' % n)
        services_up()
        log('%d: completed through the services, verified' % n)

    def status(side, json_=True):
        r = subprocess.run([rig.rdmax, 'status', p(side + '.status')] +
                           (['--json'] if json_ else []),
                           capture_output=True, text=True, timeout=10)
        check(r.returncode == 0, 'rdma-x status %s: %s' % (side, r.stderr))
        return json.loads(r.stdout) if json_ else r.stdout

    st = status('send')
    check(st['phase'] == 'waiting for QEMU' and st['migration'] is None, 'idle send: %s' % st)
    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(2, timeout=40)
    dst1 = start(src, 'dst1', 64 << 20)
    complete(src, dst1, 1)
    src.kill()

    # 2. the destination QEMU dies mid-migration
    dst2 = start(dst1, 'dst2', 8 << 20)

    def carrying():
        i = dst1.qmp.cmd('query-migrate')
        return (i.get('ram', {}).get('multifd-bytes', 0) > 4 << 20 or
                i['status'] not in ('setup', 'active'))
    wait_for(carrying, 30, 'multifd channels to carry 4 MiB')

    # rdma-x status while it runs: the migration in flight, its bytes and rate
    def in_flight():
        st = status('send')
        m = st.get('migration') or {}
        return (st['phase'] == 'migrating' and m.get('number') == 2 and
                m['stats']['channel_bytes'] > 0 and m.get('rate_mib_s', 0) > 0) and st
    st = wait_for(in_flight, 20, 'rdma-x status to show the migration in flight')
    log('status during migration 2: %s' % status('send', json_=False).strip().replace('\n', ' | '))
    dst2.kill()
    info, _ = wait_migration(dst1.qmp, 40)
    check(info['status'] == 'failed', 'migration 2: ' + info['status'])
    check_keeps_running(dst1)
    wait_for(lambda: len(notes('send.err')) >= 2 and len(notes('recv.err')) >= 2,
             20, 'both services to finish migration 2')
    services_up()
    log('2: failed cleanly, guest running, services up')
    time.sleep(0.5)

    # 3. again through the same services
    dst3 = start(dst1, 'dst3', 64 << 20)
    complete(dst1, dst3, 3)
    for name in ('send.err', 'recv.err'):
        got = [l.split('note: ')[1] for l in notes(name)]
        check(got == ['migration 1 done; ready for the next one',
                      'migration 2 failed; ready for the next one',
                      'migration 3 done; ready for the next one'],
              '%s: %s' % (name, got))
    for side in ('send', 'recv'):
        st = status(side)
        check(st['migrations_done'] == 2 and st['migrations_failed'] == 1 and
              st['migration'] is None, '%s status at the end: %s' % (side, st))
    errors = [l for l in open(p('send.err')).read().splitlines() if 'rdma-x: error:' in l]
    check(len(errors) == 1, 'send: one error line (migration 2), got %r' % errors)
    log('services: %s' % errors[0])


if __name__ == '__main__':
    sys.exit(run_test('serve', body))
