#!/usr/bin/env python3
"""A real QEMU live migration whose stream crosses Soft-RoCE.

The host has no RDMA device, so the rdma-x pair runs inside a third guest (the
Soft-RoCE guest of scripts/guest/build-initrd-rdma, booted with rdmax.run=relay,
tests/rdma/guest-relay.sh) and the host's QEMUs reach it through QEMU user
networking with forwarded ports:

  source QEMU --exec:socat--> 127.0.0.1:HS ==hostfwd==> guest :5001
      socat -> rdma-x send --transport rdma ==rxe0==> rdma-x recv --transport rdma
      -> socat guest :5002 <==hostfwd== 127.0.0.1:HD <--exec:socat-- destination QEMU

with the return path on (it flows back the same way). The source and
destination guests run the verifying workload. Checks: the migration
completes, the destination runs and its workload finds no lost write over a
full sweep, the stream the source wrote and the one the destination read are
byte-identical (tee on each side), and both rdma-x processes in the relay
guest exit 0 having used the rdma transport.

Usage: test-migration-rxe.py  (env BUILD: build dir with rdma-x, default build;
OUT: out/guest). Exit 0 pass, 1 fail, 77 skip (no QEMU or socat).
"""
import os
import re
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.abspath(os.path.join(HERE, '..', '..'))
sys.path.insert(0, os.path.join(TOP, 'tests', 'e2e', 'lib'))
from qmp import (QEMU, SKIP, TestFailure, check, first_difference,  # noqa
                 free_port, log, run_test, set_caps, set_params, sh_quote,
                 wait_for, wait_migration, wait_status)

# Light: three TCG guests share the host and the stream crosses slirp twice
# and rdma-x in a TCG guest (a few MB/s), so precopy must converge on little.
WORKLOAD = {'mode': 'sparse-random', 'mib': 32, 'rate': 1, 'report': 0.5}
LANES = os.environ.get('RXE_LANES', '2')


def boot_relay(rig, hs, hd):
    """The Soft-RoCE guest with the two relays; returns (proc, serial)."""
    build = os.environ.get('BUILD', 'build')
    env = dict(os.environ, BUILD=build)
    initrd = subprocess.run([os.path.join(TOP, 'scripts', 'guest', 'build-initrd-rdma')],
                            stdout=subprocess.PIPE, check=True, text=True,
                            cwd=TOP, env=env).stdout.strip()
    out = os.environ.get('OUT', os.path.join(TOP, 'out', 'guest'))
    vmlinux = os.path.join(out, 'kernel', 'vmlinux')
    serial = rig.path('relay-serial.log')
    nic = ('user,model=virtio-net-pci,restrict=on,'
           'hostfwd=tcp:127.0.0.1:%d-:5001,hostfwd=tcp:127.0.0.1:%d-:5002' % (hs, hd))
    argv = [QEMU, '-name', 'relay', '-accel', 'tcg', '-smp', '2', '-m', '1048584K',
            '-display', 'none', '-vga', 'none', '-monitor', 'none', '-nodefaults',
            '-no-reboot', '-nic', nic, '-serial', 'file:' + serial,
            '-kernel', vmlinux, '-initrd', initrd,
            '-append', 'console=ttyS0 panic=-1 quiet rdmax.run=relay rdmax.lanes=%s' % LANES]
    errf = open(rig.path('relay-qemu.err'), 'wb')
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                            start_new_session=True)
    return proc, serial


def serial_text(path):
    try:
        with open(path, 'rb') as f:
            return f.read().decode(errors='replace').replace('\r', '')
    except OSError:
        return ''


def body(rig):
    if not shutil.which('socat'):
        raise TestFailure('socat missing on the host')
    hs, hd = free_port(), free_port()
    relay, serial = boot_relay(rig, hs, hd)
    try:
        run(rig, hs, hd, serial)
    finally:
        text = serial_text(serial)
        for line in text.splitlines():
            if line.startswith('RDMAX-RELAY-'):
                log('relay: ' + line)
        if relay.poll() is None:
            relay.kill()
        relay.wait()


def run(rig, hs, hd, serial):
    cap_src, cap_dst = rig.path('cap-src.bin'), rig.path('cap-dst.bin')
    q = sh_quote
    dst = rig.guest('dst', workload=WORKLOAD, incoming='defer')
    src = rig.guest('src', workload=WORKLOAD)
    wait_for(lambda: 'RDMAX-RELAY-READY' in serial_text(serial), 90,
             'the Soft-RoCE relay guest to come up')
    src.wait_reports(3, timeout=60)
    for g in (src, dst):
        set_caps(g.qmp, {'return-path': True})
    set_params(src.qmp, {'max-bandwidth': 10 << 30, 'downtime-limit': 3000})
    # the tee sits on the forward stream only; the return path is untouched
    dst.qmp.cmd('migrate-incoming',
                uri='exec:socat -b65536 STDIO TCP:127.0.0.1:%d | tee -p %s' % (hd, q(cap_dst)))
    time.sleep(1)   # the relay's recv is up before send's first connect try
    t0 = time.monotonic()
    src.qmp.cmd('migrate',
                uri='exec:tee %s | socat -b65536 STDIO TCP:127.0.0.1:%d' % (q(cap_src), hs))
    info, _ = wait_migration(src.qmp, 150)
    secs = time.monotonic() - t0
    check(info['status'] == 'completed', 'source migration %s: %s' %
          (info['status'], info.get('error-desc', '')))
    ram = info.get('ram', {})
    log('migrated over rxe in %.1f s: total %s ms, downtime %s ms, %s bytes, %s syncs' % (
        secs, info.get('total-time'), info.get('downtime'), ram.get('transferred'),
        ram.get('dirty-sync-count')))
    wait_status(dst, 'running', timeout=30)
    # a full sweep of the region after the switch, every write checked
    n0 = len(dst.reports())
    dst.wait_reports(n0 + 6, timeout=60)
    bad = dst.verify_failures()
    check(not bad, 'destination lost writes: %s' % bad[:3])
    check(dst.reports()[-1]['bad'] == 0, 'destination workload: verify_bad=%d' %
          dst.reports()[-1]['bad'])
    done = wait_for(lambda: re.search(r'RDMAX-RELAY-DONE send_rc=(\d+) recv_rc=(\d+)',
                                      serial_text(serial)), 60, 'the relays to finish')
    text = serial_text(serial)
    check(done.group(1) == '0' and done.group(2) == '0',
          'rdma-x in the relay guest failed: %s' % done.group(0))
    check(re.search(r'RDMAX-RELAY-STATS send .*"transport":"rdma"', text),
          'rdma-x send did not use the rdma transport')
    wait_for(lambda: os.path.exists(cap_dst) and
             os.path.getsize(cap_dst) >= os.path.getsize(cap_src), 30, 'capture')
    diff = first_difference(cap_src, cap_dst)
    check(diff is None, 'stream differs at byte %s' % (diff,))
    log('stream: %d bytes byte-identical at both ends' % os.path.getsize(cap_src))


if __name__ == '__main__':
    # run_test() resolves the rdma-x binary from argv/RDMAX; the relay guest
    # carries its own copy, so any path works here.
    sys.exit(run_test('migration-rxe', body, [sys.argv[0], 'socat']))
