#!/usr/bin/env python3
"""e2e: a guest with the devices of a typical cloud VM, migrated through rdma-x.

q35 with virtio-net (user networking), virtio-blk on a disk image,
virtio-balloon, virtio-rng, a USB tablet (qemu-xhci) and a watchdog
(i6300esb), return path on, a dirtying workload. Run on QEMU 10.0 (suite
qemu10: RDMAX_QEMU_SRC/_DST, RDMAX_MACHINE_SRC/_DST) it checks that 8.0+'s
early-setup device sections and these devices' state do not push RAM into
the parser's opaque tail: the pages travel through the lanes (lane
pages >= 90% of the RAM bytes QEMU sent; whether the tail starts after
them is printed), the
stream arrives byte-identical, the destination guest verifies. It prints
how the stream splits: page bytes in the lanes, control bytes.
Usage: test-cloud-vm.py [RDMAX]
"""
import json
import os
import sys

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (check_dst_verifies, check_identical, check_rdmax_ok,  # noqa
                 check, free_port, is_listening, log, run_test, set_caps,
                 set_params, wait_for, wait_migration, wait_status)

WORKLOAD = {'mode': 'page-real', 'mib': 32, 'rate': 30, 'report': 0.5}


def devices(disk):
    return ['-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0',
            '-drive', 'file=%s,if=none,id=d0,format=raw' % disk,
            '-device', 'virtio-blk-pci,drive=d0',
            '-device', 'virtio-balloon-pci', '-device', 'virtio-rng-pci',
            '-device', 'qemu-xhci', '-device', 'usb-tablet',
            '-device', 'i6300esb']


def body(rig):
    port = free_port()
    cap_src, cap_dst = rig.path('cap-src.bin'), rig.path('cap-dst.bin')
    stats = {w: rig.path(w + '-stats.json') for w in ('send', 'recv')}
    disk = rig.path('disk.img')     # shared storage: one image for both sides
    with open(disk, 'wb') as f:
        f.truncate(16 << 20)
    kw = dict(workload=WORKLOAD, machine='q35', extra_args=devices(disk))
    dst = rig.guest('dst', incoming='defer', **kw)
    src = rig.guest('src', **kw)
    src.wait_reports(3, timeout=60)
    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True})
    set_params(src.qmp, {'max-bandwidth': 64 << 20})
    dst.qmp.cmd('migrate-incoming', uri=rig.recv_cmd(
        port, cap_dst, '--lanes 2 --stats-json %s' % stats['recv']))
    wait_for(lambda: is_listening(port), 15, 'rdma-x recv to listen')
    src.qmp.cmd('migrate', uri=rig.send_cmd(
        port, cap_src, '--lanes 2 --stats-json %s' % stats['send']))
    info, _ = wait_migration(src.qmp, 90)
    check(info['status'] == 'completed', 'source migration %s: %s' %
          (info['status'], info.get('error-desc', '')))
    ram = info.get('ram', {})
    wait_status(dst, ('running',))
    check_dst_verifies(src, dst)
    check_rdmax_ok(rig)
    size = os.path.getsize(cap_src)
    check_identical(cap_src, cap_dst)
    st = json.load(open(stats['send']))
    lane_bytes = st['pages'] * 4096
    normal = ram.get('normal-bytes', 0)
    log('stream %d bytes: %d pages in the lanes (%.1f%% of the stream), %d control '
        'bytes, opaque tail %s; QEMU sent %d normal page bytes' % (
            size, st['pages'], 100.0 * lane_bytes / size, st['control_bytes'],
            st['opaque_tail'], normal))
    # The opaque tail may start after the RAM (device state the parser does
    # not need); what matters is that the RAM pages did not end up in it.
    check(lane_bytes >= 0.9 * normal,
          'only %d of %d page bytes went through the lanes' % (lane_bytes, normal))


if __name__ == '__main__':
    sys.exit(run_test('cloud-vm', body))
