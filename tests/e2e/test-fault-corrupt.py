#!/usr/bin/env python3
"""e2e fault test: one flipped bit on the wire aborts the migration.

A relay (tests/e2e/relay.py) between `rdma-x send` and `rdma-x recv` flips
one bit of what the sender sends, at a chosen offset of a chosen
connection, mid-migration:
- on the control connection;
- on a lane;
- on a lane of an authenticated, encrypted link (--psk-file, --encrypt).
Each must end as a failed migration with a checksum reason on the
receiver (and the receiver's reason relayed to the sender), the source
guest running on, and the destination QEMU never running the guest. The
relay's log must show the flip happened. And a lane that goes silent
(relay --blackhole: no FIN, no RST, nothing forwarded) in the bulk phase:
both rdma-x exit with a reason naming a silent lane, the source QEMU marks
the migration failed and its guest runs on. After each, a migration
without the relay (with the same options) must complete and verify.
Usage: test-fault-corrupt.py [RDMAX]   (or env RDMAX; default build/rdma-x)
"""
import os
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from faults import WORKLOAD, Attempt, migrate_ok  # noqa
from qmp import check, free_port, log, run_test, wait_for  # noqa

BW = 32 << 20
RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'relay.py')
CHECKSUM = r'checksum mismatch'
# With --encrypt the CRC covers the header only; the GCM tag the payload.
SEALED = r'checksum mismatch|failed authentication'
SILENT_LANE = r'lane \d+ .*silent for too long'


def corrupt(rig, src, tag, conn, offset, extra='', reason=CHECKSUM, hole=None):
    """Relay the attempt, flipping one bit (or, with hole=SECONDS,
    blackholing connection conn that long after it was accepted)."""
    port, rport = free_port(), free_port()
    logf = rig.path(tag + '-relay.log')
    fault = ['--blackhole', '%d:%s' % (conn, hole)] if hole else \
        ['--flip', '%d:%d' % (conn, offset)]
    relay = subprocess.Popen([sys.executable, RELAY, '--listen', str(rport),
                              '--to', '127.0.0.1:%d' % port, '--log', logf] + fault)
    try:
        wait_for(lambda: os.path.exists(logf), 10, 'relay to start')
        a = Attempt(rig, src, tag, bw=BW // 2 if hole else BW, port=port,
                    connect_port=rport, send_extra=extra, recv_extra=extra)
        want = SILENT_LANE if hole else reason
        a.expect_failed(reasons={'recv': want, 'send': want})
        with open(logf) as f:
            text = f.read()
        done = 'blackholed conn=%d' % conn if hole else \
            'flipped conn=%d offset=%d' % (conn, offset)
        check(done in text, '%s: the relay never did it: %s' % (tag, text))
        log('%s: %s' % (tag, [l for l in text.splitlines() if done in l]))
    finally:
        relay.kill()
        relay.wait()


def body(rig):
    key = rig.path('psk')
    with open(key, 'w') as f:
        f.write(os.urandom(32).hex() + '\n')
    os.chmod(key, 0o600)
    secure = '--psk-file %s --encrypt' % key

    src = rig.guest('src', workload=WORKLOAD)
    src.wait_reports(2, timeout=40)
    corrupt(rig, src, 'flip-ctrl', 0, 20000)
    src = migrate_ok(rig, src, 'retry-ctrl')
    corrupt(rig, src, 'flip-lane', 1, 400000)
    src = migrate_ok(rig, src, 'retry-lane')
    corrupt(rig, src, 'flip-encrypted', 1, 300000, extra=secure, reason=SEALED)
    src = migrate_ok(rig, src, 'retry-encrypted', send_extra=secure,
                     recv_extra=secure)
    # connection 2 is a lane (0 is the control connection)
    corrupt(rig, src, 'blackhole-lane', 2, None, hole=3.0)
    src = migrate_ok(rig, src, 'retry-blackhole')


if __name__ == '__main__':
    sys.exit(run_test('fault-corrupt', body))
