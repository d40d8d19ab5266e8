#!/usr/bin/env python3
"""e2e: the disks channel: NBD storage migration through the rdma-x services, with faults.

Two QEMU 7.2 TCG guests, each with a raw virtio disk; the destination
(-incoming defer) serves its empty image over NBD on a unix socket, as
libvirt does for --copy-storage-all (nbd-server-start, block-export-add
writable). One rdma-x pair for the whole test, as on a managed host:

  rdma-x send --serve --listen-unix S --listen-disks-unix SD --to ...
  rdma-x recv --serve --connect-unix QEMU_DST --connect-disks-unix NBD

The source image: a quarter random, a quarter zeros (written: data to
the mirror), half text.
1. recv killed mid-mirror (blockdev-mirror at 8 MiB/s): the source's
   mirror job fails, its guest keeps running, send prints one error line
   for the disk connection and keeps serving.
2. recv restarted, the destination's NBD server stopped: the source's
   blockdev-add of the NBD target fails, send and recv each print one
   error line (the reason: connecting to the NBD server), the guest runs.
3. NBD server back: blockdev-add + blockdev-mirror to READY, the
   migration through the same services, block-job-cancel (what libvirt
   does once the migration completed): the destination's image equals the
   source's, with a write the source guest's QEMU made while mirroring;
   the destination guest verifies; both services report the disk
   connection done with the image's bytes, fewer of them on the wire.
Usage: test-disks.py [RDMAX]
"""
import os
import re
import signal
import sys
import time

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (QMPError, check, check_dst_verifies, check_keeps_running,  # noqa
                 free_port, is_listening, log, run_test, set_caps, sha256_file,
                 wait_for, wait_migration)

WORKLOAD = {'mode': 'sparse-random', 'mib': 16, 'rate': 20, 'report': 0.5}
DISK_MIB = 48


def errors(path):
    with open(path) as f:
        return [l.strip() for l in f if l.startswith('rdma-x: error:')]


def notes(path):
    with open(path) as f:
        return [l.strip() for l in f if l.startswith('rdma-x: note: disk connection')]


def job_event(qmp, kinds, timeout):
    """Wait for a block job event of one of kinds; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in qmp.events:
            if e['event'] in kinds:
                qmp.events.remove(e)
                return e
        qmp.cmd('query-block-jobs')     # reads the events that came meanwhile
        time.sleep(0.2)
    raise AssertionError('no %s within %d s' % (kinds, timeout))


def body(rig):
    p = rig.path
    q = DISK_MIB << 18
    line = b'rdma-x disks test line %08d: the quick brown fox jumps\n'
    text = b''.join(line % i for i in range(2 * q // len(line) + 1))[:2 * q]
    with open(p('src.img'), 'wb') as f:
        f.write(os.urandom(q) + bytes(q) + text)
    with open(p('dst.img'), 'wb') as f:
        f.truncate(DISK_MIB << 20)

    def disk(img):
        return ['-blockdev', 'driver=file,filename=%s,node-name=file0' % img,
                '-blockdev', 'driver=raw,file=file0,node-name=disk0',
                '-device', 'virtio-blk-pci,drive=disk0,id=vd0']

    src = rig.guest('src', workload=WORKLOAD, extra_args=disk(p('src.img')))
    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer',
                    extra_args=disk(p('dst.img')))
    src.wait_reports(2, timeout=40)
    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True})

    def nbd_start():
        dst.qmp.cmd('nbd-server-start', addr={'type': 'unix', 'data': {'path': p('nbd.sock')}})
        dst.qmp.cmd('block-export-add', **{'type': 'nbd', 'id': 'exp0', 'name': 'disk0',
                                           'writable': True, 'node-name': 'disk0'})

    nbd_start()
    dst.qmp.cmd('migrate-incoming', uri='unix:' + p('qemu-dst.sock'))

    port = free_port()

    def recv_up(n):
        pr = rig.spawn([rig.rdmax, 'recv', '--serve', '--listen', '127.0.0.1:%d' % port,
                        '--connect-unix', p('qemu-dst.sock'),
                        '--connect-disks-unix', p('nbd.sock'), '--connect-timeout', '2'],
                       'recv%d.err' % n)
        wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
        return pr

    recv = recv_up(1)
    send = rig.spawn([rig.rdmax, 'send', '--serve', '--listen-unix', p('mig.sock'),
                      '--listen-disks-unix', p('disks.sock'), '--to', '127.0.0.1:%d' % port],
                     'send.err')
    wait_for(lambda: os.path.exists(p('disks.sock')), 10, 'send disks socket')

    def target_add():
        src.qmp.cmd('blockdev-add', driver='nbd', **{'node-name': 'tgt'},
                    server={'type': 'unix', 'path': p('disks.sock')}, export='disk0')

    def target_del():
        src.qmp.cmd('blockdev-del', **{'node-name': 'tgt'})

    # 1. recv killed mid-mirror
    target_add()
    src.qmp.cmd('blockdev-mirror', **{'job-id': 'm1'}, device='disk0', target='tgt',
                sync='full', speed=8 << 20)
    time.sleep(1.5)
    recv.send_signal(signal.SIGKILL)
    recv.wait()
    e = job_event(src.qmp, ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_READY'), 40)
    check(e['event'] == 'BLOCK_JOB_COMPLETED' and e['data'].get('error'),
          'mirror 1 should fail: %s' % e)
    log('1: mirror failed: %s' % e['data']['error'])
    target_del()
    check_keeps_running(src)
    check(send.poll() is None, 'send service exited')
    wait_for(lambda: errors(p('send.err')), 10, 'send error line')
    err = errors(p('send.err'))
    check(len(err) == 1 and err[0].startswith('rdma-x: error: disk connection 1: '),
          'send: %s' % err)
    log('1: send: %s' % err[0])

    # 2. the destination's NBD server is gone
    dst.qmp.cmd('nbd-server-stop')
    recv = recv_up(2)
    try:
        target_add()
        raise AssertionError('blockdev-add to a missing NBD server succeeded')
    except QMPError as x:
        log('2: blockdev-add failed: %s' % x)
    # QEMU 7.2's NBD client may try twice: one line per connection it opened
    wait_for(lambda: len(errors(p('send.err'))) >= 2 and errors(p('recv2.err')), 10,
             'error lines for the missing NBD server')
    time.sleep(0.5)
    n2 = len(errors(p('recv2.err')))
    check(len(errors(p('send.err'))) == 1 + n2, 'one error line per connection: send %s, '
          'recv %s' % (errors(p('send.err')), errors(p('recv2.err'))))
    for name, e in [('send.err', e) for e in errors(p('send.err'))[1:]] + \
            [('recv2.err', e) for e in errors(p('recv2.err'))]:
        check("the destination QEMU's NBD server" in e, '%s: %s' % (name, e))
    log('2: %d NBD connection(s) refused; send: %s' % (n2, errors(p('send.err'))[-1]))
    check_keeps_running(src)
    check(send.poll() is None and recv.poll() is None, 'a service exited')

    # 3. the whole storage migration through the same services
    nbd_start()
    target_add()
    src.qmp.cmd('blockdev-mirror', **{'job-id': 'm3'}, device='disk0', target='tgt',
                sync='full')
    e = job_event(src.qmp, ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_READY'), 60)
    check(e['event'] == 'BLOCK_JOB_READY', 'mirror 3: %s' % e)
    # written while mirroring: the mirror carries it too
    src.qmp.hmp('qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x5a %d 65536"' % (5 << 20))
    t0 = time.monotonic()
    src.qmp.cmd('migrate', uri='unix:' + p('mig.sock'))
    info, _ = wait_migration(src.qmp, 90)
    check(info['status'] == 'completed', 'migration 3: ' + info['status'])
    log('3: migration completed in %.1f s' % (time.monotonic() - t0))
    src.qmp.cmd('block-job-cancel', device='m3')
    e = job_event(src.qmp, ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'), 30)
    check(not e['data'].get('error'), 'mirror 3 ended with %s' % e)
    target_del()
    wait_for(lambda: notes(p('send.err')) and notes(p('recv2.err')), 20,
             'both services to report the disk connection done')
    dst.qmp.cmd('nbd-server-stop')
    check_dst_verifies(src, dst)
    dst.qmp.cmd('quit')
    dst.proc.wait(timeout=20)
    a, b = sha256_file(p('src.img')), sha256_file(p('dst.img'))
    check(a == b, 'images differ: source %s, destination %s' % (a, b))
    with open(p('dst.img'), 'rb') as f:
        f.seek(5 << 20)
        check(f.read(65536) == b'\x5a' * 65536, 'the write during the mirror is missing')
    sn, rn = notes(p('send.err'))[-1], notes(p('recv2.err'))[-1]
    log('3: send: %s' % sn)
    log('3: recv: %s' % rn)
    took = float(re.search(r'([0-9.]+) MiB from QEMU', sn).group(1))
    wire = float(re.search(r'\(([0-9.]+) MiB on the wire\)', sn).group(1))
    got = float(re.search(r'([0-9.]+) MiB to QEMU', rn).group(1))
    check(took >= DISK_MIB and got == took, 'disk bytes: sender took %.1f MiB, receiver '
          'delivered %.1f MiB' % (took, got))
    check(wire < 0.6 * took, '%.1f MiB on the wire for %.1f MiB' % (wire, took))
    check(len(errors(p('send.err'))) == 1 + n2 and len(errors(p('recv2.err'))) == n2,
          'new error lines: %s %s' % (errors(p('send.err')), errors(p('recv2.err'))))
    log('3: %d MiB image identical on the destination (sha256 %s...)' % (DISK_MIB, a[:16]))


if __name__ == '__main__':
    sys.exit(run_test('disks', body))
